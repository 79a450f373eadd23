"""Approvals: counting owners' votes, binding an approval to exactly what was approved, and
deciding whether an approval survives a new policy version.

An approval is for one :class:`ApprovalBinding`: the job, its spec hash, its code bundle hash,
the dataset versions and the policy versions. Each vote names the binding's digest, so a vote
cast for anything else does not count; before a job starts the gateway checks the binding it
approved against the one it is about to run with :func:`verify_binding`, which raises naming
everything that changed. :func:`tally` counts one dataset's votes (distinct owners only; one
deny by an owner denies). :func:`reevaluate_approval` re-decides a job that has not started
when a policy changes. All functions are pure; ``now`` is always an argument.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from policies.access import (
    ApprovalRequirement,
    Decision,
    Outcome,
    evaluate_submission,
    require_aware,
)
from policies.document import PolicyDocument, PolicyRef
from policies.errors import InvalidInput, PermissionDenied, PolicyViolation
from policies.identity import Principal, Role
from policies.spec import JobSpec

__all__ = [
    "ApprovalBinding",
    "ApprovalRequirement",
    "ApprovalState",
    "ApprovalStatus",
    "ApprovalVote",
    "Reevaluation",
    "ReevaluationOutcome",
    "Vote",
    "approval_expiry",
    "binding_differences",
    "check_approver",
    "job_approval_status",
    "reevaluate_approval",
    "tally",
    "verify_binding",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BUNDLE_DIGEST = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class Vote(enum.StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class ApprovalStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


@dataclass(frozen=True)
class ApprovalVote:
    """One person's vote on a job, for the binding whose digest it names."""

    approver: str
    vote: Vote
    binding_digest: str
    reason: str = ""


@dataclass(frozen=True)
class ApprovalState:
    """One dataset's tally. ``stale``: owners whose votes were for another binding;
    ``ignored``: votes by people who are not owners of the dataset. Neither counts."""

    dataset: str
    quorum: int
    approved_by: frozenset[str]
    denied_by: frozenset[str]
    stale: frozenset[str]
    ignored: frozenset[str]
    status: ApprovalStatus

    @property
    def quorum_reached(self) -> bool:
        return len(self.approved_by) >= self.quorum


def tally(
    approvals: Iterable[ApprovalVote], required: ApprovalRequirement, *, binding_digest: str
) -> ApprovalState:
    """Count the votes for one dataset's requirement.

    Only owners' votes for ``binding_digest`` count, each owner once however often they vote.
    One deny by an owner denies, whatever else was cast (fail closed: a later approval by the
    same owner does not undo it); otherwise the quorum of distinct approving owners approves.
    """
    if not _HEX64.match(binding_digest):
        raise InvalidInput("binding_digest must be a SHA-256 hex digest")
    approved: set[str] = set()
    denied: set[str] = set()
    stale: set[str] = set()
    ignored: set[str] = set()
    for vote in approvals:
        if vote.approver not in required.owners:
            ignored.add(vote.approver)
        elif vote.binding_digest != binding_digest:
            stale.add(vote.approver)
        elif vote.vote is Vote.DENY:
            denied.add(vote.approver)
        elif vote.vote is Vote.APPROVE:
            approved.add(vote.approver)
        else:  # a value that is not a Vote: never count it as approval
            raise InvalidInput(f"vote by {vote.approver!r} is not approve or deny")
    approved -= denied
    if denied:
        status = ApprovalStatus.DENIED
    elif len(approved) >= required.quorum:
        status = ApprovalStatus.APPROVED
    else:
        status = ApprovalStatus.PENDING
    return ApprovalState(
        dataset=required.dataset,
        quorum=required.quorum,
        approved_by=frozenset(approved),
        denied_by=frozenset(denied),
        stale=frozenset(stale - approved - denied),
        ignored=frozenset(ignored),
        status=status,
    )


def job_approval_status(states: Iterable[ApprovalState]) -> ApprovalStatus:
    """A job is DENIED if any dataset's tally denies, APPROVED only if every one approves.

    Raises :class:`InvalidInput` for no states: a job with nothing to approve was decided
    automatically and must not reach here.
    """
    items = list(states)
    if not items:
        raise InvalidInput("no approval requirements to combine")
    if any(s.status is ApprovalStatus.DENIED for s in items):
        return ApprovalStatus.DENIED
    if all(s.status is ApprovalStatus.APPROVED for s in items):
        return ApprovalStatus.APPROVED
    return ApprovalStatus.PENDING


def check_approver(*, principal: Principal, requirements: Iterable[ApprovalRequirement]) -> None:
    """Raise :class:`PermissionDenied` unless ``principal`` is a data owner who owns at least one
    of the datasets whose approval the job needs."""
    reqs = list(requirements)
    if principal.role is not Role.DATA_OWNER:
        raise PermissionDenied(f"{principal} cannot vote on jobs: only data owners approve")
    if not any(principal.name in r.owners for r in reqs):
        names = ", ".join(sorted(r.dataset for r in reqs)) or "none"
        raise PermissionDenied(f"{principal} owns none of the datasets awaiting approval ({names})")


