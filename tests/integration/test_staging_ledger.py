"""The access ledger against real reader processes on the host (needs root for the tmpfs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enclave.ledger import AccessLedger, AccessRecord
from enclave.vault import Staging, Vault, wipe_leftovers
from policies.errors import InvalidState, SiteError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="staging mounts a tmpfs: needs root")

FILES = {
    "a.txt": b"alpha\n",
    "b.txt": b"bravo\n",
    "c.txt": b"charlie\n",
    "deep/er/d.txt": b"delta\n",
}


@pytest.fixture
def staging(tmp_path: Path):
    vault = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    v = vault.register(
        "corpus", [(p, io.BytesIO(b)) for p, b in FILES.items()], max_bytes=1 << 20, max_files=10
    )
    root = tmp_path / "staging"
    root.mkdir()
    st = vault.stage("job-7", [v], dest_root=root, on_event=lambda e: None)
    yield st
    st.destroy()
    wipe_leftovers(root)


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def test_names_exactly_the_file_a_reader_opened(staging: Staging) -> None:
    first: list[AccessRecord] = []
    with AccessLedger.for_staging(staging, on_first_open=first.append) as ledger:
        run("cat", str(staging.path("corpus") / "b.txt"))
    summary = ledger.stop()
    assert summary.complete
    assert [(r.job_id, r.dataset, r.path, r.opens) for r in summary.records] == [
        ("job-7", "corpus@v1", "b.txt", 1)
    ]
    assert first == list(summary.records)


def test_nested_files_counts_and_first_open_time(staging: Staging) -> None:
    first: list[AccessRecord] = []
    ledger = AccessLedger.for_staging(staging, on_first_open=first.append)
    ledger.start()
    base = staging.path("corpus")
    for _ in range(3):
        run("cat", str(base / "deep/er/d.txt"))
    run(
        sys.executable,
        "-c",
        f"import mmap; f=open({str(base / 'a.txt')!r},'rb'); "
        "mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)[:1]",
    )
    summary = ledger.stop()
    got = {r.path: r for r in summary.records}
    assert set(got) == {"deep/er/d.txt", "a.txt"}
    assert got["deep/er/d.txt"].opens == 3
    assert got["a.txt"].opens == 1
    assert [r.path for r in first] == ["deep/er/d.txt", "a.txt"]
    assert first[0].first_open <= first[1].first_open
    assert first[0].first_open == got["deep/er/d.txt"].first_open


def test_listing_and_stat_are_not_opens(staging: Staging) -> None:
    with AccessLedger.for_staging(staging) as ledger:
        run("ls", "-laR", str(staging.root))
        run("stat", str(staging.path("corpus") / "c.txt"))
    assert ledger.stop().records == ()


def test_an_open_through_a_symlink_elsewhere_is_still_seen(
    staging: Staging, tmp_path: Path
) -> None:
    link = tmp_path / "innocent-name"
    link.symlink_to(staging.path("corpus") / "c.txt")
    with AccessLedger.for_staging(staging) as ledger:
        run("cat", str(link))
        # /proc/self/fd re-open of an inherited descriptor is an open too.
        run("sh", "-c", f"exec 3<{staging.path('corpus') / 'a.txt'}; cat /proc/self/fd/3")
    paths = {r.path: r.opens for r in ledger.stop().records}
    assert paths["c.txt"] == 1
    assert paths["a.txt"] >= 1


def test_opens_before_start_are_kept(staging: Staging) -> None:
    ledger = AccessLedger.for_staging(staging)
    run("cat", str(staging.path("corpus") / "a.txt"))  # watches exist from construction
    ledger.start()
    assert [r.path for r in ledger.stop().records] == ["a.txt"]


def test_a_flood_that_overflows_the_queue_is_reported_incomplete(staging: Staging) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events={limit} is too large to overflow in a unit-sized test")
    ledger = AccessLedger.for_staging(staging)  # not started: nobody drains the queue
    base = staging.path("corpus")
    # Alternate files so that the kernel cannot merge consecutive identical events.
    run(
        sys.executable,
        "-c",
        f"import os\nfor i in range({limit // 2 + 100}):\n"
        f"    os.close(os.open({str(base / 'a.txt')!r}, os.O_RDONLY))\n"
        f"    os.close(os.open({str(base / 'b.txt')!r}, os.O_RDONLY))\n",
    )
    ledger.start()
    summary = ledger.stop()
    assert not summary.complete
    assert {r.path for r in summary.records} == {"a.txt", "b.txt"}


def test_a_failing_delivery_is_not_swallowed(staging: Staging) -> None:
    def broken(_r: AccessRecord) -> None:
        raise ConnectionError("audit down")

    ledger = AccessLedger.for_staging(staging, on_first_open=broken)
    ledger.start()
    run("cat", str(staging.path("corpus") / "a.txt"))
    run("cat", str(staging.path("corpus") / "b.txt"))
    with pytest.raises(SiteError, match="audit down"):
        ledger.stop()
    # The watcher kept going after the failure: both files are in the totals.
    assert {r.path for r in ledger.summary().records} == {"a.txt", "b.txt"}


def test_the_ledger_thread_runs_for_the_life_of_the_job(staging: Staging) -> None:
    ledger = AccessLedger.for_staging(staging)
    ledger.start()
    assert any(t.name == "ledger-job-7" for t in threading.enumerate())
    with pytest.raises(InvalidState):
        ledger.start()
    ledger.stop()
    assert not any(t.name == "ledger-job-7" for t in threading.enumerate())
    assert ledger.stop() == ledger.summary()  # idempotent


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="does not exist"):
        AccessLedger(job_id="j", datasets={"x@v1": tmp_path / "nope"})
