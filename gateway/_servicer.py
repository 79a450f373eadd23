"""The Gateway gRPC servicer: messages in, one call into :class:`gateway.core.Gateway`, messages
out (built by :mod:`gateway._convert`, whose inverse the client uses). Authorisation, audit and
error mapping happen around it (:mod:`gateway._auth`); protobuf types stop here."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
from sealroom.v1 import gateway_pb2 as pb
from sealroom.v1 import gateway_pb2_grpc as pb_grpc

from enclave.writebehind import WriteBehind
from gateway import _convert as convert
from gateway._auth import principal_of
from gateway._releases import release_files
from gateway._siteaudit import SiteAudits
from gateway._sitelink import SiteLinks
from gateway._spool import SealedSpool
from gateway.core import Gateway
from gateway.store import JobRecord
from policies.errors import InvalidInput, NotFound, ResourceExhausted
from policies.lifecycle import JobState

CHUNK = 1 << 20
MAX_WATCHES = 64
"""Job watches open at once: half of ``gateway.server.SERVER_THREADS``."""


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _receive(
    chunks: Iterable[Any], *, header_field: str, data_field: str, limit: int, into: _Sink
) -> tuple[Any, int]:
    """Read a header message then data chunks into ``into``, size-capped.

    Returns (header, bytes received). Raises :class:`ResourceExhausted` past ``limit``.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != header_field:
        raise InvalidInput(f"the first message must carry the {header_field}")
    header = getattr(first, header_field)
    size = 0
    for msg in it:
        if msg.WhichOneof("part") != data_field:
            raise InvalidInput(f"only {data_field} may follow the {header_field}")
        data = getattr(msg, data_field)
        size += len(data)
        if size > limit:
            raise ResourceExhausted(f"upload is over the {limit}-byte limit")
        into.write(data)
    return header, size


