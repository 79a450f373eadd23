"""Per-job staging on a real tmpfs (needs root for mount(2); no Docker): what is staged, who can
read and write it, the audit events, teardown however the job ends, and no plaintext left over."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from enclave.vault import (
    JOB_GID,
    DatasetVersion,
    Staging,
    StagingEvent,
    StagingEventKind,
    StagingState,
    Vault,
    measure_stage_throughput,
    wipe_leftovers,
)
from enclave.vault._tmpfs import is_mount_point, mount_points
from policies.errors import IntegrityError, InvalidInput, InvalidState

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="staging mounts a tmpfs: needs root")

MARKER = b"SEALROOM-PLAINTEXT-MARKER-d41d8c"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key", chunk_size=4096)


@pytest.fixture
def stage_root(tmp_path: Path):
    root = tmp_path / "staging"
    root.mkdir()
    yield root
    wipe_leftovers(root)  # never leave a mount behind, whatever a test did


def reg(vault: Vault, name: str, files: dict[str, bytes]) -> DatasetVersion:
    pairs = [(p, io.BytesIO(b)) for p, b in files.items()]
    return vault.register(name, pairs, max_bytes=1 << 24, max_files=100)


TEXTS = {
    "train.txt": MARKER + b" line one\n" * 50,
    "nested/deeper/valid.txt": MARKER + b" validation\n",
    "big.bin": MARKER + os.urandom(5 * 4096 + 123),
    "empty.txt": b"",
}


def test_stage_decrypts_exactly_the_named_versions(vault: Vault, stage_root: Path) -> None:
    v1 = reg(vault, "corpus", TEXTS)
    v2 = reg(vault, "corpus", {"train.txt": b"newer"})
    other = reg(vault, "other", {"secret.txt": b"not for this job"})
    events: list[StagingEvent] = []
    with vault.stage("job-1", [v1], dest_root=stage_root, on_event=events.append) as st:
        assert st.state is StagingState.STAGED
        assert dict(st.datasets) == {"corpus": stage_root / "job-1" / "corpus"}
        staged = {
            str(p.relative_to(st.path("corpus"))): p.read_bytes()
            for p in st.path("corpus").rglob("*")
            if p.is_file()
        }
        assert staged == TEXTS
        assert [p.name for p in st.root.iterdir()] == ["corpus"]
    assert v2.version == 2 and other.name == "other"
    assert [e.kind for e in events] == [
        StagingEventKind.KEY_RELEASED,
        StagingEventKind.STAGED,
        StagingEventKind.DESTROYED,
    ]
    assert {e.job_id for e in events} == {"job-1"}
    assert all(e.datasets == ("corpus@v1",) for e in events)
    assert events[1].total_bytes == sum(len(b) for b in TEXTS.values())


def test_the_mount_is_a_readonly_noswap_tmpfs(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    with vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None) as st:
        line = next(
            ln
            for ln in Path("/proc/self/mounts").read_text().splitlines()
            if ln.split()[1] == str(st.root)
        )
        fstype, opts = line.split()[2], set(line.split()[3].split(","))
        assert fstype == "tmpfs"
        assert {"ro", "nosuid", "nodev", "noexec"} <= opts
        assert "noswap" in opts or not Path("/proc/swaps").read_text().strip().count("\n")
        # The staged bytes live on that mount and nowhere else.
        assert os.stat(st.path("corpus") / "train.txt").st_dev == os.stat(st.root).st_dev
        assert os.stat(st.root).st_dev != os.stat(stage_root).st_dev


def test_modes_let_the_job_read_and_nobody_write(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    with vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None) as st:
        for p in [st.root, *st.root.rglob("*")]:
            s = p.lstat()
            assert (s.st_uid, s.st_gid) == (0, JOB_GID), p
            want = 0o440 if stat.S_ISREG(s.st_mode) else (0o750 if p == st.root else 0o550)
            assert stat.S_IMODE(s.st_mode) == want, p
        target = st.path("corpus") / "nested/deeper/valid.txt"
        # Even root cannot write: the tmpfs is remounted read-only.
        with pytest.raises(OSError, match="Read-only file system"):
            target.write_bytes(b"overwrite")
        with pytest.raises(OSError, match="Read-only file system"):
            (st.path("corpus") / "new.txt").write_bytes(b"x")
        # As the job's user: reads succeed, writes and creations fail. (The probe enters the
        # staged directory as root first: pytest's own temp directories are closed to others.)
        probe = textwrap.dedent(
            f"""
            import os, sys
            os.chdir(sys.argv[1])
            os.setgroups([]); os.setgid({JOB_GID}); os.setuid(10001)
            print(open("valid.txt", "rb").read()[:len(sys.argv[2])].decode())
            for attempt in (lambda: open("valid.txt", "ab"),
                            lambda: open("new.txt", "wb"),
                            lambda: os.chmod("valid.txt", 0o666),
                            lambda: os.unlink("valid.txt")):
                try:
                    attempt()
                    print("WROTE")
                except OSError as e:
                    print("refused", e.strerror)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(target.parent), MARKER.decode()],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == MARKER.decode()
        # The read-only mount answers first (EROFS); the 0440/0550 modes checked above are the
        # second line, for anything that would remount it.
        assert len(lines) == 5 and "WROTE" not in lines
        assert set(lines[1:]) <= {
            "refused Read-only file system",
            "refused Permission denied",
            "refused Operation not permitted",
        }
        # Another uid (not in the job's group) cannot even read.
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os,sys; os.chdir(sys.argv[1]); os.setgroups([]); os.setgid(20002); "
                "os.setuid(20002); open('valid.txt','rb')",
                str(target.parent),
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and "Permission denied" in other.stderr, other.stderr


