"""Access decisions: may this principal run this job on these datasets, and who must approve it.

:func:`evaluate_submission` is a pure function of its arguments (no clock, no store): it checks
the job spec against the policy of every dataset it names and returns a :class:`Decision` with
EVERY failing rule, not only the first, so a model team can fix a spec in one round and an
auditor sees the whole judgement. A dataset without a policy is denied (fail closed). The
decision carries what it depended on: the spec hash, the principal, each policy's version and
hash, the epsilon already spent and the time it was taken, so the caller can record it whole.

:func:`check_log_access` decides who may read a job's stdout and stderr, which stay in the site
because they can carry data.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policies import channels
from policies.document import (
    ApprovalMode,
    CustomCode,
    LogVisibility,
    PolicyDocument,
    PolicyRef,
)
from policies.errors import InvalidInput, PermissionDenied, PolicyViolation
from policies.identity import USER_ROLES, Principal, Role
from policies.spec import JobSpec

__all__ = [
    "DP_EPSILON_HYPERPARAMETER",
    "PRIVATE_TRAINER",
    "USER_ROLES",
    "ApprovalRequirement",
    "Decision",
    "Outcome",
    "Principal",
    "Reason",
    "Role",
    "Rule",
    "check_log_access",
    "evaluate_submission",
    "job_account",
    "needs_review",
    "require_aware",
]

PRIVATE_TRAINER = "private"
"""The trainer name of a team's computation graph run by the site's DP-SGD trainer
(:mod:`trainers.private`); allowed by ``custom_code: private`` (or ``reviewed``)."""

DP_EPSILON_HYPERPARAMETER = "dp_epsilon"
"""A spec may ask for a smaller privacy budget than the policy's per-job cap with this
hyperparameter; without it the job is charged the full per-job cap."""


class Outcome(enum.StrEnum):
    DENY = "deny"
    NEEDS_APPROVAL = "needs-approval"
    AUTO_APPROVE = "auto-approve"


class Rule(enum.StrEnum):
    """The rules a submission is checked against; a :class:`Reason` names the one it broke."""

    ROLE = "role"
    NO_POLICY = "no-policy"
    POLICY_MISMATCH = "policy-mismatch"
    EXPIRED = "expired"
    PRINCIPAL = "principal"
    PURPOSE = "purpose"
    BASE_MODEL = "base-model"
    TRAINER = "trainer"
    CUSTOM_CODE = "custom-code"
    GPUS = "gpus"
    CPUS = "cpus"
    MEMORY = "memory"
    TIMEOUT = "timeout"
    DP_CUSTOM_CODE = "dp-custom-code"
    DP_EPSILON = "dp-epsilon"
    DP_BUDGET = "dp-budget"
    APPROVERS = "approvers"
    CHANNELS = "channels"


@dataclass(frozen=True)
class Reason:
    """One failing rule. ``dataset`` is None for rules about the principal alone."""

    rule: Rule
    dataset: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.dataset}: {self.message}" if self.dataset else self.message


@dataclass(frozen=True)
class ApprovalRequirement:
    """Who must approve a job for one dataset: ``quorum`` distinct names among ``owners``."""

    dataset: str
    owners: frozenset[str]
    quorum: int
    policy: PolicyRef

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise InvalidInput(f"{self.dataset}: an approval quorum must be at least 1")
        if len(self.owners) < self.quorum:
            raise InvalidInput(
                f"{self.dataset}: quorum {self.quorum} cannot be reached by "
                f"{len(self.owners)} owner(s)"
            )


@dataclass(frozen=True)
class Decision:
    """The outcome with every reason and everything it was decided on.

    ``reasons`` is empty unless the outcome is DENY; ``approvals`` is non-empty exactly when it
    is NEEDS_APPROVAL. ``epsilon_spent`` is the privacy budget already spent per dataset that
    the decision assumed.
    """

    outcome: Outcome
    reasons: tuple[Reason, ...]
    approvals: tuple[ApprovalRequirement, ...]
    policies: tuple[PolicyRef, ...]
    spec_digest: str
    principal: Principal
    evaluated_at: dt.datetime
    epsilon_spent: tuple[tuple[str, float], ...] = ()

    @property
    def rules(self) -> frozenset[Rule]:
        return frozenset(r.rule for r in self.reasons)

    def raise_if_denied(self) -> None:
        """Raise :class:`PolicyViolation` carrying every reason if the outcome is DENY."""
        if self.outcome is Outcome.DENY:
            raise PolicyViolation(
                "the job is denied by policy", reasons=tuple(str(r) for r in self.reasons)
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the decision, for the audit log."""
        return {
            "outcome": str(self.outcome),
            "reasons": [
                {"rule": str(r.rule), "dataset": r.dataset, "message": r.message}
                for r in self.reasons
            ],
            "approvals": [
                {
                    "dataset": a.dataset,
                    "owners": sorted(a.owners),
                    "quorum": a.quorum,
                    "policy": _ref_dict(a.policy),
                }
                for a in self.approvals
            ],
            "policies": [_ref_dict(p) for p in self.policies],
            "spec_digest": self.spec_digest,
            "principal": {
                "name": self.principal.name,
                "role": str(self.principal.role),
                "team": self.principal.team,
            },
            "evaluated_at": self.evaluated_at.isoformat(),
            "epsilon_spent": {name: spent for name, spent in self.epsilon_spent},
        }


