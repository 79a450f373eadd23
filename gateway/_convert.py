"""The one place where gateway messages and domain values meet, in both directions.

The servicer turns domain values into messages (``*_message``); the client turns each response
back into the domain value it came from (``*_value``), so that nothing past the client, the CLI
included, sees a protobuf type. A message that does not make a valid value (a state the
lifecycle does not know, hex that is not hex) raises :class:`ValueError`; the client maps it to
:class:`policies.errors.IntegrityError`.

Values come from the packages that own them (:mod:`gateway.store`, :mod:`gateway._views`,
:mod:`enclave.audit`, :mod:`policies.review`); the three below exist only because no owner
has one: a job as sent (its record and approvals), a key rotation, and an audit proof.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sealroom.v1 import gateway_pb2 as pb

from enclave.audit import AuditEvent, AuditRecord, DatasetReport, SignedCheckpoint
from enclave.audit._model import ORIGIN
from enclave.audit._report import Access, DerivedRelease
from gateway._sitelink import SiteView
from gateway._views import JobEvent
from gateway.store import (
    ApprovalRecord,
    DatasetFileRecord,
    DatasetRecord,
    JobRecord,
    PinnedDataset,
    PolicyRecord,
)
from policies.identity import Principal, Role
from policies.lifecycle import JobState
from policies.review import CheckResult, ReviewReport, WeightsCapacity


@dataclass(frozen=True)
class JobView(JobRecord):
    """A job as the gateway sends it: the record as the caller may see it, with the owners'
    approvals. ``binding`` is not sent (it stays empty here)."""

    approvals: tuple[ApprovalRecord, ...] = ()


@dataclass(frozen=True)
class SiteKeyRotation:
    """The outcome of re-wrapping a site's data keys: the new key's id (a label, never the
    key) and how many dataset versions' keys were re-wrapped."""

    site: str
    key_id: str
    dataset_versions: int


@dataclass(frozen=True)
class AuditProof:
    """An RFC 9162 proof as sent: an inclusion proof of leaf ``index`` (hash ``leaf_hash``) in
    a tree of ``tree_size``, or a consistency proof from ``old_size`` to ``tree_size``."""

    hashes: tuple[bytes, ...]
    tree_size: int
    leaf_hash: bytes = b""
    index: int = 0
    old_size: int = 0


# -- domain value -> message (the servicer) ---------------------------------------------------


def principal_message(p: Principal) -> pb.Principal:
    return pb.Principal(name=p.name, role=p.role.value, team=p.team)


def dataset_message(d: DatasetRecord) -> pb.Dataset:
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


def policy_message(p: PolicyRecord) -> pb.Policy:
    return pb.Policy(
        dataset=p.dataset,
        version=p.version,
        document=p.document,
        sha256=p.sha256,
        author=p.author,
        created_at=p.created_at,
    )


def job_message(j: JobRecord, approvals: Iterable[ApprovalRecord]) -> pb.Job:
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
            for a in approvals
        ],
        image_id=j.image_id,
        created_at=j.created_at,
        updated_at=j.updated_at,
        metrics=dict(j.metrics),
        release_id=j.release_id,
        details=list(j.details),
        channel_bits=j.channel_bits,
    )


def event_message(e: JobEvent) -> pb.JobEvent:
    msg = pb.JobEvent(
        job_id=e.job_id, state=e.state.value, reason=e.reason, time=e.time, terminal=e.terminal
    )
    if e.progress is not None:
        step, total, loss = e.progress
        msg.progress.CopyFrom(pb.Progress(step=step, total=total, loss=loss))
    return msg


def review_message(r: ReviewReport) -> pb.ReleaseReview:
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


def rotation_message(r: SiteKeyRotation) -> pb.RotateSiteKeyResponse:
    return pb.RotateSiteKeyResponse(
        site=r.site, key_id=r.key_id, dataset_versions=r.dataset_versions
    )


