"""The gateway's records: the frozen values :class:`gateway.store.Store` hands out, and how each
is written to and read from its SQLite row. No I/O here; the store owns the database.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.lifecycle import JobState


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DatasetFileRecord:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    version: int
    owner: str
    root_hash: str
    size: int
    files: tuple[DatasetFileRecord, ...]
    description: str
    created_at: str
    site: str = ""
    """The remote site that keeps it (its bytes never reach the gateway); empty: the gateway's
    own local site."""


@dataclass(frozen=True)
class PolicyRecord:
    dataset: str
    version: int
    document: str
    sha256: str
    author: str
    created_at: str
    signature: str = ""
    """The author's signature (base64, ECDSA P-256) over :func:`policies.signing.policy_message`
    of this text; empty for a version stored before policies were signed."""
    signer_cert: str = ""
    """The PEM certificate whose key made ``signature``."""


@dataclass(frozen=True)
class PinnedDataset:
    """A dataset version a job is bound to."""

    name: str
    version: int
    root_hash: str


@dataclass(frozen=True)
class ApprovalRecord:
    job_id: str
    owner: str
    decision: str  # "approve" | "deny"
    reason: str
    binding: str
    created_at: str
    signature: str = ""
    """The owner's signature (base64, ECDSA P-256) over :func:`policies.signing.
    approval_message` of ``binding`` and ``decision``, made in the owner's client."""
    signer_cert: str = ""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: JobState
    submitter: str
    team: str
    spec: str  # canonical JSON of the parsed spec
    spec_sha256: str
    bundle_sha256: str
    datasets: tuple[PinnedDataset, ...]
    policy_versions: Mapping[str, int]
    reasons: tuple[str, ...] = ()
    image_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    release_id: str = ""
    binding: str = ""
    created_at: str = ""
    updated_at: str = ""
    details: tuple[str, ...] = ()
    """What the site said to the owners about the run (which check, which exit code): never
    shown to the model team, whose ``reasons`` come from a fixed vocabulary."""
    channel_bits: float = 0.0
    """The capacity of what the team could observe of the run, charged when it started."""


def dataset_from_row(row: tuple[Any, ...]) -> DatasetRecord:
    name, version, owner, root_hash, size, files, description, created_at, site = row
    return DatasetRecord(
        name=name,
        version=int(version),
        owner=owner,
        root_hash=root_hash,
        size=int(size),
        files=tuple(DatasetFileRecord(p, int(s), h) for p, s, h in json.loads(files)),
        description=description,
        created_at=created_at,
        site=site,
    )


def job_row(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.name,
        job.state.value,
        job.submitter,
        job.team,
        job.spec,
        job.spec_sha256,
        job.bundle_sha256,
        json.dumps([[d.name, d.version, d.root_hash] for d in job.datasets]),
        json.dumps(dict(job.policy_versions), sort_keys=True),
        json.dumps(list(job.reasons)),
        job.image_id,
        json.dumps(dict(job.metrics), sort_keys=True),
        job.release_id,
        job.binding,
        job.created_at,
        job.updated_at,
        json.dumps({"details": list(job.details), "channel_bits": job.channel_bits}),
    )


def job_from_row(row: tuple[Any, ...]) -> JobRecord:
    (
        id_,
        name,
        state,
        submitter,
        team,
        spec,
        spec_sha,
        bundle_sha,
        datasets,
        policy_versions,
        reasons,
        image_id,
        metrics,
        release_id,
        binding,
        created_at,
        updated_at,
        owner_record,
    ) = row
    owner = json.loads(owner_record)
    return JobRecord(
        id=id_,
        name=name,
        state=JobState(state),
        submitter=submitter,
        team=team,
        spec=spec,
        spec_sha256=spec_sha,
        bundle_sha256=bundle_sha,
        datasets=tuple(PinnedDataset(n, int(v), h) for n, v, h in json.loads(datasets)),
        policy_versions={k: int(v) for k, v in json.loads(policy_versions).items()},
        reasons=tuple(json.loads(reasons)),
        image_id=image_id,
        metrics={k: float(v) for k, v in json.loads(metrics).items()},
        release_id=release_id,
        binding=binding,
        created_at=created_at,
        updated_at=updated_at,
        details=tuple(owner.get("details", ())),
        channel_bits=float(owner.get("channel_bits", 0.0)),
    )