def _ref_dict(ref: PolicyRef) -> dict[str, Any]:
    return {"dataset": ref.dataset, "version": ref.version, "digest": ref.digest}


def require_aware(when: dt.datetime, *, name: str) -> None:
    """Raise :class:`InvalidInput` unless ``when`` carries a time zone (naive times are ambiguous
    and cannot be compared with a policy's expiry)."""
    if not isinstance(when, dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInput(f"{name} must be a datetime with a time zone, not {when!r}")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _check_dataset(
    *,
    spec: JobSpec,
    principal: Principal,
    policy: PolicyDocument,
    owners: frozenset[str],
    spent: float,
    now: dt.datetime,
) -> tuple[list[Reason], ApprovalRequirement | None]:
    name = policy.dataset
    reasons: list[Reason] = []

    def fail(rule: Rule, message: str) -> None:
        reasons.append(Reason(rule, name, message))

    if now >= policy.expires:
        fail(Rule.EXPIRED, f"the policy expired at {policy.expires.isoformat()}")
    access = policy.access
    if not (
        (principal.team and principal.team in access.teams) or principal.name in access.principals
    ):
        fail(
            Rule.PRINCIPAL,
            f"neither principal {principal.name!r} nor team {principal.team!r} may use the dataset",
        )
    if access.purposes is not None and spec.purpose.strip() not in access.purposes:
        fail(
            Rule.PURPOSE,
            f"purpose {spec.purpose!r} is not one the policy allows "
            f"({', '.join(repr(p) for p in sorted(access.purposes))})",
        )
    if spec.base_model not in policy.base_models:
        fail(
            Rule.BASE_MODEL,
            f"base model {spec.base_model!r} is not allowed "
            f"(allowed: {', '.join(sorted(policy.base_models)) or 'none'})",
        )
    if spec.is_custom:
        if not policy.trainers.allows_python:
            fail(
                Rule.CUSTOM_CODE,
                f"custom code is not allowed (custom_code: {policy.trainers.custom_code}); "
                "use a built-in trainer"
                + (" or a graph (trainer: private)" if policy.trainers.allows_graph else ""),
            )
    elif spec.trainer == PRIVATE_TRAINER:
        if not policy.trainers.allows_graph:
            fail(
                Rule.CUSTOM_CODE,
                f"a team's graph is not allowed (custom_code: {policy.trainers.custom_code}); "
                "use a built-in trainer",
            )
        elif policy.release.memorization is not None and policy.release.dp is None:
            # The probe cannot load a graph's parameters; the gate lets DP bound them instead,
            # and with no DP budget it would refuse the release after the run.
            fail(
                Rule.CUSTOM_CODE,
                "a team's graph cannot be probed for memorization, and the policy sets no "
                "differential_privacy budget to bound it instead",
            )
    elif spec.trainer not in policy.trainers.builtin:
        fail(
            Rule.TRAINER,
            f"trainer {spec.trainer!r} is not allowed "
            f"(allowed: {', '.join(sorted(policy.trainers.builtin)) or 'none'})",
        )
    want, cap = spec.resources, policy.resources
    for rule, label, asked, most in (
        (Rule.GPUS, "gpus", want.gpus, cap.gpus),
        (Rule.CPUS, "cpus", want.cpus, cap.cpus),
        (Rule.MEMORY, "memory_mb", want.memory_mb, cap.memory_mb),
        (Rule.TIMEOUT, "timeout_s", want.timeout_s, cap.timeout_s),
    ):
        if asked > most:
            fail(rule, f"resources.{label} {asked:g} exceeds the cap of {most:g}")
    dp = policy.release.dp
    if dp is not None:
        if spec.is_custom:
            # The site can only account for privacy loss in code it runs itself.
            fail(Rule.DP_CUSTOM_CODE, "differential privacy is required: custom code cannot run")
        charge = dp.max_epsilon_per_job
        if DP_EPSILON_HYPERPARAMETER in spec.hyperparameters:
            asked_eps = _number(spec.hyperparameters[DP_EPSILON_HYPERPARAMETER])
            if asked_eps is None or asked_eps <= 0:
                fail(
                    Rule.DP_EPSILON,
                    f"hyperparameter {DP_EPSILON_HYPERPARAMETER} must be a positive number",
                )
            elif asked_eps > dp.max_epsilon_per_job:
                fail(
                    Rule.DP_EPSILON,
                    f"{DP_EPSILON_HYPERPARAMETER} {asked_eps:g} exceeds the per-job cap "
                    f"{dp.max_epsilon_per_job:g}",
                )
            else:
                charge = asked_eps
        if spent + charge > dp.epsilon_budget:
            fail(
                Rule.DP_BUDGET,
                f"epsilon {charge:g} after {spent:g} already spent exceeds the dataset's budget "
                f"{dp.epsilon_budget:g}",
            )
    requirement = None
    if policy.approval.mode is not ApprovalMode.AUTOMATIC or needs_review(spec, policy):
        # Nobody approves their own job, whatever certificates they hold.
        eligible = frozenset(owners) - {principal.name}
        # Reviewed code is approved by a person even under an automatic policy: its weights
        # can carry the data, which no rule can judge for the owner.
        quorum = max(policy.approval.quorum, 1)
        if len(eligible) < quorum:
            fail(
                Rule.APPROVERS,
                f"the policy needs {quorum} owner approval(s) but the dataset has "
                f"{len(eligible)} eligible owner(s)",
            )
        else:
            requirement = ApprovalRequirement(
                dataset=name, owners=eligible, quorum=quorum, policy=policy.ref()
            )
    return reasons, requirement


def needs_review(spec: JobSpec, policy: PolicyDocument) -> bool:
    """Does a job of ``spec`` on the dataset of ``policy`` run the team's own Python under
    ``custom_code: reviewed``? Then it is approved by an owner whatever the approval mode, and
    its release waits for the owner's review of what its weights can carry."""
    return spec.is_custom and policy.trainers.custom_code is CustomCode.REVIEWED


def evaluate_submission(
    *,
    spec: JobSpec,
    principal: Principal,
    policies: Mapping[str, PolicyDocument],
    dataset_owners: Mapping[str, frozenset[str]],
    epsilon_spent: Mapping[str, float],
    now: dt.datetime,
    bits_spent: Mapping[str, float] | None = None,
) -> Decision:
    """Decide a submission against the policy of every dataset the spec names.

    ``policies`` maps a dataset name to its current policy; ``dataset_owners`` to the names of
    its owners (data-owner principals); ``epsilon_spent`` to the privacy budget its earlier
    jobs used (absent: none); ``bits_spent`` to the channel capacity its earlier jobs used
    (:mod:`policies.channels`). ``now`` must carry a time zone. The outcome is DENY with every
    failing rule, else NEEDS_APPROVAL naming who must approve per dataset, else AUTO_APPROVE.
    Raises :class:`InvalidInput` only for malformed arguments, never for a policy refusal.
    """
    require_aware(now, name="now")
    reasons: list[Reason] = []
    approvals: list[ApprovalRequirement] = []
    refs: list[PolicyRef] = []
    spent_used: list[tuple[str, float]] = []
    if principal.role is not Role.MODEL_TEAM:
        reasons.append(
            Reason(Rule.ROLE, None, f"role {principal.role!s} cannot submit jobs (model-team only)")
        )
    for ref in spec.datasets:
        name = ref.name
        policy = policies.get(name)
        if policy is None:
            reasons.append(Reason(Rule.NO_POLICY, name, "the dataset has no policy"))
            continue
        if policy.dataset != name:
            reasons.append(
                Reason(Rule.POLICY_MISMATCH, name, f"the policy given is for {policy.dataset!r}")
            )
            continue
        spent = _number(epsilon_spent.get(name, 0.0))
        if spent is None or spent < 0:
            raise InvalidInput(f"epsilon spent on {name!r} must be a finite number >= 0")
        if policy.release.dp is not None:
            spent_used.append((name, spent))
        refs.append(policy.ref())
        found, requirement = _check_dataset(
            spec=spec,
            principal=principal,
            policy=policy,
            owners=dataset_owners.get(name, frozenset()),
            spent=spent,
            now=now,
        )
        reasons.extend(found)
        if requirement is not None:
            approvals.append(requirement)
    # The leakage account is weighed once every other rule passes: a job denied for another
    # reason has no run to account for.
    bound = [p for p in (policies.get(r.name) for r in spec.datasets) if p is not None]
    if bound and not reasons:
        reasons.extend(_check_channels(spec, bound, bits_spent or {}))
    if reasons:
        outcome, approvals = Outcome.DENY, []
    elif approvals:
        outcome = Outcome.NEEDS_APPROVAL
    else:
        outcome = Outcome.AUTO_APPROVE
    return Decision(
        outcome=outcome,
        reasons=tuple(reasons),
        approvals=tuple(approvals),
        policies=tuple(sorted(refs, key=lambda r: r.dataset)),
        spec_digest=spec.digest(),
        principal=principal,
        evaluated_at=now,
        epsilon_spent=tuple(sorted(spent_used)),
    )


def job_account(spec: JobSpec, policies: Iterable[PolicyDocument]) -> channels.LeakageAccount:
    """What the team could observe of ``spec``'s job under ``policies``, in bits. A federated
    job runs up to ``rounds`` times ``timeout_s`` and shows the team one point (its mean loss)
    per round."""
    bound = list(policies)
    plan = spec.federation
    return channels.account(
        channels.job_channel_rules(bound),
        [p.release for p in bound],
        timeout_s=spec.resources.timeout_s * (plan.rounds if plan else 1),
        team_reads_logs=any(p.logs is LogVisibility.MODEL_TEAM for p in bound),
        points=plan.rounds if plan else None,
    )


def _check_channels(
    spec: JobSpec, bound: list[PolicyDocument], bits_spent: Mapping[str, float]
) -> list[Reason]:
    try:
        channels.check_account(
            job_account(spec, bound),
            spent=bits_spent,
            dataset_budgets={p.dataset: p.channels.dataset_budget_bits for p in bound},
        )
    except PolicyViolation as e:
        return [Reason(Rule.CHANNELS, None, r) for r in e.reasons]
    return []


def check_log_access(
    *,
    principal: Principal,
    submitter: Principal,
    datasets: Iterable[str],
    policies: Mapping[str, PolicyDocument],
    dataset_owners: Mapping[str, frozenset[str]],
) -> None:
    """Allow reading a job's stdout/stderr only if EVERY dataset of the job allows it.

    Logs can carry any dataset's data, so an owner of one dataset does not get to read a job's
    logs that also touched another's. Per dataset: its owners may read; the submitter and their
    team may read only where the policy says ``logs.visible_to: model-team``. Raises
    :class:`PermissionDenied` naming each dataset that refuses.
    """
    names = sorted(set(datasets))
    if not names:
        raise InvalidInput("a job without datasets has no log policy to apply")
    refused = []
    for name in names:
        policy = policies.get(name)
        if policy is None or policy.dataset != name:
            refused.append(f"{name}: the dataset has no policy")
            continue
        if principal.role is Role.DATA_OWNER and principal.name in dataset_owners.get(
            name, frozenset()
        ):
            continue
        same_team = principal.name == submitter.name or (
            bool(principal.team) and principal.team == submitter.team
        )
        if (
            principal.role is Role.MODEL_TEAM
            and same_team
            and policy.logs is LogVisibility.MODEL_TEAM
        ):
            continue
        refused.append(f"{name}: logs are visible to {policy.logs} only")
    if refused:
        raise PermissionDenied(f"{principal} may not read the job's logs: {'; '.join(refused)}")
