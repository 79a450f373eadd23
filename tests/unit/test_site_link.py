"""The site link, attacked from both ends: real gRPC over mTLS on loopback, the gateway's
SiteLink service behind its authorisation interceptor, and :class:`enclave.link.SiteLink`
serving a scripted site.

What must hold: a lease is granted once and its reports are applied in order exactly once; no
site can speak for another's lease, and no other role can speak as a site; a release is taken
only when it verifies as signed by the site that pushes it; an order whose spec or bundle is not
the one it names never reaches the site; a lease whose site goes silent ends the job, and the
order is never handed out again; a site that restarts ends the runs it held.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave.agent import signer_dir
from enclave.contract import RunOrder, SiteReport
from enclave.fake import FakeSite
from enclave.gate import layout_from_files, run_gate
from enclave.identity import IdentityFiles
from enclave.link import channel
from enclave.linkwire import report_message
from enclave.provenance import (
    AuditPosition,
    DatasetVersion,
    ReleaseContext,
    SiteSigner,
    sign_release,
)
from gateway.identity import CertificateAuthority
from policies.channels import TeamReason
from policies.identity import Role
from policies.lifecycle import JobState
from policies.spec import parse_spec
from tests.integration._deployment import policy
from tests.unit._linked import LinkedSite
from tests.unit._release_support import job_output, rules, write_tensors

SPEC = parse_spec("""\
name: linked
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing the site link
resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}
""")


def _order(job_id: str, *, bundle: Path | None = None, **over: object) -> RunOrder:
    order = RunOrder(
        job_id=job_id,
        spec=SPEC,
        spec_sha256=SPEC.digest(),
        bundle=bundle,
        bundle_sha256=hashlib.sha256(bundle.read_bytes()).hexdigest() if bundle else "",
        datasets=(("books", 1),),
        policy_versions={"books": 1},
        policy_documents={"books": policy("books")},
        approval_binding="b" * 64,
        approvals=("olivia",),
        audit_root="0" * 64,
    )
    return dataclasses.replace(order, **over)  # type: ignore[arg-type]


def _tar(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


class Signed:
    """Releases signed as a real site signs them (a passed gate, the site's Ed25519 key)."""

    def __init__(self, root: Path, ca: CertificateAuthority, site: str) -> None:
        ids = ca.site_signer(site, out_dir=signer_dir(root / site))
        self.signer = SiteSigner.from_files(cert=ids.cert, key=ids.key)
        self.root = root
        torch.manual_seed(0)
        self.base = root / "base.safetensors"
        write_tensors(self.base, {"w": torch.randn(4, 4)})

    def release(self, job_id: str) -> Path:
        work = self.root / f"work-{job_id}"
        out = job_output(work, self.base, {"loss": 1.25})
        gate = run_gate(
            out,
            rules=rules(),
            base_layout=layout_from_files([self.base]),
            dest_dir=work / "release",
        )
        gate.require_passed()
        context = ReleaseContext(
            job_id=job_id,
            spec_sha256=SPEC.digest(),
            bundle_sha256=None,
            image_id="sha256:" + "2" * 64,
            datasets={"books": DatasetVersion(version=1, root_hash="3" * 64)},
            policy_versions={"books": 1},
            approval_binding="b" * 64,
            approvals=("olivia",),
            audit=AuditPosition(seq=1, checkpoint_root="5" * 64),
        )
        return sign_release({"books": gate}, context=context, signer=self.signer).directory


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def linked(tmp_path: Path, ca: CertificateAuthority) -> Iterator[LinkedSite]:
    site = FakeSite(tmp_path / "site", name="site-a")
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    link = LinkedSite(tmp_path / "link", site, ca=ca)
    try:
        yield link
    finally:
        link.close()


def _fake(linked: LinkedSite) -> FakeSite:
    assert isinstance(linked.backing, FakeSite)
    return linked.backing


def _run(linked: LinkedSite, order: RunOrder) -> list[SiteReport]:
    reports: list[SiteReport] = []
    linked.run(order, reports.append)
    return reports


def _states(reports: list[SiteReport]) -> list[JobState]:
    return [r.state for r in reports if r.state is not None]


def _stub(linked: LinkedSite, identity: IdentityFiles) -> pb_grpc.SiteLinkStub:
    return pb_grpc.SiteLinkStub(channel(f"localhost:{linked.port}", identity))


def _held(linked: LinkedSite, job_id: str) -> threading.Thread:
    """Start ``job_id`` through the link with the site's gate closed: leased, not ended."""
    _fake(linked).gate.clear()
    t = threading.Thread(target=_run, args=(linked, _order(job_id)), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while linked.links.site_of(job_id) is None or not _leased(linked, job_id):
        assert time.monotonic() < deadline, "the site never took the lease"
        time.sleep(0.02)
    return t


def _leased(linked: LinkedSite, job_id: str) -> bool:
    return any(job_id in s.leases for s in linked.links.sites())


# -- a run, end to end --------------------------------------------------------------------------


def test_a_run_through_the_link_is_released_with_a_release_that_verifies(
    linked: LinkedSite, tmp_path: Path, ca: CertificateAuthority
) -> None:
    signed = Signed(tmp_path / "signed", ca, "site-a")
    fake = _fake(linked)
    plain = fake.script

    def script(order: RunOrder) -> list[SiteReport]:
        reports = plain(order)
        return [
            *reports[:-1],
            dataclasses.replace(reports[-1], release_dir=signed.release(order.job_id)),
        ]

    fake.script = script
    copies: list[bytes] = []

    def report(r: SiteReport) -> None:
        reports.append(r)
        if r.release_dir is not None:  # the dispatcher copies it while the report is applied
            copies.append((r.release_dir / "manifest.json").read_bytes())

    reports: list[SiteReport] = []
    linked.run(_order("job-1"), report)
    assert _states(reports) == [JobState.RUNNING, JobState.CHECKING, JobState.RELEASED]
    assert [r.progress for r in reports if r.progress] == [(1, 2, 1.5)]
    assert {r.site for r in reports} == {"site-a"}
    assert copies and b'"job-1"' in copies[0]
    assert not (tmp_path / "link" / "links" / "incoming" / "job-1").exists()  # taken, then gone


def test_a_release_that_does_not_verify_is_refused_and_the_job_ends_error(
    linked: LinkedSite, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """Signed by another site; or one bit of the weights changed after signing."""
    other = Signed(tmp_path / "other", ca, "site-b")
    mine = Signed(tmp_path / "mine", ca, "site-a")

    def tampered(job_id: str) -> Path:
        d = mine.release(job_id)
        w = next((d / "weights").iterdir())
        blob = bytearray(w.read_bytes())
        blob[-1] ^= 1
        w.write_bytes(bytes(blob))
        return d

    for job_id, make in (("job-other", other.release), ("job-bit", tampered)):
        fake = _fake(linked)
        fake.script = lambda order, make=make: [
            SiteReport(order.job_id, state=JobState.RUNNING),
            SiteReport(order.job_id, state=JobState.RELEASED, release_dir=make(order.job_id)),
        ]
        reports = _run(linked, _order(job_id))
        assert _states(reports) == [JobState.RUNNING, JobState.ERROR], job_id
        assert all(r.release_dir is None for r in reports)
        assert not (tmp_path / "link" / "links" / "incoming" / job_id).exists()
    refused = [a for a in linked.audit if a[1] == "rpc.SiteLink.PushRelease"]
    assert [o for _, _, o in refused] == ["error", "error"]


def test_a_malformed_release_push_is_refused_with_its_fault_named_and_nothing_kept(
    linked: LinkedSite, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """The push itself, hostile or broken, on a lease the site holds: every way of getting the
    stream wrong is refused naming it, audited, and leaves nothing in the gateway's incoming
    area; an honest push on the same lease is taken afterwards."""
    t = _held(linked, "job-push")
    stub = _stub(linked, linked.identity)
    good = Signed(tmp_path / "signed", ca, "site-a").release("job-push")
    files = sorted(p for p in good.rglob("*") if p.is_file())

    def file(rel: str, size: int) -> pb.SiteReleaseChunk:
        return pb.SiteReleaseChunk(file=pb.ReleaseFile(path=rel, size=size))

    def honest() -> list[pb.SiteReleaseChunk]:
        out = [pb.SiteReleaseChunk(job_id="job-push")]
        for p in files:
            out += [file(p.relative_to(good).as_posix(), p.stat().st_size)]
            out += [pb.SiteReleaseChunk(data=p.read_bytes())]
        return out

    first = honest()[1:3]  # the first file's header and bytes
    weights = next(p for p in files if p.suffix == ".safetensors")
    rel = weights.relative_to(good).as_posix()
    cases: dict[str, tuple[list[pb.SiteReleaseChunk], str]] = {
        "no job named first": (honest()[1:], "must name its job"),
        "bytes before a file": (
            [pb.SiteReleaseChunk(job_id="job-push"), pb.SiteReleaseChunk(data=b"x")],
            "beyond the size",
        ),
        "more bytes than announced": (
            [honest()[0], file("a.bin", 1), pb.SiteReleaseChunk(data=b"xy")],
            "beyond the size",
        ),
        "a file cut short": (
            [honest()[0], file("a.bin", 5), pb.SiteReleaseChunk(data=b"x")],
            "ended early",
        ),
        "a file cut short, then another": (
            [honest()[0], file("a.bin", 5), pb.SiteReleaseChunk(data=b"x"), *first],
            "ended early",
        ),
        "the same file twice": ([*honest(), *first], "twice"),
        "a path out of the release": ([honest()[0], file("../escape", 0)], "unsafe path"),
        "an absolute path": ([honest()[0], file("/etc/passwd", 0)], "unsafe path"),
        "a file the manifest does not list": (
            [*honest(), file("extra.txt", 1), pb.SiteReleaseChunk(data=b"x")],
            "not in the manifest",
        ),
        "an empty message": (
            [honest()[0], pb.SiteReleaseChunk()],
            "unexpected empty message",
        ),
    }
    # Built apart: the listed weights file left out, and its bytes changed (same size).
    without = [honest()[0]]
    changed = [honest()[0]]
    for p in files:
        r = p.relative_to(good).as_posix()
        data = p.read_bytes()
        if r != rel:
            without += [file(r, len(data)), pb.SiteReleaseChunk(data=data)]
            changed += [file(r, len(data)), pb.SiteReleaseChunk(data=data)]
        else:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x40
            changed += [file(r, len(data)), pb.SiteReleaseChunk(data=bytes(flipped))]
    cases["a listed file missing"] = (without, "missing")
    cases["weights changed in flight"] = (changed, "expected sha256")
    incoming = tmp_path / "link" / "links" / "incoming"
    for name, (messages, reason) in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.PushRelease(iter(messages), timeout=10)
        assert reason in (e.value.details() or ""), (name, e.value.details())
        assert not any(incoming.rglob("*.safetensors")), name
    pushes = [o for _, a, o in linked.audit if a == "rpc.SiteLink.PushRelease"]
    assert pushes[-len(cases) :] == ["error"] * len(cases)
    answer = stub.PushRelease(iter(honest()), timeout=10)
    assert answer.files == len(files) and answer.bytes == sum(p.stat().st_size for p in files)
    _fake(linked).gate.set()
    t.join(timeout=20)


# -- leases and reports -------------------------------------------------------------------------


def test_reports_apply_in_order_once_and_a_gap_is_refused(linked: LinkedSite) -> None:
    t = _held(linked, "job-seq")
    stub = _stub(linked, linked.identity)
    progress = report_message(SiteReport("job-seq", progress=(1, 10, 2.0)))
    # The site's own run has sent nothing yet (its gate is closed): report 0 is next.
    with pytest.raises(grpc.RpcError) as gap:
        stub.Report(pb.ReportRequest(seq=5, report=progress), timeout=10)
    assert gap.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Report(pb.ReportRequest(seq=0, report=progress), timeout=10).next_seq == 1
    assert stub.Report(pb.ReportRequest(seq=0, report=progress), timeout=10).next_seq == 1
    linked.cancel("job-seq")
    _fake(linked).gate.set()
    t.join(timeout=20)
    assert not t.is_alive()


def test_no_site_speaks_for_another_sites_lease_and_no_other_role_speaks_as_a_site(
    linked: LinkedSite, tmp_path: Path, ca: CertificateAuthority
) -> None:
    t = _held(linked, "job-mine")
    site_b = ca.issue("site-b", role=Role.SITE, out_dir=tmp_path / "b")
    owner = ca.issue("olivia", role=Role.DATA_OWNER, out_dir=tmp_path / "o")
    forged = report_message(
        SiteReport("job-mine", state=JobState.RELEASED, reason=TeamReason.RELEASED)
    )
    b = _stub(linked, site_b)
    for call in (
        lambda: b.Report(pb.ReportRequest(seq=0, report=forged), timeout=10),
        lambda: list(b.FetchBundle(pb.FetchBundleRequest(job_id="job-mine"), timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    o = _stub(linked, owner)
    for call in (
        lambda: o.PullWork(pb.PullWorkRequest(wait_s=0), timeout=10),
        lambda: o.Report(pb.ReportRequest(seq=0, report=forged), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # Nothing of it applied: the run ends as the real site ends it.
    linked.cancel("job-mine")
    _fake(linked).gate.set()
    t.join(timeout=20)
    refusals = [(p, a, o) for p, a, o in linked.audit if o in ("denied", "error")]
    assert ("site-b", "rpc.SiteLink.Report", "error") in refusals
    assert ("olivia", "rpc.SiteLink.PullWork", "denied") in refusals


def test_a_cancel_reaches_the_site_with_the_next_heartbeat(linked: LinkedSite) -> None:
    reports: list[SiteReport] = []
    _fake(linked).gate.clear()
    t = threading.Thread(target=lambda: linked.run(_order("job-c"), reports.append))
    t.start()
    while not _leased(linked, "job-c"):
        time.sleep(0.02)
    linked.cancel("job-c")
    deadline = time.monotonic() + 10
    while "job-c" not in _fake(linked).cancelled:
        assert time.monotonic() < deadline, "the cancel never reached the site"
        time.sleep(0.02)
    _fake(linked).gate.set()
    t.join(timeout=20)
    assert _states(reports)[-1] is JobState.CANCELLED


def test_a_queued_run_cancelled_before_any_site_takes_it_ends_cancelled(
    linked: LinkedSite,
) -> None:
    reports: list[SiteReport] = []
    linked.links.cancel("job-q")  # unknown yet: nothing
    t = threading.Thread(
        target=lambda: linked.links.run("site-nobody", _order("job-q"), reports.append)
    )
    t.start()
    time.sleep(0.2)
    assert linked.links.cancel("job-q")
    t.join(timeout=10)
    assert _states(reports) == [JobState.CANCELLED]


# -- what the site checks before anything runs ----------------------------------------------------


def test_an_order_whose_spec_or_bundle_is_not_the_one_it_names_never_reaches_the_site(
    linked: LinkedSite, tmp_path: Path
) -> None:
    bundle = tmp_path / "code.tgz"
    bundle.write_bytes(b"the bundle the owners approved")
    other = parse_spec(SPEC.canonical_json().decode().replace("testing the site link", "other"))
    swapped_spec = _order("job-spec", spec=other)  # its hash still names SPEC
    swapped_bundle = _order("job-bundle", bundle=bundle, bundle_sha256="9" * 64)
    for order in (swapped_spec, swapped_bundle):
        reports = _run(linked, order)
        assert _states(reports) == [JobState.ERROR], order.job_id
        assert "hash" in reports[-1].detail
    assert _fake(linked).orders == []


def test_a_bundle_is_fetched_and_handed_to_the_site_as_approved(
    linked: LinkedSite, tmp_path: Path
) -> None:
    bundle = tmp_path / "code.tgz"
    bundle.write_bytes(b"x" * (3 << 20))  # several messages
    _fake(linked).script = lambda order: [
        SiteReport(order.job_id, state=JobState.RUNNING),
        SiteReport(order.job_id, state=JobState.FAILED, reason=TeamReason.FAILED_EXIT),
    ]
    reports = _run(linked, _order("job-b", bundle=bundle))
    assert _states(reports)[-1] is JobState.FAILED
    (order,) = _fake(linked).orders
    assert order.bundle_sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    # The site's copy goes once its run has ended (just after its last report).
    deadline = time.monotonic() + 10
    while order.bundle is not None and order.bundle.exists():
        assert time.monotonic() < deadline, "the site kept its copy of the bundle"
        time.sleep(0.02)


# -- faults ---------------------------------------------------------------------------------------


def test_a_silent_site_loses_its_lease_and_the_order_is_never_handed_out_again(
    linked: LinkedSite,
) -> None:
    t = _held(linked, "job-lost")
    linked.link.stop()  # the site goes silent: no heartbeat, no report
    t.join(timeout=20)
    assert not t.is_alive(), "the lease never ran out"
    _fake(linked).gate.set()  # the site's run goes on: what it reports is refused
    # A new connection of the same site gets no work: the order is not leased twice.
    stub = _stub(linked, linked.identity)
    assert not stub.PullWork(pb.PullWorkRequest(wait_s=0.5), timeout=10).HasField("lease")
    hello = stub.Hello(pb.HelloRequest(held=[pb.LeaseState(job_id="job-lost")]), timeout=10)
    assert [(lease.job_id, lease.live) for lease in hello.leases] == [("job-lost", False)]
    with pytest.raises(grpc.RpcError) as e:
        stub.Report(
            pb.ReportRequest(
                seq=0, report=report_message(SiteReport("job-lost", state=JobState.RELEASED))
            ),
            timeout=10,
        )
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_a_site_that_restarts_ends_the_runs_it_held(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    site = FakeSite(tmp_path / "site", name="site-a")
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    site.gate.clear()
    linked = LinkedSite(tmp_path / "link", site, ca=ca, lease_s=30)
    reports: list[SiteReport] = []
    try:
        t = threading.Thread(target=lambda: linked.run(_order("job-r"), reports.append))
        t.start()
        # Leased at the gateway, and on record at the site (it writes the lease down before the
        # order reaches the site; a process that dies before that never held it).
        on_record = linked.identity.cert.parent / "state" / "leases" / "job-r.json"
        while not (_leased(linked, "job-r") and on_record.exists()):
            time.sleep(0.02)
        # The site process dies (its run never reports again); a new one starts on its state.
        linked.link.stop()
        again = linked.client(linked.identity)
        thread = threading.Thread(target=again.serve, daemon=True)
        thread.start()
        t.join(timeout=20)
        again.stop()
        thread.join(timeout=20)
    finally:
        site.gate.set()
        linked.close()
    assert _states(reports) == [JobState.ERROR]
    assert "restarted" in reports[-1].detail


def test_operators_see_each_site_with_its_version_and_the_jobs_it_holds(
    linked: LinkedSite,
) -> None:
    from sealroom.v1 import gateway_pb2

    from gateway._auth import ROLES
    from gateway._servicer import GatewayServicer

    t = _held(linked, "job-seen")
    servicer = GatewayServicer(None, links=linked.links)  # type: ignore[arg-type]
    (site,) = servicer.ListSites(gateway_pb2.ListSitesRequest(), None).sites  # type: ignore[arg-type]
    assert (site.name, site.version, site.slots, site.connected) == (
        "site-a",
        "sealroom-site/1",
        4,
        True,
    )
    assert list(site.leases) == ["job-seen"] and site.last_seen.endswith("+00:00")
    assert ROLES["ListSites"] == {Role.OPERATOR, Role.COMPLIANCE}  # not the teams, not sites
    linked.cancel("job-seen")
    _fake(linked).gate.set()
    t.join(timeout=20)


# -- two logs, one story --------------------------------------------------------------------------


def _site_checkpoints(linked: LinkedSite) -> list[dict[str, object]]:
    return [dict(r.event.details) for r in linked.gateway_log.query(action="site.checkpoint")]


def test_the_sites_own_log_records_its_run_and_the_gateway_records_its_checkpoint(
    linked: LinkedSite,
) -> None:
    reports = _run(linked, _order("job-logged"))
    assert _states(reports)[-1] in (JobState.RELEASED, JobState.ERROR)
    site_actions = [r.event.action for r in linked.site_log.query(job="job-logged")]
    assert site_actions[0] == "site.lease" and "container.start" in site_actions
    assert {r.event.principal for r in linked.site_log.query(job="job-logged")} == {"site-a"}
    # The gateway holds a checkpoint of the site's log at its size after the run.
    deadline = time.monotonic() + 10
    while not any(
        c["size"] == len(linked.site_log.query(limit=10**6)) for c in _site_checkpoints(linked)
    ):
        assert time.monotonic() < deadline, "no checkpoint of the site's log reached the gateway"
        time.sleep(0.05)
    last = _site_checkpoints(linked)[-1]
    assert last["root"] == linked.site_log.root(int(str(last["size"]))).hex()


def test_a_site_cannot_rewrite_or_shrink_its_checkpointed_log_nor_sign_as_another_site(
    linked: LinkedSite, tmp_path: Path, ca: CertificateAuthority
) -> None:
    from enclave.audit import AuditEvent, AuditLog, SignedCheckpoint
    from enclave.link import open_site_audit

    _run(linked, _order("job-honest"))
    deadline = time.monotonic() + 10
    while not _site_checkpoints(linked):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held = int(str(_site_checkpoints(linked)[-1]["size"]))
    # A rewritten log: the same site key, other records, more of them than checkpointed.
    forged, cert = open_site_audit(tmp_path / "forged.db", linked.signer)
    for i in range(held + 2):
        forged.append(AuditEvent("site-a", "site", "container.start", "ok", job_id=f"job-{i}"))
    rewritten = forged.checkpoint()
    other_site = ca.site_signer("site-b", out_dir=tmp_path / "b")
    foreign, foreign_cert = open_site_audit(tmp_path / "b.db", other_site)
    for r in linked.site_log.query(limit=10**6):
        foreign.append(r.event)
    stub = _stub(linked, linked.identity)

    def push(cp: SignedCheckpoint, signer_cert: str, log: AuditLog) -> grpc.StatusCode:
        leaves = list(log.leaves(held, cp.size)) if cp.size > held else []
        with pytest.raises(grpc.RpcError) as e:
            stub.PushAudit(
                iter(
                    [
                        pb.SiteAuditChunk(
                            header=pb.SiteAuditHeader(
                                size=cp.size,
                                root=cp.root,
                                time=cp.time,
                                signature=cp.signature,
                                signer_cert=signer_cert,
                                from_size=held,
                            )
                        ),
                        pb.SiteAuditChunk(records=pb.SiteAuditRecords(leaves=leaves)),
                    ]
                ),
                timeout=10,
            )
        return e.value.code()

    before = _site_checkpoints(linked)
    copy = linked.site_audits.log("site-a")
    copied = copy.size()
    assert push(rewritten, cert, forged) == grpc.StatusCode.DATA_LOSS  # its root is not the copy's
    shrunk = AuditLog(tmp_path / "shrunk.db", signing_key=forged._key)  # type: ignore[attr-defined]
    shrunk.append(AuditEvent("site-a", "site", "site.lease", "ok", job_id="job-x"))
    assert push(shrunk.checkpoint(), cert, shrunk) == grpc.StatusCode.DATA_LOSS
    assert push(foreign.checkpoint(), foreign_cert, foreign) == grpc.StatusCode.DATA_LOSS
    assert _site_checkpoints(linked) == before  # nothing of it recorded
    assert copy.size() == copied and copy.verify().size == copied  # nor copied
    pushes = [o for _, a, o in linked.audit if a == "rpc.SiteLink.PushAudit"]
    assert pushes[-3:] == ["error", "error", "error"]  # each refusal audited
    for log in (forged, shrunk, foreign):
        log.close()
