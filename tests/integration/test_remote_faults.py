"""Faults of a remote site and of its gateway: what must hold when either dies mid-run.

- **A gateway restarted mid-run loses no lease** (its leases are on record, ``leases.db``): the
  site reconnects with backoff, its reports carry on at the number on record, and the run ends
  as the site ends it; a lease whose site never comes back ends ERROR ``lease_s`` later and is
  never granted again, by this gateway or any later one. Shown first with the real link over
  mTLS and a scripted site (the gateway's side stopped and built again on the same root and
  port), then with real processes killed by PID.
- **A site killed with SIGKILL mid-run** leaves no container and no decrypted byte once it comes
  back, and the job ends ERROR, saying the site restarted; it never runs twice.
- **A gateway killed and started again on its port** is rejoined by its site, which then runs
  the next job.

The real-process tests need Docker and root, as the other Docker tests.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave._sitekeys import site_secret
from enclave.contract import RunOrder, SiteReport
from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from enclave.link import SiteLink, channel
from gateway._auth import AuthInterceptor
from gateway._linkservicer import SiteLinkServicer
from gateway._sitelink import SiteLinks
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.channels import TeamReason
from policies.identity import Role
from policies.lifecycle import JobState
from tests.integration._deployment import PEOPLE, policy
from tests.integration._remote import Serving, sealroom, site_home, wait_for_dataset
from tests.unit.test_site_link import Signed, _order, _tar
from trainers.synthetic import write_corpus

# -- the gateway's side, stopped and built again on the same root and port ------------------------


class LinkGateway:
    """The gateway's side of the link alone: :class:`SiteLinks` on ``root`` behind the real
    servicer and interceptor, on ``port`` (0: any). :meth:`die` stands for the process dying:
    the server goes at once and the links stop acting; what is on record stays."""

    def __init__(
        self,
        root: Path,
        ca: CertificateAuthority,
        *,
        port: int = 0,
        servicer: type[SiteLinkServicer] = SiteLinkServicer,
    ) -> None:
        self.links = SiteLinks(root / "links", lease_s=3.0, heartbeat_s=0.3)
        ids = root / "gw-id"
        if not (ids / "gateway.pem").exists():
            ca.issue("gateway", role=Role.OPERATOR, out_dir=ids, server_names=("localhost",))
        cert, key, ca_pem = IdentityFiles(
            cert=ids / "gateway.pem", key=ids / "gateway.key", ca_cert=ca.cert_path
        ).read()
        self.audit: list[tuple[str, str, str]] = []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            interceptors=[AuthInterceptor(self._record)],
        )
        pb_grpc.add_SiteLinkServicer_to_server(
            servicer(
                self.links,
                ca_cert_pem=ca_pem,
                max_release_bytes=1 << 30,
                push_dataset=lambda *_: None,
            ),
            self.server,
        )
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca_pem, require_client_auth=True
        )
        self.port = self.server.add_secure_port(f"localhost:{port}", creds)
        assert self.port, f"port {port} could not be bound again"
        self.server.start()

    def _record(self, principal: Any, action: str, **kw: Any) -> int:
        self.audit.append((principal.name, action, kw.get("outcome", "")))
        return len(self.audit)

    def die(self) -> None:
        self.server.stop(0).wait()
        self.links.close()


class Paused:
    """A scripted run: RUNNING and one progress point, then it waits for ``go``, then a second
    point, CHECKING and a release signed as the site signs it."""

    def __init__(self, signed: Signed) -> None:
        self.go = threading.Event()
        self.signed = signed

    def __call__(self, order: RunOrder) -> Iterator[SiteReport]:
        job = order.job_id
        yield SiteReport(job, state=JobState.RUNNING)
        yield SiteReport(job, progress=(1, 4, 2.0))
        assert self.go.wait(60), "the test never let the run go on"
        yield SiteReport(job, progress=(2, 4, 1.5))
        yield SiteReport(job, state=JobState.CHECKING)
        yield SiteReport(
            job,
            state=JobState.RELEASED,
            reason=TeamReason.RELEASED,
            release_dir=self.signed.release(job),
        )


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def fake(tmp_path: Path) -> FakeSite:
    site = FakeSite(tmp_path / "site", name="site-a")
    site.store_dataset("books", archive=_tar({"a.txt": b"hello"}))
    return site


@contextlib.contextmanager
def _site(fake: FakeSite, ca: CertificateAuthority, root: Path, port: int) -> Iterator[SiteLink]:
    ids = root / "site-id"
    identity = (
        ca.issue("site-a", role=Role.SITE, out_dir=ids)
        if not (ids / "site-a.pem").exists()
        else IdentityFiles(cert=ids / "site-a.pem", key=ids / "site-a.key", ca_cert=ca.cert_path)
    )
    link = SiteLink(fake, address=f"localhost:{port}", identity=identity, state=root / "state")
    t = threading.Thread(target=link.serve, daemon=True)
    t.start()
    assert link.connected.wait(30), "the site never connected"
    try:
        yield link
    finally:
        link.stop()


def _follow(target: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(target(*args)), daemon=True)
    t.start()
    return t, out


def _until(what: str, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _states(reports: list[SiteReport]) -> list[JobState]:
    return [r.state for r in reports if r.state is not None]


def test_a_gateway_restarted_mid_run_takes_up_the_lease_and_the_run_ends_as_the_site_ends_it(
    tmp_path: Path, ca: CertificateAuthority, fake: FakeSite
) -> None:
    paused = Paused(Signed(tmp_path / "signed", ca, "site-a"))
    fake.script = paused  # type: ignore[assignment]
    gw = LinkGateway(tmp_path / "gw", ca)
    before: list[SiteReport] = []
    after: list[SiteReport] = []
    released: list[bytes] = []

    def report(r: SiteReport) -> None:
        after.append(r)
        if r.release_dir is not None:  # as the dispatcher copies it while applying the report
            released.append((r.release_dir / "manifest.json").read_bytes())

    with _site(fake, ca, tmp_path, gw.port):
        first, _ = _follow(gw.links.run, "site-a", _order("job-r"), before.append)
        _until("the run never reported", lambda: len(before) == 2)
        gw.die()
        first.join(timeout=10)  # the old dispatcher's worker: gone with its process
        time.sleep(1.0)  # down for a while: the site's heartbeats fail (its one slot is busy)
        gw = LinkGateway(tmp_path / "gw", ca, port=gw.port)
        assert gw.links.held() == ["job-r"]
        second, resumed = _follow(gw.links.resume, "job-r", report)
        paused.go.set()
        second.join(timeout=60)
        assert resumed == [True]
        # Nothing lost, nothing twice: two reports before the restart, the rest after it,
        # continuing at the number on record; the release pushed to the new process.
        assert _states(before) == [JobState.RUNNING]
        assert [r.progress for r in before if r.progress] == [(1, 4, 2.0)]
        assert [r.progress for r in after if r.progress] == [(2, 4, 1.5)]
        assert _states(after) == [JobState.CHECKING, JobState.RELEASED]
        assert released and b'"job-r"' in released[0]
        assert fake.runs["job-r"] == 1
        # It noticed the gateway gone (a heartbeat failed), reconnected with backoff and said
        # hello to the new process, naming the lease it holds.
        _until("no hello", lambda: ("site-a", "rpc.SiteLink.Hello", "allowed") in gw.audit)
        # Once ended, never again: this process and any later one refuse the job id.
        again: list[SiteReport] = []
        gw.links.run("site-a", _order("job-r"), again.append)
        assert _states(again) == [JobState.ERROR] and "never repeated" in again[0].detail
    gw.die()
    later = SiteLinks(tmp_path / "gw" / "links", lease_s=3.0, heartbeat_s=0.3)
    try:
        again = []
        later.run("site-a", _order("job-r"), again.append)
        assert _states(again) == [JobState.ERROR]
    finally:
        later.close()


class _DiesMidPush(SiteLinkServicer):
    """A gateway that takes the first message of a release push and then stops answering:
    its test kills it there, with the push half done."""

    pushing = threading.Event()

    def PushRelease(self, request_iterator: Any, context: Any) -> pb.PushReleaseResponse:
        def until_killed() -> Iterator[pb.SiteReleaseChunk]:
            for msg in request_iterator:
                yield msg
                if msg.WhichOneof("part") == "data":  # a file's bytes written, then it stops
                    self.pushing.set()
                    while context.is_active():
                        time.sleep(0.01)
                    raise RuntimeError("killed mid-push")

        return super().PushRelease(until_killed(), context)


def test_a_gateway_killed_during_a_release_push_gets_the_release_again_from_the_site(
    tmp_path: Path, ca: CertificateAuthority, fake: FakeSite
) -> None:
    """The push is cut off by the gateway's death: the site pushes the release again, whole,
    to the gateway that comes back on the port, and the run ends RELEASED there, once."""
    paused = Paused(Signed(tmp_path / "signed", ca, "site-a"))
    paused.go.set()
    fake.script = paused  # type: ignore[assignment]
    _DiesMidPush.pushing.clear()
    gw = LinkGateway(tmp_path / "gw", ca, servicer=_DiesMidPush)
    after: list[SiteReport] = []
    released: list[bytes] = []

    def report(r: SiteReport) -> None:
        after.append(r)
        if r.release_dir is not None:
            released.append((r.release_dir / "manifest.json").read_bytes())

    with _site(fake, ca, tmp_path, gw.port):
        first, _ = _follow(gw.links.run, "site-a", _order("job-p"), lambda r: None)
        _until("the release push never started", _DiesMidPush.pushing.is_set)
        incoming = tmp_path / "gw" / "links" / "incoming" / "job-p"
        assert [p for p in incoming.rglob("*") if p.is_file()]  # half a release written
        gw.die()
        first.join(timeout=10)
        _until("the cut-off push was kept", lambda: not incoming.exists())
        gw = LinkGateway(tmp_path / "gw", ca, port=gw.port)
        second, resumed = _follow(gw.links.resume, "job-p", report)
        second.join(timeout=60)
        assert resumed == [True]
        assert _states(after)[-1] is JobState.RELEASED, [(r.state, r.detail) for r in after]
        assert released and b'"job-p"' in released[0]
        assert fake.runs["job-p"] == 1
        pushes = [o for _, a, o in gw.audit if a == "rpc.SiteLink.PushRelease"]
        assert pushes == ["allowed"]  # pushed again, whole, to the gateway that came back
    gw.die()


def test_a_lease_whose_site_never_comes_back_ends_error_after_a_restart_and_is_never_granted_again(
    tmp_path: Path, ca: CertificateAuthority, fake: FakeSite
) -> None:
    fake.gate.clear()
    gw = LinkGateway(tmp_path / "gw", ca)
    try:
        with _site(fake, ca, tmp_path, gw.port):
            _follow(gw.links.run, "site-a", _order("job-lost"), lambda r: None)
            _until("never leased", lambda: bool(fake.orders))
        # The site has gone (stopped: no heartbeat, no report); then the gateway dies too.
        gw.die()
        gw = LinkGateway(tmp_path / "gw", ca, port=gw.port)
        reports: list[SiteReport] = []
        started = time.monotonic()
        assert gw.links.resume("job-lost", reports.append)
        assert time.monotonic() - started >= 2.5  # lease_s from the restart, not at once
        assert _states(reports) == [JobState.ERROR]
        assert "stopped answering" in reports[0].detail
        stub = pb_grpc.SiteLinkStub(channel(f"localhost:{gw.port}", _site_identity(tmp_path, ca)))
        assert not stub.PullWork(pb.PullWorkRequest(wait_s=0.5), timeout=10).HasField("lease")
        hello = stub.Hello(pb.HelloRequest(held=[pb.LeaseState(job_id="job-lost")]), timeout=10)
        assert [(s.job_id, s.live) for s in hello.leases] == [("job-lost", False)]
    finally:
        fake.gate.set()
        gw.die()


def test_a_lease_nobody_takes_up_after_a_restart_ends_and_its_site_stops_the_run(
    tmp_path: Path, ca: CertificateAuthority, fake: FakeSite
) -> None:
    """The restarted gateway ended the job itself (a run it did not take up): the site's
    reports are answered UNAVAILABLE, never applied, until the lease runs out; then they are
    refused as ended and the site cancels the run."""
    fake.gate.clear()
    gw = LinkGateway(tmp_path / "gw", ca)
    try:
        with _site(fake, ca, tmp_path, gw.port):
            _follow(gw.links.run, "site-a", _order("job-orphan"), lambda r: None)
            _until("never leased", lambda: bool(fake.orders))
            gw.die()
            gw = LinkGateway(tmp_path / "gw", ca, port=gw.port)
            fake.gate.set()  # the site's run goes on and reports: nobody applies them
            _until("the site never stopped the run", lambda: "job-orphan" in fake.cancelled)
            assert gw.links.held() == []
            refused = [a for a in gw.audit if a[1] == "rpc.SiteLink.Report"]
            assert refused and {o for _, _, o in refused} == {"error"}
    finally:
        fake.gate.set()
        gw.die()


def test_a_job_leased_but_not_yet_reported_is_taken_up_by_the_restarted_dispatcher_not_leased_again(
    tmp_path: Path, ca: CertificateAuthority, fake: FakeSite
) -> None:
    """The store still shows it QUEUED, so the restarted dispatcher runs it again: the run
    takes up the live lease instead of granting a second one."""
    fake.gate.clear()
    fake.script = lambda order: [
        SiteReport(order.job_id, state=JobState.RUNNING),
        SiteReport(order.job_id, state=JobState.FAILED, reason=TeamReason.FAILED_EXIT),
    ]
    gw = LinkGateway(tmp_path / "gw", ca)
    try:
        with _site(fake, ca, tmp_path, gw.port):
            _follow(gw.links.run, "site-a", _order("job-q"), lambda r: None)
            _until("never leased", lambda: bool(fake.orders))
            gw.die()
            gw = LinkGateway(tmp_path / "gw", ca, port=gw.port)
            reports: list[SiteReport] = []
            t, _ = _follow(gw.links.run, "site-a", _order("job-q"), reports.append)
            fake.gate.set()
            t.join(timeout=30)
            assert _states(reports) == [JobState.RUNNING, JobState.FAILED]
            assert fake.runs["job-q"] == 1 and len(fake.orders) == 1
    finally:
        fake.gate.set()
        gw.die()


def _site_identity(root: Path, ca: CertificateAuthority) -> IdentityFiles:
    ids = root / "site-id"
    return IdentityFiles(cert=ids / "site-a.pem", key=ids / "site-a.key", ca_cert=ca.cert_path)


# -- real processes, killed by PID ---------------------------------------------------------------

SPEC = """\
name: faults
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters: {{max_steps: {steps}, batch_size: 2, block_size: 32, seed: 0}}
resources: {{cpus: 1, memory_mb: 1536, timeout_s: 600}}
"""
CANARY = "zq-canary-3d1f0e77-staged-only-for-a-run"


class Deployment:
    """A gateway (``sealroom up``) and a remote site (``sealroom site join``), each its own
    process and home; the owner's corpus registered at the site."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gw_home = root / "gateway-home"
        ca = CertificateAuthority.init(self.gw_home / "ca")
        self.people = {
            name: ca.issue(name, role=role, team=team, out_dir=self.gw_home / "identities")
            for name, (role, team) in PEOPLE.items()
        }
        self.site_home = site_home(root, ca, "hospital")
        books = root / "books"
        write_corpus(books, documents=4, seed=7)
        (books / "book-canary.txt").write_text(f"The ledger said {CANARY}.\n")
        done = subprocess.run(
            sealroom(
                self.site_home, "site", "dataset", "register", "books", str(books),
                "--owner", "olivia", "--json",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        self.port = 0
        self._policy = False
        self.gateway: Serving | None = None
        self.site: Serving | None = None

    def start_gateway(self) -> None:
        self.gateway = Serving(
            sealroom(self.gw_home, "up", "--address", f"localhost:{self.port}", "--json"),
            self.root / "gw.log",
        )
        self.port = int(str(self.gateway.doc["port"]))

    def start_site(self) -> None:
        self.site = Serving(
            sealroom(
                self.site_home, "site", "join", f"localhost:{self.port}",
                "--name", "hospital", "--json",
            ),
            self.root / "site.log",
        )  # fmt: skip

    def client(self, who: str) -> Client:
        return Client(f"localhost:{self.port}", self.people[who])

    def submit(self, steps: int) -> str:
        with self.client("olivia") as owner, self.client("theo") as team:
            wait_for_dataset(owner, "books")
            if not self._policy:
                owner.put_policy("books", policy("books", memorization=False))
                self._policy = True
            job = team.submit(SPEC.format(steps=steps))
            assert job.state == "PENDING_APPROVAL", job.reasons
            owner.decide(job.id, approve=True, reason="test")
            return job.id

    def wait_state(self, job_id: str, states: set[str], timeout: float = 600) -> Any:
        deadline = time.monotonic() + timeout
        with self.client("olivia") as owner:
            while True:
                job = owner.job(job_id)
                if job.state in states:
                    return job
                assert time.monotonic() < deadline, (job.state, job.details)
                time.sleep(0.5)

    def close(self) -> None:
        for s in (self.site, self.gateway):
            if s is not None and s.proc.poll() is None:
                s.kill()


@pytest.fixture
def deployment(tmp_path: Path, runtime_image: str) -> Iterator[Deployment]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.close()


def _containers(d: Deployment) -> list[str]:
    """This deployment's site's containers (by its instance label: other deployments on the
    same engine may name a site the same)."""
    instance = site_secret(d.site_home / "site" / "keys" / "instance.id")[:8].hex()
    out = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label=org.sealroom.site-instance={instance}",
            "--format",
            '{{.ID}} {{.Status}} {{.Label "org.sealroom.job"}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def _our_mounts(below: Path) -> list[str]:
    real = os.path.realpath(below)
    with open("/proc/self/mountinfo") as f:
        return [
            line.split()[4]
            for line in f
            if line.split()[4].startswith(real + "/") and " - " in line and "sealroom-" in line
        ]


def _audit(d: Deployment, **query: Any) -> list[Any]:
    with d.client("carol") as carol:
        return list(carol.audit_query(**query))


@pytest.mark.docker
def test_a_site_killed_mid_run_leaves_nothing_behind_and_its_job_ends_error_never_run_twice(
    deployment: Deployment,
) -> None:
    d = deployment
    d.start_gateway()
    d.start_site()
    job = d.submit(steps=5000)  # long enough to be killed while it trains
    d.wait_state(job, {"RUNNING"})
    _until("no container ever ran", lambda: bool(_containers(d)), timeout=120)
    # The run's data is decrypted in a staging tmpfs while the container runs.
    assert _our_mounts(d.site_home / "site"), "no staging mount while the job runs"
    assert d.site is not None
    d.site.kill()
    left = _containers(d)
    assert left, "the kill took the container with it: nothing to show"
    d.start_site()  # the same home: it wipes what the dead process left, then says hello
    ended = d.wait_state(job, {"ERROR", "RELEASED", "FAILED", "CANCELLED", "REJECTED"})
    assert ended.state == "ERROR"
    assert any("site restarted" in x for x in ended.details), ended.details
    assert _containers(d) == [], left
    assert _our_mounts(d.site_home / "site") == []
    needle = CANARY.encode()
    assert [
        p for p in d.site_home.rglob("*") if p.is_file() and needle in p.read_bytes()
    ] == []  # kept encrypted in the vault only
    starts = _audit(d, job_id=job, action="container.start")
    assert len(starts) == 1, starts  # never run twice
    assert d.site is not None
    d.site.stop()
    assert d.gateway is not None
    d.gateway.stop()


@pytest.mark.docker
def test_a_gateway_killed_and_started_again_on_its_port_is_rejoined_and_runs_the_next_job(
    deployment: Deployment,
) -> None:
    d = deployment
    d.start_gateway()
    d.start_site()
    with d.client("olivia") as owner:
        wait_for_dataset(owner, "books")
    assert d.gateway is not None
    d.gateway.kill()
    time.sleep(2)  # the site finds the gateway gone and backs off
    d.start_gateway()  # the same home, the same port
    hellos = lambda: [  # noqa: E731
        r for r in _audit(d, action="rpc.SiteLink.Hello") if r.event.principal == "hospital"
    ]
    _until("the site never said hello again", lambda: len(hellos()) >= 2, timeout=60)
    job = d.submit(steps=3)
    assert d.wait_state(job, {"RELEASED", "ERROR", "FAILED"}).state == "RELEASED"
    assert d.site is not None
    d.site.stop()
    d.gateway.stop()


@pytest.mark.docker
def test_a_gateway_killed_mid_run_loses_no_job_and_the_run_ends_as_the_site_ends_it(
    deployment: Deployment,
) -> None:
    d = deployment
    d.start_gateway()
    d.start_site()
    job = d.submit(steps=40)
    d.wait_state(job, {"RUNNING"})
    _until("no container ever ran", lambda: bool(_containers(d)), timeout=120)
    assert d.gateway is not None
    d.gateway.kill()
    d.start_gateway()
    ended = d.wait_state(job, {"RELEASED", "ERROR", "FAILED", "REJECTED"})
    assert ended.state == "RELEASED", ended.details
    assert len(_audit(d, job_id=job, action="container.start")) == 1
    assert d.site is not None
    d.site.stop()
    d.gateway.stop()