def test_no_plaintext_anywhere_on_the_host_after_destroy(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    st = vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None)
    assert any(MARKER in p.read_bytes() for p in st.root.rglob("*") if p.is_file())
    mount = st.root
    st.destroy()
    st.destroy()  # idempotent
    assert st.state is StagingState.DESTROYED
    assert not mount.exists()
    assert mount not in mount_points()
    for base in (vault.root, stage_root):
        hits = subprocess.run(["grep", "-rlF", MARKER.decode(), str(base)], capture_output=True)
        assert hits.returncode == 1, hits.stdout  # grep: 1 = no match anywhere
    assert list(stage_root.iterdir()) == []


def test_destroyed_when_the_job_fails(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    events: list[StagingEvent] = []
    with (
        pytest.raises(RuntimeError, match="job crashed"),
        vault.stage("job-1", [v], dest_root=stage_root, on_event=events.append),
    ):
        raise RuntimeError("job crashed")
    assert events[-1].kind is StagingEventKind.DESTROYED
    assert list(stage_root.iterdir()) == []


def test_destroy_while_a_reader_holds_a_file_open(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    st = vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None)
    with open(st.path("corpus") / "train.txt", "rb") as held:
        st.destroy()  # busy: detached; gone from the host's view at once
        assert not st.root.exists()
        assert held.read(len(MARKER)) == MARKER  # the holder keeps its pages until it closes
    assert list(stage_root.iterdir()) == []


def test_a_failing_audit_callback_stops_staging(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    seen: list[StagingEvent] = []

    def audit(e: StagingEvent) -> None:
        seen.append(e)
        if e.kind is StagingEventKind.KEY_RELEASED:
            raise ConnectionError("audit log unreachable")

    with pytest.raises(ConnectionError, match="unreachable"):
        vault.stage("job-1", [v], dest_root=stage_root, on_event=audit)
    assert [e.kind for e in seen] == [StagingEventKind.KEY_RELEASED, StagingEventKind.DESTROYED]
    assert list(stage_root.iterdir()) == []
    assert not any(stage_root in p.parents for p in mount_points())


def test_tampered_blob_aborts_staging_and_names_the_chunk(vault: Vault, stage_root: Path) -> None:
    import json

    v = reg(vault, "corpus", TEXTS)
    d = vault.root / "datasets/corpus/v1"
    (entry,) = [
        f for f in json.loads((d / "manifest.json").read_bytes())["files"] if f["path"] == "big.bin"
    ]
    blob = d / "blobs" / entry["blob"]
    data = bytearray(blob.read_bytes())
    data[12 + 2 * (12 + 4096 + 16) + 40] ^= 1  # a byte of chunk 2's ciphertext
    blob.write_bytes(bytes(data))
    events: list[StagingEvent] = []
    with pytest.raises(IntegrityError, match=r"corpus@v1, file 'big.bin', chunk 2"):
        vault.stage("job-1", [v], dest_root=stage_root, on_event=events.append)
    assert events[-1].kind is StagingEventKind.DESTROYED
    assert list(stage_root.iterdir()) == []


def test_bad_requests(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", TEXTS)
    for bad in ("../escape", "", "a/b", "-rf", "x" * 200):
        with pytest.raises(InvalidInput, match="job id"):
            vault.stage(bad, [v], dest_root=stage_root, on_event=lambda e: None)
    with pytest.raises(InvalidInput, match="twice"):
        vault.stage("job-1", [v, v], dest_root=stage_root, on_event=lambda e: None)
    with pytest.raises(InvalidInput, match="no dataset versions"):
        vault.stage("job-1", [], dest_root=stage_root, on_event=lambda e: None)
    with (
        vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None),
        pytest.raises(InvalidState, match="already staged"),
    ):
        vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None)
    assert list(stage_root.iterdir()) == []


CRASH_STAGE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from enclave.vault import Vault
    tmp = Path(sys.argv[1])
    vault = Vault(tmp / "vault", site_key_path=tmp / "site.key")
    v = vault.get("corpus", 1)
    for job in ("crash-a", "crash-b"):
        vault.stage(job, [v], dest_root=tmp / "staging", on_event=lambda e: None)
    import os
    os._exit(9)  # the agent dies with two stagings mounted
    """
)


def test_wipe_leftovers_after_an_agent_crash(
    vault: Vault, stage_root: Path, tmp_path: Path
) -> None:
    reg(vault, "corpus", TEXTS)
    r = subprocess.run(
        [sys.executable, "-c", CRASH_STAGE, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 9, r.stderr
    left = sorted(p.name for p in stage_root.iterdir())
    assert left == ["crash-a", "crash-b"]
    assert all(is_mount_point(stage_root / n) for n in left)
    (stage_root / "stray-file").write_bytes(MARKER)  # anything else there goes too

    removed = wipe_leftovers(stage_root)

    assert sorted(p.name for p in removed) == ["crash-a", "crash-b", "stray-file"]
    assert list(stage_root.iterdir()) == []
    assert not any(stage_root in p.parents for p in mount_points())
    assert wipe_leftovers(stage_root) == ()


def test_staging_repr_and_lookup(vault: Vault, stage_root: Path) -> None:
    v = reg(vault, "corpus", {"a.txt": b"a"})
    with vault.stage("job-1", [v], dest_root=stage_root, on_event=lambda e: None) as st:
        assert isinstance(st, Staging)
        assert "corpus@v1" in repr(st)
        with pytest.raises(InvalidInput, match="not staged"):
            st.path("other")


def test_bench_hook_reports_both_figures(tmp_path: Path) -> None:
    r = measure_stage_throughput(total_bytes=8 << 20, files=2, runs=3, work_dir=tmp_path)
    assert r.stage_mb_s > 0 and r.aesgcm_mb_s > 0 and r.aesgcm_stream_mb_s > 0
    assert len(r.stage_values) == len(r.limit_values) == r.runs == 3
    ratios = sorted(s / lim for s, lim in zip(r.stage_values, r.limit_values, strict=True))
    assert r.ratio == pytest.approx(ratios[1])  # the median of the per-pair ratios
    assert r.ratio_spread == pytest.approx((ratios[0], ratios[2]))
    assert r.first_mb_s == r.stage_values[0]
    assert r.total_bytes == 8 << 20
    assert list(tmp_path.iterdir()) == []  # cleaned up, nothing mounted


def test_a_remount_waits_out_a_brief_writer_and_refuses_a_lasting_one(tmp_path: Path) -> None:
    """Read-only is refused by the kernel while a file is open for writing: a writer that
    closes within the wait (another thread's fork, an engine copying the mounts) is waited
    out; one that stays open is the site's error, and the tmpfs stays writable to no one
    else's surprise (it is torn down with the run)."""
    import errno
    import threading

    from enclave import _mounts
    from policies.errors import SiteError

    brief, lasting = tmp_path / "brief", tmp_path / "lasting"
    with _mounts.tmpfs(brief, size_bytes=1 << 20, owner=(0, 0)):
        writer = (brief / "x").open("wb")
        threading.Timer(0.2, writer.close).start()
        _mounts.remount_readonly(brief)
        assert writer.closed
        with pytest.raises(OSError) as e:
            (brief / "y").write_bytes(b"no")
        assert e.value.errno == errno.EROFS
    with (
        _mounts.tmpfs(lasting, size_bytes=1 << 20, owner=(0, 0)),
        (lasting / "x").open("wb"),
        pytest.raises(SiteError, match="read-only: Device or resource busy"),
    ):
        _mounts.remount_readonly(lasting)