def audit_record_message(r: AuditRecord) -> pb.AuditRecord:
    return pb.AuditRecord(
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


def checkpoint_message(cp: SignedCheckpoint) -> pb.Checkpoint:
    return pb.Checkpoint(
        size=cp.size,
        root_hash=cp.root.hex(),
        time=cp.time,
        signature=base64.b64encode(cp.signature).decode(),
        encoded=cp.note().decode(),
    )


def proof_message(p: AuditProof) -> pb.Proof:
    return pb.Proof(
        hashes=[h.hex() for h in p.hashes],
        leaf_hash=p.leaf_hash.hex(),
        index=p.index,
        tree_size=p.tree_size,
        old_size=p.old_size,
    )


def report_message(r: DatasetReport) -> pb.AuditReportResponse:
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


# -- message -> domain value (the client) -----------------------------------------------------


def principal_value(m: pb.Principal) -> Principal:
    return Principal(name=m.name, role=Role(m.role), team=m.team)


def dataset_value(m: pb.Dataset) -> DatasetRecord:
    return DatasetRecord(
        name=m.name,
        version=m.version,
        owner=m.owner,
        root_hash=m.root_hash,
        size=m.size,
        files=tuple(DatasetFileRecord(path=f.path, size=f.size, sha256=f.sha256) for f in m.files),
        description=m.description,
        created_at=m.created_at,
    )


def policy_value(m: pb.Policy) -> PolicyRecord:
    return PolicyRecord(
        dataset=m.dataset,
        version=m.version,
        document=m.document,
        sha256=m.sha256,
        author=m.author,
        created_at=m.created_at,
    )


def job_value(m: pb.Job) -> JobView:
    return JobView(
        id=m.id,
        name=m.name,
        state=JobState(m.state),
        submitter=m.submitter,
        team=m.team,
        spec=m.spec,
        spec_sha256=m.spec_sha256,
        bundle_sha256=m.bundle_sha256,
        datasets=tuple(
            PinnedDataset(name=d.name, version=d.version, root_hash=d.root_hash) for d in m.datasets
        ),
        policy_versions=dict(m.policy_versions),
        reasons=tuple(m.reasons),
        image_id=m.image_id,
        metrics=dict(m.metrics),
        release_id=m.release_id,
        created_at=m.created_at,
        updated_at=m.updated_at,
        details=tuple(m.details),
        channel_bits=m.channel_bits,
        approvals=tuple(
            ApprovalRecord(
                job_id=m.id,
                owner=a.owner,
                decision=a.decision,
                reason=a.reason,
                binding=a.binding,
                created_at=a.created_at,
            )
            for a in m.approvals
        ),
    )


def event_value(m: pb.JobEvent) -> JobEvent:
    progress = (
        (m.progress.step, m.progress.total, m.progress.loss) if m.HasField("progress") else None
    )
    return JobEvent(
        job_id=m.job_id, state=JobState(m.state), reason=m.reason, progress=progress, time=m.time
    )


def review_value(m: pb.ReleaseReview) -> ReviewReport:
    checks = []
    for c in m.checks:
        figures = json.loads(c.figures_json) if c.figures_json else {}
        if not isinstance(figures, dict):
            raise ValueError(f"the figures of check {c.check!r} are not a JSON object")
        checks.append(
            CheckResult(dataset=c.dataset, check=c.check, passed=c.passed, figures=figures)
        )
    return ReviewReport(
        job_id=m.job_id,
        release_id=m.release_id,
        capacity=WeightsCapacity(
            bits=m.weights_capacity_bits,
            elements=m.released_elements,
            bits_per_element=dict(m.bits_per_element),
            scrub_bits=m.scrub_bits,
        ),
        checks=tuple(checks),
        reviewers=frozenset(m.reviewers),
        approved_by=frozenset(m.approved_by),
    )


def rotation_value(m: pb.RotateSiteKeyResponse) -> SiteKeyRotation:
    return SiteKeyRotation(site=m.site, key_id=m.key_id, dataset_versions=m.dataset_versions)


def audit_record_value(m: pb.AuditRecord) -> AuditRecord:
    details = json.loads(m.details_json) if m.details_json else {}
    if not isinstance(details, dict):
        raise ValueError(f"the details of audit record {m.seq} are not a JSON object")
    event = AuditEvent(
        principal=m.principal,
        role=m.role,
        action=m.action,
        outcome=m.outcome,
        job_id=m.job_id or None,
        dataset=m.dataset or None,
        file=m.file or None,
        details=details,
    )
    return AuditRecord(seq=m.seq, time=m.time, event=event, leaf_hash=bytes.fromhex(m.leaf_hash))


def checkpoint_value(m: pb.Checkpoint) -> SignedCheckpoint:
    """The checkpoint as sent; its origin is the first line of the signed text when that came
    too (so that :meth:`SignedCheckpoint.verify` checks what was signed)."""
    try:
        signature = base64.b64decode(m.signature, validate=True)
    except binascii.Error as e:
        raise ValueError(f"the checkpoint's signature is not base64 ({e})") from e
    return SignedCheckpoint(
        size=m.size,
        root=bytes.fromhex(m.root_hash),
        time=m.time,
        signature=signature,
        origin=m.encoded.split("\n", 1)[0] if m.encoded else ORIGIN,
    )


def proof_value(m: pb.Proof) -> AuditProof:
    return AuditProof(
        hashes=tuple(bytes.fromhex(h) for h in m.hashes),
        tree_size=m.tree_size,
        leaf_hash=bytes.fromhex(m.leaf_hash),
        index=m.index,
        old_size=m.old_size,
    )


def report_value(m: pb.AuditReportResponse) -> DatasetReport:
    return DatasetReport(
        dataset=m.dataset,
        accesses=tuple(
            Access(
                principal=a.principal,
                role=a.role,
                action=a.action,
                outcome=a.outcome,
                count=a.count,
                first=a.first,
                last=a.last,
            )
            for a in m.accesses
        ),
        reads={r.job_id: tuple(r.files) for r in m.reads},
        releases=tuple(
            DerivedRelease(job_id=d.job_id, manifest_sha256=d.manifest_sha256, time=d.time)
            for d in m.releases
        ),
    )


# -- remote sites -----------------------------------------------------------------------------


def site_message(v: SiteView, *, connected: bool) -> pb.SiteInfo:
    seen = dt.datetime.fromtimestamp(v.last_seen, dt.UTC) if v.last_seen else None
    return pb.SiteInfo(
        name=v.name,
        version=v.version,
        image_id=v.image_id,
        slots=v.slots,
        last_seen=seen.isoformat(timespec="seconds") if seen else "",
        leases=list(v.leases),
        connected=connected,
    )


def site_value(m: pb.SiteInfo) -> SiteInfo:
    return SiteInfo(
        name=m.name,
        version=m.version,
        image_id=m.image_id,
        slots=m.slots,
        last_seen=m.last_seen,
        leases=tuple(m.leases),
        connected=m.connected,
    )


@dataclass(frozen=True)
class SiteInfo:
    """A remote site as an operator sees it (``sealroom site list``)."""

    name: str
    version: str
    image_id: str
    slots: int
    last_seen: str
    leases: tuple[str, ...]
    connected: bool
