"""One site contract, every implementation: :class:`enclave.contract.Site`'s docstring, tested.

The same tests run against the in-process :class:`enclave.agent.SiteAgent` (on the in-process
runtime, :mod:`enclave.runtime.fake`: no Docker) and the shipped :class:`enclave.fake.FakeSite`,
and against each of them reached as a remote site is, over the real site link (gRPC over mTLS,
``tests/unit/_linked.py``). A run that starts a job needs a container
and a tmpfs (``tests/integration``); the runs here are those that end before they start.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from enclave.agent import SiteAgent, signer_dir
from enclave.contract import RunOrder, Site, SiteReport
from enclave.fake import FakeSite
from enclave.runtime.fake import FakeRuntime
from gateway.identity import CertificateAuthority
from policies.errors import InvalidInput
from policies.lifecycle import JobState
from policies.spec import parse_spec
from tests.integration._deployment import policy
from tests.unit._linked import LinkedSite

SPEC = parse_spec("""\
name: contract
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing the site contract
resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}
""")


@pytest.fixture(params=["agent", "fake", "linked-agent", "linked-fake"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    ca = CertificateAuthority.init(tmp_path / "ca")
    backing: Site
    if request.param.endswith("fake"):
        backing = FakeSite(root)
    else:
        signer = ca.site_signer("site-a", out_dir=signer_dir(root))
        backing = SiteAgent.open(
            root, name="site-a", signer=signer, runtime=FakeRuntime(lambda job: 0)
        )
    if not request.param.startswith("linked"):
        yield backing
        return
    linked = LinkedSite(tmp_path / "link", backing, ca=ca)
    try:
        yield linked
    finally:
        linked.close()


def _tar(files: Mapping[str, bytes], *, link: str = "") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    buf.seek(0)
    return buf


def _order(job_id: str, *, version: int = 1, with_policy: bool = True) -> RunOrder:
    return RunOrder(
        job_id=job_id,
        spec=SPEC,
        spec_sha256=SPEC.digest(),
        bundle=None,
        bundle_sha256="",
        datasets=(("books", version),),
        policy_versions={"books": 1},
        policy_documents={"books": policy("books")} if with_policy else {},
        approval_binding="b" * 64,
        approvals=("olivia",),
        audit_root="0" * 64,
    )


def _run(site: Site, order: RunOrder) -> list[SiteReport]:
    reports: list[SiteReport] = []
    site.run(order, reports.append)
    return reports


def _states(reports: list[SiteReport]) -> list[JobState]:
    return [r.state for r in reports if r.state is not None]


# -- datasets ---------------------------------------------------------------------------------


def test_an_archive_is_stored_as_the_next_version_with_its_files(site: Site) -> None:
    first = site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    second = site.store_dataset("books", archive=_tar({"a.txt": b"hello", "b.txt": b"more"}))
    assert (first.name, first.version, second.version) == ("books", 1, 2)
    assert [(p, s) for p, s, _ in first.files] == [("a.txt", 5)]
    assert [(p, s) for p, s, _ in second.files] == [("a.txt", 5), ("b.txt", 4)]
    assert first.files[0][2] == second.files[0][2]  # the same content, the same sha256
    assert first.root_hash != second.root_hash


def test_an_identical_archive_answers_with_the_version_it_is(site: Site) -> None:
    first = site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    again = site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    assert again == first


@pytest.mark.parametrize(
    "archive",
    [io.BytesIO(b"this is not a tar archive" * 40), _tar({"a.txt": b"x"}, link="passwd")],
    ids=["not-a-tar", "symlink"],
)
def test_a_refused_archive_raises_invalid_input_and_stores_nothing(
    site: Site, archive: io.BytesIO
) -> None:
    with pytest.raises(InvalidInput):
        site.store_dataset("books", archive=archive)
    assert site.store_dataset("books", archive=_tar({"a.txt": b"hello"})).version == 1


def test_rotating_the_key_rewraps_every_data_key_and_can_run_again(site: Site) -> None:
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    site.store_dataset("books", archive=_tar({"a.txt": b"hello again"}))
    site.store_dataset("notes", archive=_tar({"n.txt": b"note"}))
    first_id, first_count = site.rotate_key()
    second_id, second_count = site.rotate_key()
    assert first_count == second_count == 3
    assert first_id != second_id


# -- what only reads --------------------------------------------------------------------------


def test_the_image_is_pinned_by_id(site: Site) -> None:
    assert site.image_id().startswith("sha256:")
    assert site.image_id() == site.image_id()


def test_a_job_the_site_never_ran_has_empty_logs(site: Site) -> None:
    assert site.logs("job-never") == b""


def test_cancel_is_idempotent_for_any_job_id(site: Site) -> None:
    site.cancel("job-unknown")
    site.cancel("job-unknown")


# -- runs that end before they start -----------------------------------------------------------


def _ends_error_before_it_starts(reports: list[SiteReport], job_id: str) -> SiteReport:
    assert all(r.job_id == job_id for r in reports)
    assert _states(reports) == [JobState.ERROR]  # exactly one state: the terminal one
    end = next(r for r in reports if r.state is not None)
    assert end is [r for r in reports if r.state is not None][-1]
    return end


def test_a_run_for_a_version_the_site_does_not_hold_ends_error(site: Site) -> None:
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    _ends_error_before_it_starts(_run(site, _order("job-v9", version=9)), "job-v9")


def test_a_run_without_the_policy_of_its_dataset_ends_error(site: Site) -> None:
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    end = _ends_error_before_it_starts(_run(site, _order("job-np", with_policy=False)), "job-np")
    assert "policy" in end.detail


def test_a_job_id_runs_once(site: Site) -> None:
    """Whatever the first run's end, a second run of the job id starts nothing: ERROR."""
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    first = _run(site, _order("job-once"))
    assert _states(first)[-1].terminal
    end = _ends_error_before_it_starts(_run(site, _order("job-once")), "job-once")
    assert "never repeated" in end.detail
    site.cancel("job-once")  # after the end: nothing changes, nothing is raised