# --- the binding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalBinding:
    """Exactly what an approval is for. Build it with :meth:`create`.

    ``bundle_digest`` is None for a built-in trainer (no code bundle). ``datasets`` and
    ``policies`` are sorted by dataset name and name the same datasets: every dataset a job
    reads has a policy version bound.
    """

    job_id: str
    spec_digest: str
    bundle_digest: str | None
    datasets: tuple[tuple[str, int], ...]
    policies: tuple[PolicyRef, ...]

    def __post_init__(self) -> None:
        if not _JOB_ID.match(self.job_id):
            raise InvalidInput(f"binding: job id {self.job_id!r} is not well formed")
        if not _HEX64.match(self.spec_digest):
            raise InvalidInput("binding: spec_digest must be a SHA-256 hex digest")
        if self.bundle_digest is not None and not _BUNDLE_DIGEST.match(self.bundle_digest):
            raise InvalidInput("binding: bundle_digest is not well formed")
        names = [name for name, _ in self.datasets]
        if not names:
            raise InvalidInput("binding: an approval must name at least one dataset")
        if names != sorted(set(names)):
            raise InvalidInput("binding: datasets must be sorted and unique (use create())")
        for name, version in self.datasets:
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise InvalidInput(f"binding: dataset {name!r} version must be an integer >= 0")
        if [p.dataset for p in self.policies] != names:
            raise InvalidInput("binding: every dataset needs exactly one policy, sorted by name")
        for p in self.policies:
            if not _HEX64.match(p.digest):
                raise InvalidInput(f"binding: policy digest for {p.dataset!r} is not SHA-256 hex")

    @classmethod
    def create(
        cls,
        *,
        job_id: str,
        spec_digest: str,
        bundle_digest: str | None,
        dataset_versions: Mapping[str, int],
        policies: Iterable[PolicyRef],
    ) -> ApprovalBinding:
        return cls(
            job_id=job_id,
            spec_digest=spec_digest,
            bundle_digest=bundle_digest,
            datasets=tuple(sorted(dataset_versions.items())),
            policies=tuple(sorted(policies, key=lambda p: p.dataset)),
        )

    @property
    def dataset_versions(self) -> Mapping[str, int]:
        return dict(self.datasets)

    def with_policies(self, policies: Iterable[PolicyRef]) -> ApprovalBinding:
        return replace(self, policies=tuple(sorted(policies, key=lambda p: p.dataset)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "spec_digest": self.spec_digest,
            "bundle_digest": self.bundle_digest,
            "datasets": {name: version for name, version in self.datasets},
            "policies": {
                p.dataset: {"version": p.version, "digest": p.digest} for p in self.policies
            },
        }

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: what votes name."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:16]


def binding_differences(approved: ApprovalBinding, current: ApprovalBinding) -> list[str]:
    """Every way ``current`` differs from ``approved``, one line each; empty when equal."""
    out: list[str] = []
    if approved.job_id != current.job_id:
        out.append(f"job: approved for {approved.job_id!r}, not {current.job_id!r}")
    if approved.spec_digest != current.spec_digest:
        out.append(
            f"spec: the spec changed (approved {_short(approved.spec_digest)}, "
            f"now {_short(current.spec_digest)})"
        )
    if approved.bundle_digest != current.bundle_digest:
        out.append(
            f"bundle: the code bundle changed (approved {_short(approved.bundle_digest)}, "
            f"now {_short(current.bundle_digest)})"
        )
    a, c = approved.dataset_versions, current.dataset_versions
    for name in sorted(a.keys() | c.keys()):
        if name not in c:
            out.append(f"dataset {name}: approved but no longer named")
        elif name not in a:
            out.append(f"dataset {name}: not part of the approval")
        elif a[name] != c[name]:
            out.append(f"dataset {name}: version changed (approved v{a[name]}, now v{c[name]})")
    ap = {p.dataset: p for p in approved.policies}
    cp = {p.dataset: p for p in current.policies}
    for name in sorted(ap.keys() & cp.keys()):
        if ap[name] != cp[name]:
            out.append(
                f"policy {name}: the policy changed (approved v{ap[name].version} "
                f"{_short(ap[name].digest)}, now v{cp[name].version} {_short(cp[name].digest)})"
            )
    return out


def verify_binding(
    *,
    approved: ApprovalBinding,
    current: ApprovalBinding,
    expires_at: dt.datetime,
    now: dt.datetime,
) -> None:
    """Raise :class:`PolicyViolation` unless the approval still covers exactly ``current``.

    The reasons name each thing that changed (``job:``, ``spec:``, ``bundle:``, ``dataset``,
    ``policy``) and ``expired:`` when ``now`` is at or past ``expires_at``; all of them, not
    only the first.
    """
    require_aware(now, name="now")
    require_aware(expires_at, name="expires_at")
    reasons = binding_differences(approved, current)
    if now >= expires_at:
        reasons.append(f"expired: the approval expired at {expires_at.isoformat()}")
    if reasons:
        raise PolicyViolation("the approval does not apply", reasons=tuple(reasons))


def approval_expiry(*, policies: Iterable[PolicyDocument], approved_at: dt.datetime) -> dt.datetime:
    """When an approval given at ``approved_at`` lapses: the earliest of each policy's
    ``valid_for`` after it and each policy's own expiry. Raises :class:`InvalidInput` for no
    policies."""
    require_aware(approved_at, name="approved_at")
    ends = [min(approved_at + p.approval.valid_for, p.expires) for p in policies]
    if not ends:
        raise InvalidInput("an approval must be under at least one policy")
    return min(ends)


# --- a new policy version -----------------------------------------------------------------------


class ReevaluationOutcome(enum.StrEnum):
    STILL_APPROVED = "still-approved"
    """The approval applies under the new policies; re-bind it with ``Reevaluation.binding``."""
    NEEDS_APPROVAL = "needs-approval"
    """The job is allowed but the votes cast do not meet what the new policies ask."""
    DENIED = "denied"
    """The new policies deny the job."""


@dataclass(frozen=True)
class Reevaluation:
    outcome: ReevaluationOutcome
    decision: Decision
    reasons: tuple[str, ...]
    changed: tuple[str, ...]
    """Datasets whose policy differs from the one bound."""
    approvals: tuple[ApprovalState, ...]
    binding: ApprovalBinding | None
    """The binding under the new policies when STILL_APPROVED, else None."""


def reevaluate_approval(
    *,
    binding: ApprovalBinding,
    spec: JobSpec,
    principal: Principal,
    policies: Mapping[str, PolicyDocument],
    dataset_owners: Mapping[str, frozenset[str]],
    votes: Iterable[ApprovalVote],
    epsilon_spent: Mapping[str, float],
    now: dt.datetime,
) -> Reevaluation:
    """Does an approved job that has not started still stand under ``policies`` (new versions)?

    The submission is decided again (:func:`evaluate_submission`); a denial revokes the
    approval. Otherwise the votes cast for ``binding`` are tallied against what the new
    policies ask (a raised quorum, a changed owner list): if every requirement is met the
    approval stands and ``binding`` re-bound to the new policy versions is returned.
    Raises :class:`PolicyViolation` if ``spec`` is not the spec the binding approved.
    """
    if spec.digest() != binding.spec_digest:
        raise PolicyViolation(
            "the spec given is not the approved one",
            reasons=(
                f"spec: approved {_short(binding.spec_digest)}, given {_short(spec.digest())}",
            ),
        )
    if sorted(r.name for r in spec.datasets) != [name for name, _ in binding.datasets]:
        raise PolicyViolation("the spec's datasets are not the approved ones")
    decision = evaluate_submission(
        spec=spec,
        principal=principal,
        policies=policies,
        dataset_owners=dataset_owners,
        epsilon_spent=epsilon_spent,
        now=now,
    )
    bound = {p.dataset: p for p in binding.policies}
    changed = tuple(p.dataset for p in decision.policies if bound.get(p.dataset) != p)
    if decision.outcome is Outcome.DENY:
        return Reevaluation(
            outcome=ReevaluationOutcome.DENIED,
            decision=decision,
            reasons=tuple(str(r) for r in decision.reasons),
            changed=changed,
            approvals=(),
            binding=None,
        )
    cast = list(votes)
    states = tuple(tally(cast, req, binding_digest=binding.digest()) for req in decision.approvals)
    reasons = tuple(
        f"{s.dataset}: {s.status} with {len(s.approved_by)} of {s.quorum} approval(s)"
        + (f", denied by {', '.join(sorted(s.denied_by))}" if s.denied_by else "")
        for s in states
        if s.status is not ApprovalStatus.APPROVED
    )
    if any(s.status is ApprovalStatus.DENIED for s in states):
        outcome = ReevaluationOutcome.DENIED
    elif reasons:
        outcome = ReevaluationOutcome.NEEDS_APPROVAL
    else:
        outcome = ReevaluationOutcome.STILL_APPROVED
    return Reevaluation(
        outcome=outcome,
        decision=decision,
        reasons=reasons,
        changed=changed,
        approvals=states,
        binding=(
            binding.with_policies(decision.policies)
            if outcome is ReevaluationOutcome.STILL_APPROVED
            else None
        ),
    )
