"""What the model team may observe about a job, and how many bits of the data it can carry.

The adversary is the submitted code: anything it can influence and the team can see is a channel
out of the site. Every such thing is made coarse here, by rules the data owner sets in the
policy's ``channels`` section, and counted:

* progress: at most ``progress_points`` points at step fractions fixed in advance by the site
  (:func:`progress_schedule`), each with the loss rounded to ``loss_digits`` significant digits
  in a fixed range (:func:`coarse_loss`), published on the job's time grid;
* the outcome: a terminal state with a reason from a fixed vocabulary (:class:`TeamReason`),
  never a name, a count, a code or a text the job wrote (owners see the details);
* times: the site publishes the states a job can influence only on a grid of
  ``time_quantum_s`` seconds counted from its start, and the team sees times rounded to it;
* metrics: allowed names, rounded to significant digits between ``min_abs`` and ``max_abs``.

:func:`account` computes the capacity in bits of all of it at once (the log2 of the number of
distinct things the team could see), as a :class:`LeakageAccount` that is recorded with the
decision, in the site's audit and in the release record; :func:`check_account` refuses a job
whose account exceeds a budget. Pure code: no I/O, no clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from policies.errors import InvalidInput, PolicyViolation
from policies.release import CheckName, ReleaseRules

LOSS_MIN = 1e-3
"""Losses below this are shown as 0: the shown range is fixed, so its size is known."""
LOSS_MAX = 1e3
"""Losses at or above this (and non-finite ones) are shown as this value."""
MAX_PROGRESS_POINTS = 20
LOG_CAP_BYTES = 1024 * 1024
"""The most of a job's stdout and stderr the site keeps (and shows, where a policy lets the
team read logs)."""


class TeamReason(enum.StrEnum):
    """Every reason the model team can be shown for a state the job could influence.

    Each is a fixed text; the details (which tensor, which exit code, how many forks) stay
    with the owners. The vocabulary's size is part of the account.
    """

    RUNNING = "running in the enclave"
    CHECKING = "release checks"
    RELEASED = "released"
    REJECTED_ARTIFACTS = "rejected: release artifacts"
    REJECTED_WEIGHTS = "rejected: weights structure"
    REJECTED_METRICS = "rejected: metrics"
    REJECTED_MEMORIZATION = "rejected: memorization"
    REJECTED_DP = "rejected: differential privacy"
    REJECTED_SLOW = "rejected: release checks timed out"
    REJECTED_SIGNING = "rejected: release record"
    FAILED_EXIT = "failed: non-zero exit"
    FAILED_TIMEOUT = "failed: timeout"
    FAILED_MEMORY = "failed: out of memory"
    FAILED_LIMIT = "failed: resource limit"
    CANCELLED = "cancelled"
    ERROR = "error: the site could not complete the run"
    AWAITING_REVIEW = "waiting for the owner's review of the release"
    RELEASED_AFTER_REVIEW = "released after the owners' review"
    REJECTED_BY_REVIEW = "rejected: owner's review of the release"
    """The review's ends are the owners' decisions, at times they choose: counted all the same,
    since what they decide on (the weights) is what the job wrote."""


REJECTED_BY_CHECK: Mapping[CheckName, TeamReason] = MappingProxyType(
    {
        CheckName.ARTIFACTS: TeamReason.REJECTED_ARTIFACTS,
        CheckName.WEIGHTS: TeamReason.REJECTED_WEIGHTS,
        CheckName.METRICS: TeamReason.REJECTED_METRICS,
        CheckName.MEMORIZATION: TeamReason.REJECTED_MEMORIZATION,
        CheckName.DP: TeamReason.REJECTED_DP,
    }
)

OUTCOMES: frozenset[TeamReason] = frozenset(TeamReason) - {
    TeamReason.RUNNING,
    TeamReason.CHECKING,
    TeamReason.AWAITING_REVIEW,
}
"""The ends a started job can come to, as the team sees them."""


@dataclass(frozen=True)
class ChannelRules:
    """An owner's limits on what the model team observes; the defaults fit 512 bits."""

    job_budget_bits: float = 512.0
    dataset_budget_bits: float = 262_144.0
    progress_points: int = 10
    loss_digits: int = 2
    time_quantum_s: float = 30.0
    gate_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not 0 <= self.progress_points <= MAX_PROGRESS_POINTS:
            raise InvalidInput(f"progress_points must be 0..{MAX_PROGRESS_POINTS}")
        if not 1 <= self.loss_digits <= 4:
            raise InvalidInput("loss_digits must be 1..4")
        for name in ("job_budget_bits", "dataset_budget_bits", "time_quantum_s", "gate_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidInput(f"{name} must be a finite number > 0")

    def to_dict(self) -> dict[str, float]:
        return {
            "job_budget_bits": self.job_budget_bits,
            "dataset_budget_bits": self.dataset_budget_bits,
            "progress_points": self.progress_points,
            "loss_digits": self.loss_digits,
            "time_quantum_s": self.time_quantum_s,
            "gate_timeout_s": self.gate_timeout_s,
        }


def strictest(rules: Iterable[ChannelRules]) -> ChannelRules:
    """One job's rules when it reads several datasets: the tightest of each limit.

    Raises :class:`InvalidInput` for an empty list (fail closed: no rules is no job).
    """
    found = list(rules)
    if not found:
        raise InvalidInput("a job without channel rules cannot be accounted for")
    return ChannelRules(
        job_budget_bits=min(r.job_budget_bits for r in found),
        dataset_budget_bits=min(r.dataset_budget_bits for r in found),
        progress_points=min(r.progress_points for r in found),
        loss_digits=min(r.loss_digits for r in found),
        time_quantum_s=max(r.time_quantum_s for r in found),
        gate_timeout_s=min(r.gate_timeout_s for r in found),
    )


# --- what the team is shown --------------------------------------------------------------------


def progress_schedule(total_steps: int, points: int) -> tuple[int, ...]:
    """The steps at which progress is shown: ``points`` fractions of the site's step count,
    fixed before the job starts (the job's own ``step`` and ``total`` only say which point it
    has passed, never when a point is)."""
    if total_steps <= 0 or points <= 0:
        return ()
    return tuple(
        sorted({max(1, math.ceil(total_steps * k / points)) for k in range(1, points + 1)})
    )


def coarse_loss(loss: float, digits: int) -> float:
    """``loss`` rounded to ``digits`` significant digits within [LOSS_MIN, LOSS_MAX]."""
    if not math.isfinite(loss) or loss >= LOSS_MAX:
        return LOSS_MAX
    if loss < LOSS_MIN:
        return 0.0
    exponent = math.floor(math.log10(loss)) - digits + 1
    value = round(loss / 10.0**exponent) * 10.0**exponent
    return min(float(f"{value:.{digits}g}"), LOSS_MAX)


STOP_GRACE_S = 60.0
"""A run ends at most this long after its timeout (the runtime's kill, escalated, included)."""


def grid_ticks(span_s: float, quantum_s: float) -> int:
    """The most grid points (multiples of ``quantum_s`` since the epoch) in any interval of
    ``span_s`` seconds: where in it a publication can fall."""
    return math.ceil(span_s / quantum_s) + 1


def next_tick(now_s: float, quantum_s: float) -> float:
    """The first grid point at or after ``now_s`` (seconds since the epoch): when the site
    publishes a state the job could have influenced."""
    return math.ceil(now_s / quantum_s) * quantum_s


def round_time(seconds: float, quantum_s: float) -> float:
    """A time as the team sees it: down to the grid."""
    return math.floor(seconds / quantum_s) * quantum_s


# --- the account ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeakageAccount:
    """The capacity in bits of each thing the model team can observe about one job.

    ``items`` maps a channel's name to its bits; ``total`` is their sum (an upper bound of what
    the channels carry together); ``budget`` is the per-job budget it was held to.
    """

    items: Mapping[str, float]
    budget: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", MappingProxyType(dict(self.items)))

    @property
    def total(self) -> float:
        return sum(self.items.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": {k: round(v, 3) for k, v in sorted(self.items.items())},
            "total_bits": round(self.total, 3),
            "budget_bits": self.budget,
        }


def _log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _rounded_values(digits: int, decades: int) -> int:
    """How many non-zero positive values rounding to ``digits`` digits gives over ``decades``."""
    return int(9 * 10 ** (digits - 1) * decades)


def metric_values(release: ReleaseRules) -> int:
    """Distinct values one released metric can take, "absent" and zero included."""
    decades = max(1, math.ceil(math.log10(release.max_abs_metric / release.min_abs_metric)))
    return 2 * _rounded_values(release.metric_significant_digits, decades) + 2


def account(
    rules: ChannelRules,
    releases: Sequence[ReleaseRules],
    *,
    timeout_s: float,
    team_reads_logs: bool = False,
    points: int | None = None,
) -> LeakageAccount:
    """The capacity of every channel the team observes for a job with a ``timeout_s`` run,
    shown ``points`` progress points (the rules' number unless given: a federated job shows one
    per round).

    Raises :class:`InvalidInput` when there are no release rules (fail closed).
    """
    if not releases:
        raise InvalidInput("a job without release rules cannot be accounted for")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InvalidInput("timeout_s must be a finite number > 0")
    items: dict[str, float] = {}
    ticks = grid_ticks(timeout_s + STOP_GRACE_S, rules.time_quantum_s)
    if points is None:
        points = rules.progress_points
    if points:
        loss_values = 6 * _rounded_values(rules.loss_digits, 1) + 2  # 6 decades, 0, LOSS_MAX
        items["progress.loss"] = points * math.log2(loss_values)
        # Each point appears at one grid tick or never, in order: a non-decreasing map of the
        # points onto ticks + 1 slots.
        items["progress.time"] = _log2_binomial(ticks + points, points)
    metrics = max(
        min(r.max_metrics, len(r.allowed_metrics)) * math.log2(metric_values(r)) for r in releases
    )
    items["metrics"] = metrics
    items["outcome"] = math.log2(len(OUTCOMES))
    items["time.end-of-run"] = math.log2(ticks + 1)
    items["time.release-checks"] = math.log2(
        grid_ticks(rules.gate_timeout_s, rules.time_quantum_s) + 1
    )
    memo = [r.memorization for r in releases if r.memorization is not None]
    if memo:
        # The signed record carries the probe's exact and near-verbatim counts: a passing
        # release has at most m = floor(threshold x samples) hits in all, so (m+1)(m+2)/2 pairs.
        def pairs(samples: int, max_rate: float) -> float:
            m = math.floor(max_rate * samples)
            return math.log2((m + 1) * (m + 2) / 2)

        items["release.memorization-figures"] = max(pairs(m.samples, m.max_rate) for m in memo)
    if team_reads_logs:
        # The policy shows the team what the job printed: every byte up to the site's cap.
        items["logs"] = 8.0 * LOG_CAP_BYTES
    return LeakageAccount(items, rules.job_budget_bits)


def check_account(
    acct: LeakageAccount,
    *,
    spent: Mapping[str, float] | None = None,
    dataset_budgets: Mapping[str, float] | None = None,
) -> None:
    """Raise :class:`PolicyViolation` when the account exceeds the per-job budget, or when,
    added to what earlier jobs on a dataset already spent, it exceeds that dataset's budget."""
    reasons = []
    if acct.total > acct.budget:
        reasons.append(
            f"what the team could observe of this job carries up to {acct.total:.0f} bits; the "
            f"policy's per-job budget is {acct.budget:g} bits (fewer progress points, fewer "
            "metrics or digits, a coarser time grid or a shorter timeout lower it)"
        )
    for name, budget in sorted((dataset_budgets or {}).items()):
        used = (spent or {}).get(name, 0.0)
        if not math.isfinite(used) or used < 0:
            raise InvalidInput(f"bits spent on {name!r} must be a finite number >= 0")
        if used + acct.total > budget:
            reasons.append(
                f"{name}: {acct.total:.0f} bits after {used:.0f} already spent exceed the "
                f"dataset's channel budget of {budget:g} bits"
            )
    if reasons:
        raise PolicyViolation(
            "the job's observable channels exceed the budget", reasons=tuple(reasons)
        )


def job_channel_rules(policies: Iterable[Any]) -> ChannelRules:
    """The strictest channel rules of the policies a job is bound to (``.channels`` each)."""
    return strictest(p.channels for p in policies)
