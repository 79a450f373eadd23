"""The Gateway gRPC servicer: messages in, one call into :class:`gateway.core.Gateway`, messages
out. Authorisation, audit and error mapping happen around it (:mod:`gateway._auth`); protobuf
types stop here."""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
from sealroom.v1 import gateway_pb2 as pb
from sealroom.v1 import gateway_pb2_grpc as pb_grpc

from gateway._auth import principal_of
from gateway._spool import SealedSpool
from gateway._views import JobEvent
from gateway.core import Gateway, sha256_file
from gateway.store import DatasetRecord, JobRecord, PolicyRecord
from policies.errors import InvalidInput, ResourceExhausted
from policies.lifecycle import JobState

CHUNK = 1 << 20


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

    def __init__(self, f: Any) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self._f.write(data)


def _dataset(d: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        name=d.name,
        version=d.version,
        owner=d.owner,
        root_hash=d.root_hash,
        size=d.size,
        files=[pb.DatasetFile(path=f.path, size=f.size, sha256=f.sha256) for f in d.files],
        created_at=d.created_at,
        description=d.description,
    )


def _policy(p: PolicyRecord) -> pb.Policy:
    return pb.Policy(
        dataset=p.dataset,
        version=p.version,
        document=p.document,
        sha256=p.sha256,
        author=p.author,
        created_at=p.created_at,
    )


