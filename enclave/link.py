"""A site's side of the site link: dial out to the gateway, pull leased run orders, run each at
this site, report back (``proto/sealroom/v1/site.proto``; the gateway's side is
:mod:`gateway._sitelink`).

:class:`SiteLink` drives any :class:`enclave.contract.Site` (a :class:`enclave.agent.SiteAgent`
in a deployment, :class:`enclave.fake.FakeSite` in tests). The site listens on no port.

- **Connect, and again.** Every (re)connection starts with ``Hello``, naming the leases this
  site has on record; a failed call (a long poll, or a heartbeat while every slot is busy)
  backs off (0.2 s doubling to 10 s, jittered; gRPC's own reconnection is capped the same) and
  connects again. Reports are repeated until acknowledged, across a gateway's restart too: the
  gateway keeps each lease's next number on record and applies each number once.
- **Leases on record.** A lease is written under ``<state>/leases/`` before its order reaches
  the site and removed once its last report is acknowledged. A site process that died with
  leases on record wipes what its runs left (the site does that when it opens) and reports each
  live one ``ERROR`` when it next says hello: the job ends, clearly, and is never run again.
- **Checked before it runs.** The order's spec must hash to the hash it names, and a fetched
  bundle to the order's bundle hash; otherwise the run ends ``ERROR`` before the site sees it.
- **A lease the gateway ended** (it refuses a report as ended) is cancelled here.
- **A release goes first**: ``PushRelease`` streams the signed release, then the report that
  names it follows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave.audit import AuditEvent, AuditLog
from enclave.contract import Site, SiteReport, StoredDataset
from enclave.federated import RoundSite
from enclave.federated._serve import RoundServer
from enclave.identity import IdentityFiles
from enclave.linkwire import order_from_json, report_message
from enclave.provenance import SiteSigner
from enclave.writebehind import WriteBehind
from policies.channels import TeamReason
from policies.errors import InvalidInput, SealroomError
from policies.identity import Role
from policies.lifecycle import JobState

VERSION = "sealroom-site/1"
CHUNK = 1 << 20
_AUDIT_BATCH = 1024  # records a message when pushing the site's log (~0.5 MB)
PULL_WAIT_S = 20.0
MAX_BACKOFF_S = 10.0
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_ENDED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class PushedDataset:
    """A dataset version this site keeps, as the gateway learns of it."""

    stored: StoredDataset
    owner: str
    description: str = ""


def channel(address: str, identity: IdentityFiles) -> grpc.Channel:
    cert, key, ca = identity.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(
        address,
        creds,
        options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC's own reconnect backoff grows to two minutes by default: a gateway back
            # after a restart would wait that long for its sites. Ours (below) tops at 10 s.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
        ],
    )


def push_datasets(stub: pb_grpc.SiteLinkStub, datasets: Iterable[PushedDataset]) -> int:
    """Tell the gateway of each dataset version (idempotent); the number pushed."""
    n = 0
    for d in datasets:
        s = d.stored
        stub.PushDataset(
            pb.PushDatasetRequest(
                name=s.name,
                version=s.version,
                owner=d.owner,
                root_hash=s.root_hash,
                size=s.size,
                files=[pb.StoredFile(path=p, size=z, sha256=h) for p, z, h in s.files],
                description=d.description,
            ),
            timeout=30,
        )
        n += 1
    return n


class SiteLink:
    """Serve ``site`` to the gateway at ``address`` until :meth:`stop` (see the module)."""

    def __init__(
        self,
        site: Site,
        *,
        address: str,
        identity: IdentityFiles,
        state: Path,
        slots: int = 1,
        image_id: str = "",
        datasets: Callable[[], Iterable[PushedDataset]] = lambda: (),
        audit: AuditLog | None = None,
        audit_cert: str = "",
        rounds: RoundSite | None = None,
    ) -> None:
        self.site = site
        self._state = state
        self.rounds = rounds  # this site's part in federated rounds (None: it takes none)
        # The site's own audit log (signed with its release-signing key, whose certificate is
        # audit_cert): what happens here is recorded here first, then told to the gateway.
        self._audit = audit
        self._audit_cert = audit_cert
        self._audit_size = 0  # the last size the gateway holds (from its hello)
        self._audit_lock = threading.Lock()
        self.address = address
        self.identity = identity
        self.slots = slots
        self.image_id = image_id
        self._datasets = datasets
        self._leases = state / "leases"
        self._bundles = state / "bundles"
        for d in (self._leases, self._bundles):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._channel = channel(address, identity)
        self._stub = pb_grpc.SiteLinkStub(self._channel)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._free = threading.Semaphore(slots)
        self.heartbeat_s = 5.0
        self.connected = threading.Event()

    # -- life ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Connect, pull and run until :meth:`stop`; returns once the runs it started ended."""
        beat = threading.Thread(target=self._heartbeats, name="site-heartbeat", daemon=True)
        beat.start()
        if self.rounds is not None:
            server = RoundServer(
                self._stub, self.rounds, state=self._state, record=self._record, stop=self._stop
            )
            threading.Thread(target=server.serve, name="site-rounds", daemon=True).start()
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._hello()
                backoff = 0.2
                self._pull_until_stopped()
            except grpc.RpcError as e:
                self.connected.clear()
                if e.code() not in _RETRY:
                    raise
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        for t in list(self._running.values()):
            t.join()
        beat.join(timeout=self.heartbeat_s + 1)
        self._channel.close()

    def stop(self) -> None:
        self._stop.set()

    def _hello(self) -> None:
        held = sorted(p.stem for p in self._leases.glob("*.json"))
        answer = self._stub.Hello(
            pb.HelloRequest(
                version=VERSION,
                image_id=self.image_id,
                slots=self.slots,
                held=[pb.LeaseState(job_id=j) for j in held],
            ),
            timeout=30,
        )
        self.heartbeat_s = answer.heartbeat_s or self.heartbeat_s
        self._audit_size = answer.audit_size
        push_datasets(self._stub, self._datasets())
        for lease in answer.leases:
            with self._lock:
                mine = lease.job_id in self._running
            if mine:
                continue  # a run of this process, still going: its reports carry on
            if lease.live:  # left by a process that died: end it, clearly
                report = SiteReport(
                    lease.job_id,
                    state=JobState.ERROR,
                    reason=TeamReason.ERROR,
                    detail="the site restarted during the run; its staging and containers "
                    "were wiped",
                )
                self._send(lease.job_id, lease.next_seq, report_message(report))
            (self._leases / f"{lease.job_id}.json").unlink(missing_ok=True)
        self._push_audit()
        self.connected.set()

    def _pull_until_stopped(self) -> None:
        while not self._stop.is_set():
            if not self._free.acquire(timeout=1.0):
                if not self.connected.is_set():
                    return  # every slot busy, and a heartbeat lost the gateway: hello again
                continue
            try:
                got = self._pull()
            except BaseException:
                self._free.release()
                raise
            if got is None or not got.HasField("lease"):
                self._free.release()
                continue
            lease = got.lease
            (self._leases / f"{lease.job_id}.json").write_text(json.dumps({"job_id": lease.job_id}))
            self._record(lease.job_id, SiteReport(lease.job_id, audit_action="site.lease"))
            t = threading.Thread(target=self._run, args=(lease,), name=f"run-{lease.job_id}")
            with self._lock:
                self._running[lease.job_id] = t
            t.start()

    def _pull(self) -> pb.PullWorkResponse | None:
        """One long poll, given up (None) as soon as the link is stopped."""
        call = self._stub.PullWork.future(
            pb.PullWorkRequest(wait_s=PULL_WAIT_S), timeout=PULL_WAIT_S + 10
        )
        while not call.done():
            if self._stop.wait(0.2):
                call.cancel()
                return None
        return call.result()

    def _heartbeats(self) -> None:
        """Every ``heartbeat_s`` (the gateway's, from its hello) while connected."""
        while not self._stop.is_set():
            if not self.connected.wait(timeout=0.5):
                continue
            if self._stop.wait(self.heartbeat_s):
                return
            try:
                answer = self._stub.Heartbeat(pb.HeartbeatRequest(), timeout=self.heartbeat_s * 2)
            except grpc.RpcError as e:
                if e.code() in _RETRY:  # the gateway is gone (or restarting): say hello again
                    self.connected.clear()
                continue  # the pull loop reconnects, with backoff
            for job_id in answer.cancel:
                self.site.cancel(job_id)

    # -- one run --------------------------------------------------------------------------------

    def _run(self, lease: pb.Lease) -> None:
        job_id = lease.job_id
        seq = _Counter()
        bundle = self._bundles / f"{job_id}.tar.gz"
        ended = False
        undelivered = False

        def report(r: SiteReport) -> None:
            nonlocal ended
            if ended:
                return
            self._record(job_id, r)
            if r.release_dir is not None:
                self._push_release(job_id, r.release_dir)
            if not self._send(job_id, seq.take(), report_message(r)):
                ended = True
                self.site.cancel(job_id)  # the gateway ended the lease: stop the run here

        try:
            try:
                order = order_from_json(
                    lease.order_json,
                    bundle=self._fetch(lease, bundle) if lease.has_bundle else None,
                )
            except (InvalidInput, SealroomError) as e:
                report(
                    SiteReport(job_id, state=JobState.ERROR, reason=TeamReason.ERROR, detail=str(e))
                )
                return
            self.site.run(order, report)
        except Exception as e:  # the site could not report at all: the run's ERROR
            if not ended:
                try:
                    report(
                        SiteReport(
                            job_id,
                            state=JobState.ERROR,
                            reason=TeamReason.ERROR,
                            detail=f"the site failed: {type(e).__name__}",
                        )
                    )
                except grpc.RpcError:
                    # The gateway is out of reach (or this link is stopping): the lease stays on
                    # record, and the next hello, of this process or the next, ends it.
                    undelivered = True
        finally:
            with contextlib.suppress(grpc.RpcError):
                self._push_audit()  # else with the next hello
            bundle.unlink(missing_ok=True)
            if not undelivered:
                (self._leases / f"{job_id}.json").unlink(missing_ok=True)
            with self._lock:
                self._running.pop(job_id, None)
            self._free.release()

    def _record(self, job_id: str, r: SiteReport) -> None:
        """Append a report's audit event to the site's own log (durable before it is sent)."""
        if self._audit is None or not r.audit_action:
            return
        self._audit.append(
            AuditEvent(
                principal=self.site.name,
                role=Role.SITE.value,
                action=r.audit_action,
                outcome=r.audit_outcome,
                job_id=job_id,
                dataset=r.audit_dataset or None,
                file=r.audit_file or None,
                details=dict(r.details),
            )
        )

    def _push_audit(self) -> None:
        """Push a signed checkpoint of the site's log with the records it adds to those the
        gateway holds (nothing when it holds this size already)."""
        if self._audit is None:
            return
        with self._audit_lock:
            cp = self._audit.checkpoint()
            if cp.size == self._audit_size:
                return
            held = self._audit_size
            log = self._audit

            def chunks() -> Iterator[pb.SiteAuditChunk]:
                yield pb.SiteAuditChunk(
                    header=pb.SiteAuditHeader(
                        size=cp.size,
                        root=cp.root,
                        time=cp.time,
                        signature=cp.signature,
                        signer_cert=self._audit_cert,
                        from_size=held,
                    )
                )
                batch: list[bytes] = []
                for leaf in log.leaves(held, cp.size):
                    batch.append(leaf)
                    if len(batch) == _AUDIT_BATCH:
                        yield pb.SiteAuditChunk(records=pb.SiteAuditRecords(leaves=batch))
                        batch = []
                if batch:
                    yield pb.SiteAuditChunk(records=pb.SiteAuditRecords(leaves=batch))

            answer = self._stub.PushAudit(chunks(), timeout=120)
            self._audit_size = answer.size

    def _fetch(self, lease: pb.Lease, dest: Path) -> Path:
        """The lease's bundle into ``dest``, fetched again from its start if the connection
        drops; checked against the order's bundle hash."""
        expected = json.loads(lease.order_json).get("bundle_sha256", "")
        digest = hashlib.sha256()

        def fetch() -> None:
            nonlocal digest
            digest = hashlib.sha256()
            request = pb.FetchBundleRequest(job_id=lease.job_id)
            # Hashed here as it arrives, written on the writer's own thread beside it.
            dest.unlink(missing_ok=True)  # from an earlier try, cut off
            with WriteBehind.create(dest) as out:
                for chunk in self._stub.FetchBundle(request, timeout=3600):
                    digest.update(chunk.data)
                    out.write(chunk.data)

        self._call_until_done(fetch)
        if digest.hexdigest() != expected:
            raise InvalidInput(
                f"the bundle fetched for {lease.job_id} hashes to {digest.hexdigest()}, "
                f"not to the {expected} the order names"
            )
        return dest

    def _push_release(self, job_id: str, root: Path) -> None:
        def messages() -> Iterator[pb.SiteReleaseChunk]:
            yield pb.SiteReleaseChunk(job_id=job_id)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
                size = path.stat().st_size
                rel = path.relative_to(root).as_posix()
                yield pb.SiteReleaseChunk(file=pb.ReleaseFile(path=rel, size=size))
                with path.open("rb") as f:
                    while data := f.read(CHUNK):
                        yield pb.SiteReleaseChunk(data=data)

        self._call_until_done(lambda: self._stub.PushRelease(messages(), timeout=3600))

    def _send(self, job_id: str, seq: int, msg: pb.SiteReport) -> bool:
        """Send report ``seq`` until it is acknowledged; False when the gateway says the lease
        has ended (or is not this site's)."""
        try:
            self._call_until_done(
                lambda: self._stub.Report(pb.ReportRequest(seq=seq, report=msg), timeout=30)
            )
        except grpc.RpcError as e:
            if e.code() in _ENDED:
                return False
            raise
        return True

    def _call_until_done(self, call: Callable[[], object]) -> None:
        backoff = 0.2
        while True:
            try:
                call()
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRY or (self._stop.is_set() and backoff > 5):
                    raise
                time.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF_S)


class _Counter:
    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            n, self._n = self._n, self._n + 1
            return n


def open_site_audit(path: Path, signer: IdentityFiles) -> tuple[AuditLog, str]:
    """The site's own audit log at ``path``, signing its checkpoints with the site's release-
    signing key; returns it and the certificate (PEM) the gateway checks them with. Raises
    InvalidInput unless ``signer`` is a site certificate with its Ed25519 key."""
    release_signer = SiteSigner.from_files(cert=signer.cert, key=signer.key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return AuditLog(path, signing_key=release_signer.key), release_signer.cert_pem.decode()
