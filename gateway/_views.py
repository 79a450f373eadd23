"""What each role is shown of a job: the model team sees the coarse view the account counted.

The site already sends only coarse things for the team (vocabulary reasons, scheduled progress
points, states on its time grid, see :mod:`policies.channels`). Owners, operators and compliance
also get what the site said to them alone (the details of a failure or a refusal, the full
progress); the model team never does, and sees every time rounded down to the job's grid, so
that nothing finer than the account counts reaches it however the gateway's own clock jitters.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from gateway.store import JobRecord
from policies.channels import round_time
from policies.identity import Principal, Role
from policies.lifecycle import TERMINAL, JobState


@dataclass(frozen=True)
class JobEvent:
    """One thing a watcher sees: a state change or a progress point.

    ``owners_only`` events (the full progress, the details) never reach the model team.
    """

    job_id: str
    state: JobState
    reason: str = ""
    progress: tuple[int, int, float] | None = None
    time: str = ""
    owners_only: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL and self.progress is None


def sees_everything(principal: Principal) -> bool:
    """Whether ``principal`` may see the owners' view (everyone but the model team)."""
    return principal.role is not Role.MODEL_TEAM


def coarse_time(stamp: str, quantum_s: float) -> str:
    """An ISO time rounded down to the grid of ``quantum_s`` seconds (of the Unix epoch)."""
    if not stamp:
        return stamp
    when = dt.datetime.fromisoformat(stamp)
    rounded = round_time(when.timestamp(), quantum_s)
    return dt.datetime.fromtimestamp(rounded, dt.UTC).isoformat(timespec="milliseconds")


def job_for(principal: Principal, job: JobRecord, *, quantum_s: float) -> JobRecord:
    """``job`` as ``principal`` may see it."""
    if sees_everything(principal):
        return job
    return replace(
        job,
        details=(),
        created_at=coarse_time(job.created_at, quantum_s),
        updated_at=coarse_time(job.updated_at, quantum_s),
    )


def event_for(principal: Principal, event: JobEvent, *, quantum_s: float) -> JobEvent | None:
    """``event`` as ``principal`` may see it, or None when it is not theirs to see."""
    if sees_everything(principal):
        return event
    if event.owners_only:
        return None
    return replace(event, time=coarse_time(event.time, quantum_s))


def job_summary(job: JobRecord) -> dict[str, Any]:
    """A JSON-able view of a job (for the CLI's --json and for logs)."""
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,
        "submitter": job.submitter,
        "spec_sha256": job.spec_sha256,
        "bundle_sha256": job.bundle_sha256,
        "datasets": [f"{d.name}@v{d.version}" for d in job.datasets],
        "policy_versions": dict(job.policy_versions),
        "reasons": list(job.reasons),
        "image_id": job.image_id,
        "metrics": dict(job.metrics),
        "release_id": job.release_id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