def _event(e: JobEvent) -> pb.JobEvent:
    msg = pb.JobEvent(
        job_id=e.job_id, state=e.state.value, reason=e.reason, time=e.time, terminal=e.terminal
    )
    if e.progress is not None:
        step, total, loss = e.progress
        msg.progress.CopyFrom(pb.Progress(step=step, total=total, loss=loss))
    return msg


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.g = gateway

    def _job(self, j: JobRecord) -> pb.Job:
        return pb.Job(
            id=j.id,
            name=j.name,
            state=j.state.value,
            submitter=j.submitter,
            team=j.team,
            spec=j.spec,
            spec_sha256=j.spec_sha256,
            bundle_sha256=j.bundle_sha256,
            datasets=[
                pb.DatasetVersionRef(name=d.name, version=d.version, root_hash=d.root_hash)
                for d in j.datasets
            ],
            policy_versions=dict(j.policy_versions),
            reasons=list(j.reasons),
            approvals=[
                pb.Approval(
                    owner=a.owner,
                    decision=a.decision,
                    reason=a.reason,
                    binding=a.binding,
                    created_at=a.created_at,
                )
                for a in self.g.approvals(j.id)
            ],
            image_id=j.image_id,
            created_at=j.created_at,
            updated_at=j.updated_at,
            metrics=dict(j.metrics),
            release_id=j.release_id,
            details=list(j.details),
            channel_bits=j.channel_bits,
        )

    def RotateSiteKey(
        self, request: pb.RotateSiteKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateSiteKeyResponse:
        key_id, count = self.g.rotate_site_key(principal=principal_of(context))
        return pb.RotateSiteKeyResponse(
            site=self.g.site.name, key_id=key_id, dataset_versions=count
        )

    def WhoAmI(self, request: pb.WhoAmIRequest, context: grpc.ServicerContext) -> pb.Principal:
        p = principal_of(context)
        return pb.Principal(name=p.name, role=p.role.value, team=p.team)

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
        return _dataset(record)

    def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(
            datasets=[_dataset(d) for d in self.g.datasets(principal=principal_of(context))]
        )

    def PutPolicy(self, request: pb.PutPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        return _policy(
            self.g.put_policy(
                principal=principal_of(context), dataset=request.dataset, text=request.document
            )
        )

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        return _policy(
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
        return pb.ListPolicyVersionsResponse(versions=[_policy(p) for p in versions])

    def SubmitJob(
        self, request_iterator: Iterator[pb.SubmitJobChunk], context: grpc.ServicerContext
    ) -> pb.Job:
        with tempfile.TemporaryDirectory(dir=self.g.home) as tmp:
            dest = Path(tmp) / "bundle.tar.gz"
            with dest.open("wb") as f:
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
        return pb.ListJobsResponse(jobs=[self._job(j) for j in jobs])

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
            )
        )

    def ReviewRelease(
        self, request: pb.ReviewReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseReview:
        r = self.g.release_review(principal=principal_of(context), job_id=request.job_id)
        return pb.ReleaseReview(
            job_id=r.job_id,
            release_id=r.release_id,
            weights_capacity_bits=r.capacity.bits,
            released_elements=r.capacity.elements,
            bits_per_element=dict(r.capacity.bits_per_element),
            scrub_bits=r.capacity.scrub_bits,
            checks=[
                pb.ReleaseCheck(
                    dataset=c.dataset,
                    check=c.check,
                    passed=c.passed,
                    figures_json=json.dumps(dict(c.figures), sort_keys=True),
                )
                for c in r.checks
            ],
            reviewers=sorted(r.reviewers),
            approved_by=sorted(r.approved_by),
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
        for event in self.g.watch(principal=principal_of(context), job_id=request.job_id):
            if not context.is_active():
                return
            yield _event(event)

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
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root).as_posix()
            digest = sha256_file(path)
            yield pb.ReleaseChunk(
                file=pb.ReleaseFileHeader(path=rel, size=path.stat().st_size, sha256=digest)
            )
            with path.open("rb") as f:
                while data := f.read(CHUNK):
                    yield pb.ReleaseChunk(data=data)

    # -- audit ------------------------------------------------------------------------------

    def QueryAudit(
        self, request: pb.QueryAuditRequest, context: grpc.ServicerContext
    ) -> pb.QueryAuditResponse:
        records = self.g.audit.query(
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
        return pb.QueryAuditResponse(
            records=[
                pb.AuditRecord(
                    seq=r.seq,
                    time=r.time,
                    principal=r.event.principal,
                    role=r.event.role,
                    action=r.event.action,
                    outcome=r.event.outcome,
                    job_id=r.event.job_id or "",
                    dataset=r.event.dataset or "",
                    file=r.event.file or "",
                    details_json=json.dumps(dict(r.event.details), sort_keys=True),
                    leaf_hash=r.leaf_hash.hex() if isinstance(r.leaf_hash, bytes) else r.leaf_hash,
                )
                for r in records
            ]
        )

    def ExportAudit(
        self, request: pb.ExportAuditRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportChunk]:
        with tempfile.TemporaryDirectory(dir=self.g.home) as tmp:
            path = Path(tmp) / "export.jsonl"
            self.g.audit.export(path)
            with path.open("rb") as f:
                while data := f.read(CHUNK):
                    yield pb.ExportChunk(data=data)

    def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.Checkpoint:
        cps = self.g.audit.checkpoints()
        cp = self.g.audit.checkpoint() if request.fresh or not cps else cps[-1]
        return pb.Checkpoint(
            size=cp.size,
            root_hash=cp.root.hex(),
            time=cp.time,
            signature=base64.b64encode(cp.signature).decode(),
            encoded=cp.note().decode(),
        )

    def GetInclusionProof(
        self, request: pb.InclusionProofRequest, context: grpc.ServicerContext
    ) -> pb.Proof:
        size = request.tree_size or self.g.audit.size()
        if not 0 <= request.seq < size:
            raise InvalidInput(f"seq {request.seq} is not in a tree of size {size}")
        proof = self.g.audit.inclusion_proof(request.seq, size)
        leaf = self.g.audit.record(request.seq).leaf_hash
        return pb.Proof(
            hashes=[h.hex() for h in proof], leaf_hash=leaf.hex(), index=request.seq, tree_size=size
        )

    def GetConsistencyProof(
        self, request: pb.ConsistencyProofRequest, context: grpc.ServicerContext
    ) -> pb.Proof:
        new = request.new_size or self.g.audit.size()
        proof = self.g.audit.consistency_proof(request.old_size, new)
        return pb.Proof(hashes=[h.hex() for h in proof], old_size=request.old_size, tree_size=new)

    def AuditReport(
        self, request: pb.AuditReportRequest, context: grpc.ServicerContext
    ) -> pb.AuditReportResponse:
        r = self.g.audit.report(request.dataset)
        return pb.AuditReportResponse(
            dataset=r.dataset,
            accesses=[
                pb.DatasetAccess(
                    principal=a.principal,
                    role=a.role,
                    action=a.action,
                    outcome=a.outcome,
                    count=a.count,
                    first=a.first,
                    last=a.last,
                )
                for a in r.accesses
            ],
            reads=[pb.JobReads(job_id=j, files=list(f)) for j, f in r.reads.items()],
            releases=[
                pb.DerivedRelease(job_id=d.job_id, manifest_sha256=d.manifest_sha256, time=d.time)
                for d in r.releases
            ],
        )