class _HashingFile:
    """A file being written, hashed on the way (one pass over an upload, not three)."""

    def __init__(self, f: _Sink) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self._f.write(data)


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(
        self,
        gateway: Gateway,
        *,
        links: SiteLinks | None = None,
        site_audits: SiteAudits | None = None,
        max_watches: int = MAX_WATCHES,
    ) -> None:
        self.g = gateway
        self._links = links  # the remote sites, as the site link has heard from them
        self._site_audits = site_audits  # the gateway's copy of each remote site's log
        # A watch holds a server thread for as long as it is open: past this many at once, a
        # new one is refused, so that watchers can never take the threads every other call
        # (and every remote site's long poll) needs.
        self._watches = threading.BoundedSemaphore(max_watches)
        self._max_watches = max_watches

    def _sites(self, site: str) -> SiteAudits:
        if self._site_audits is None:
            raise NotFound(f"no audit log of a site named {site!r} reached this gateway")
        return self._site_audits

    def _log(self, site: str) -> Any:
        """The audit log a compliance call reads: the gateway's own, or its copy of a remote
        site's (:mod:`gateway._siteaudit`). Raises NotFound for a site it holds no log of."""
        return self._sites(site).log(site) if site else self.g.audit

    def _job(self, j: JobRecord) -> pb.Job:
        return convert.job_message(j, self.g.approvals(j.id))

    def RotateSiteKey(
        self, request: pb.RotateSiteKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateSiteKeyResponse:
        key_id, count = self.g.rotate_site_key(principal=principal_of(context))
        return convert.rotation_message(
            convert.SiteKeyRotation(site=self.g.site.name, key_id=key_id, dataset_versions=count)
        )

    def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.ServicerContext
    ) -> pb.ListSitesResponse:
        if self._links is None:
            return pb.ListSitesResponse()
        # Connected: heard from within three heartbeats.
        recent = time.time() - 3 * self._links.heartbeat_s
        return pb.ListSitesResponse(
            sites=[
                convert.site_message(v, connected=v.last_seen >= recent)
                for v in self._links.sites()
            ]
        )

    def WhoAmI(self, request: pb.WhoAmIRequest, context: grpc.ServicerContext) -> pb.Principal:
        return convert.principal_message(principal_of(context))

    def RegisterDataset(
        self, request_iterator: Iterator[pb.RegisterDatasetChunk], context: grpc.ServicerContext
    ) -> pb.Dataset:
        # The owner's plaintext never touches the gateway's disk: it is spooled sealed.
        with SealedSpool(self.g.home) as spool:
            header, size = _receive(
                request_iterator,
                header_field="header",
                data_field="data",
                limit=self.g.max_bundle_bytes * 8,
                into=spool,
            )
            if not size:
                raise InvalidInput("the dataset archive is empty")
            record = self.g.register_dataset(
                principal=principal_of(context),
                name=header.name,
                description=header.description,
                archive=spool,
                archive_sha256=header.archive_sha256,
            )
        return convert.dataset_message(record)

    def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(
            datasets=[
                convert.dataset_message(d) for d in self.g.datasets(principal=principal_of(context))
            ]
        )

    def PutPolicy(self, request: pb.PutPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        return convert.policy_message(
            self.g.put_policy(
                principal=principal_of(context),
                dataset=request.dataset,
                text=request.document,
                version=request.version or None,
                signature=request.signature,
                signer_cert=request.signer_cert,
            )
        )

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        return convert.policy_message(
            self.g.policy(
                principal=principal_of(context),
                dataset=request.dataset,
                version=request.version or None,
            )
        )

    def ListPolicyVersions(
        self, request: pb.GetPolicyRequest, context: grpc.ServicerContext
    ) -> pb.ListPolicyVersionsResponse:
        versions = self.g.policy_versions(principal=principal_of(context), dataset=request.dataset)
        return pb.ListPolicyVersionsResponse(versions=[convert.policy_message(p) for p in versions])

    def SubmitJob(
        self, request_iterator: Iterator[pb.SubmitJobChunk], context: grpc.ServicerContext
    ) -> pb.Job:
        with tempfile.TemporaryDirectory(dir=self.g.home) as tmp:
            dest = Path(tmp) / "bundle.tar.gz"
            with WriteBehind.create(dest) as f:
                sink = _HashingFile(f)
                header, size = _receive(
                    request_iterator,
                    header_field="header",
                    data_field="bundle",
                    limit=self.g.max_bundle_bytes,
                    into=sink,
                )
            actual = sink.hash.hexdigest()
            if size and header.bundle_sha256 and header.bundle_sha256 != actual:
                raise InvalidInput(
                    f"bundle hash mismatch: header says {header.bundle_sha256}, got {actual}"
                )
            job = self.g.submit(
                principal=principal_of(context),
                spec_text=header.spec,
                bundle=dest if size else None,
                bundle_sha256=actual if size else "",
                received=True,
            )
        return self._job(job)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(self.g.job(principal=principal_of(context), job_id=request.job_id))

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        try:
            state = JobState(request.state) if request.state else None
        except ValueError:
            raise InvalidInput(f"unknown job state {request.state!r}") from None
        jobs = self.g.jobs(principal=principal_of(context), state=state)
        approvals = self.g.approvals_of(j.id for j in jobs)  # one store query for the list
        return pb.ListJobsResponse(jobs=[convert.job_message(j, approvals[j.id]) for j in jobs])

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(
            self.g.cancel(
                principal=principal_of(context), job_id=request.job_id, reason=request.reason
            )
        )

    def DecideJob(self, request: pb.DecideJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(
            self.g.decide(
                principal=principal_of(context),
                job_id=request.job_id,
                approve=request.approve,
                reason=request.reason,
                signature=request.signature,
                signer_cert=request.signer_cert,
            )
        )

    def ReviewRelease(
        self, request: pb.ReviewReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseReview:
        return convert.review_message(
            self.g.release_review(principal=principal_of(context), job_id=request.job_id)
        )

    def DecideRelease(
        self, request: pb.DecideReleaseRequest, context: grpc.ServicerContext
    ) -> pb.Job:
        return self._job(
            self.g.decide_release(
                principal=principal_of(context),
                job_id=request.job_id,
                approve=request.approve,
                reason=request.reason,
            )
        )

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        if not self._watches.acquire(blocking=False):
            raise ResourceExhausted(
                f"{self._max_watches} job watches are open at this gateway: retry later"
            )
        try:
            # The watch ends once the watcher has gone (a cancelled or broken stream), instead
            # of holding a server thread until the job's next event.
            for event in self.g.watch(
                principal=principal_of(context), job_id=request.job_id, alive=context.is_active
            ):
                yield convert.event_message(event)
        finally:
            self._watches.release()

    def GetJobLogs(
        self, request: pb.GetJobLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogChunk]:
        data = self.g.logs(principal=principal_of(context), job_id=request.job_id)
        for i in range(0, max(len(data), 1), CHUNK):
            yield pb.LogChunk(data=data[i : i + CHUNK])

    def DownloadRelease(
        self, request: pb.DownloadReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReleaseChunk]:
        root = self.g.release_dir(principal=principal_of(context), job_id=request.job_id)
        for f in release_files(root):
            yield pb.ReleaseChunk(
                file=pb.ReleaseFileHeader(path=f.rel, size=f.size, sha256=f.sha256)
            )
            with f.path.open("rb") as src:
                while data := src.read(CHUNK):
                    yield pb.ReleaseChunk(data=data)

    # -- audit ------------------------------------------------------------------------------

    def QueryAudit(
        self, request: pb.QueryAuditRequest, context: grpc.ServicerContext
    ) -> pb.QueryAuditResponse:
        records = self._log(request.site).query(
            job=request.job_id or None,
            dataset=request.dataset or None,
            file=request.file or None,
            principal=request.principal or None,
            role=request.role or None,
            action=request.action or None,
            outcome=request.outcome or None,
            since=request.since or None,
            until=request.until or None,
            limit=request.limit or 1000,
        )
        return pb.QueryAuditResponse(records=[convert.audit_record_message(r) for r in records])

    def ExportAudit(
        self, request: pb.ExportAuditRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportChunk]:
        log = self._log(request.site)
        with tempfile.TemporaryDirectory(dir=self.g.home) as tmp:
            path = Path(tmp) / "export.jsonl"
            log.export(path)
            with path.open("rb") as f:
                while data := f.read(CHUNK):
                    yield pb.ExportChunk(data=data)

    def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.Checkpoint:
        if request.site:
            if request.fresh:
                raise InvalidInput("a site signs the checkpoints of its own log: no fresh one")
            held, cert = self._sites(request.site).checkpoint(request.site)
            message = convert.checkpoint_message(held)
            message.signer_cert = cert
            return message
        cps = self.g.audit.checkpoints()
        cp = self.g.audit.checkpoint() if request.fresh or not cps else cps[-1]
        return convert.checkpoint_message(cp)

    def GetInclusionProof(
        self, request: pb.InclusionProofRequest, context: grpc.ServicerContext
    ) -> pb.Proof:
        log = self._log(request.site)
        size = request.tree_size or log.size()
        if not 0 <= request.seq < size:
            raise InvalidInput(f"seq {request.seq} is not in a tree of size {size}")
        proof = log.inclusion_proof(request.seq, size)
        leaf = log.record(request.seq).leaf_hash
        return convert.proof_message(
            convert.AuditProof(
                hashes=tuple(proof), tree_size=size, leaf_hash=leaf, index=request.seq
            )
        )

    def GetConsistencyProof(
        self, request: pb.ConsistencyProofRequest, context: grpc.ServicerContext
    ) -> pb.Proof:
        log = self._log(request.site)
        new = request.new_size or log.size()
        proof = log.consistency_proof(request.old_size, new)
        return convert.proof_message(
            convert.AuditProof(hashes=tuple(proof), tree_size=new, old_size=request.old_size)
        )

    def AuditReport(
        self, request: pb.AuditReportRequest, context: grpc.ServicerContext
    ) -> pb.AuditReportResponse:
        return convert.report_message(self.g.audit.report(request.dataset))
