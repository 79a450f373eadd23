"""The release gate's privacy decisions: extractable memorization and the DP budget.

:func:`decide_memorization` refuses a release whose sampled reproduction rate exceeds the
owner's threshold or that recites any protected passage the whole-data scan flagged;
:func:`decide_dp` refuses one whose privacy loss, as the site's accountant computed it, exceeds
the per-job cap or the dataset's remaining budget. The measuring (probing the model, running
the accountant) is the gate's and the trainers'; what is decided here is pure, and its figures
hold nothing the job chose freely. Import from :mod:`policies.release`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from policies._release_outputs import round_significant
from policies._release_rules import (
    CheckName,
    CheckResult,
    DPRules,
    Figure,
    MemorizationRules,
)

# --- memorization ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorizationFigures:
    """What the memorization probe measured; counts only, never text."""

    samples: int
    exact: int
    near_verbatim: int
    """Continuations within the edit-distance ratio that are not exact."""
    prefix_tokens: int
    suffix_tokens: int
    passage_tokens: int = 0
    """The whole-data scan's span length; 0 when the scan did not run."""
    passages_recited: int = 0
    """Flagged spans the release reproduced from their natural context (exact or near). How
    many is the job's choice: it decides, and never leaves (see :func:`decide_memorization`)."""

    @property
    def rate(self) -> float:
        return (self.exact + self.near_verbatim) / self.samples if self.samples else 1.0


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Token-level Levenshtein distance divided by ``len(b)`` (the true suffix's length)."""
    if not b:
        return 0.0 if not a else 1.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[len(b)] / len(b)


def is_reproduced(generated: Sequence[int], truth: Sequence[int], *, ratio: float) -> bool:
    """A continuation reproduces ``truth`` when it is equal or within ``ratio`` edits per token."""
    return list(generated) == list(truth) or normalized_edit_distance(generated, truth) <= ratio


def decide_memorization(figures: MemorizationFigures, *, rules: MemorizationRules) -> CheckResult:
    """Refuse when the sampled rate exceeds the threshold, or when the whole-data scan found
    any passage the release reproduces.

    The figures are the policy's parameters, the sampled counts (at most ``rules.samples``,
    which the policy sets) and one flag for the scan; the number of passages recited is never
    given (it is the job's choice, so it would be a channel), only whether there was one.
    """
    reasons = []
    if figures.samples < 1:
        reasons.append("no protected text was long enough to probe the model")
    elif figures.rate > rules.max_rate:
        reasons.append(
            f"the model reproduced {figures.exact + figures.near_verbatim} of {figures.samples} "
            f"protected continuations (rate {figures.rate:.4f} > threshold {rules.max_rate:.4f})"
        )
    if figures.passages_recited:
        reasons.append(
            f"the model reproduced a protected passage of {figures.passage_tokens} tokens "
            "from its natural context"
        )
    return CheckResult.decide(
        CheckName.MEMORIZATION,
        reasons,
        {
            "samples": figures.samples,
            "exact": figures.exact,
            "near_verbatim": figures.near_verbatim,
            "rate": round(figures.rate, 6),
            "threshold": rules.max_rate,
            "prefix_tokens": figures.prefix_tokens,
            "suffix_tokens": figures.suffix_tokens,
            "near_verbatim_ratio": rules.near_verbatim_ratio,
            "passage_tokens": rules.passage_tokens,
            "passage_recited": figures.passages_recited > 0,
        },
    )


def _round_up_significant(value: float, digits: int) -> float:
    """``value`` to ``digits`` significant digits, never below it (a charge rounds up)."""
    rounded = round_significant(value, digits)
    if rounded < value:
        step = 10 ** (math.floor(math.log10(value)) - digits + 1)
        rounded = round_significant(rounded + step, digits)
    return rounded


# --- differential privacy (hook; the accountant is the trainers' part) ----------------------


def decide_dp(epsilon: float | None, *, spent: float, rules: DPRules) -> CheckResult:
    """Refuse unless ``epsilon`` (the job's privacy loss, as the site's accountant computed it)
    fits the per-job cap and, added to ``spent`` (what earlier releases on the same data used),
    the cumulative budget. None or +inf (no DP the site set) never fits; a NaN or negative
    value is refused, and a negative ``spent`` counts as nothing spent, never as budget won.
    The ``epsilon`` figure, which the gateway charges, is rounded up."""
    reasons = []
    if isinstance(spent, bool) or not isinstance(spent, int | float) or math.isnan(spent):
        reasons.append("the epsilon already spent is not a number")
        spent = math.inf
    spent = max(0.0, float(spent))
    if epsilon is None or epsilon == math.inf:
        reasons.append("the job ran without DP-SGD set by the site: its epsilon is unbounded")
    elif isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon < 0:
        reasons.append("the recorded epsilon is not a non-negative finite number")
    else:
        if epsilon > rules.max_epsilon_per_job:
            reasons.append(
                f"epsilon {epsilon:.4g} exceeds the per-job cap {rules.max_epsilon_per_job:.4g}"
            )
        if spent + epsilon > rules.epsilon_budget:
            reasons.append(
                f"epsilon {epsilon:.4g} after {spent:.4g} already spent exceeds the budget "
                f"{rules.epsilon_budget:.4g}"
            )
    figures: dict[str, Figure] = {
        "max_epsilon_per_job": rules.max_epsilon_per_job,
        "epsilon_budget": rules.epsilon_budget,
    }
    if math.isfinite(spent):
        figures["spent_before"] = spent
    if epsilon is not None and math.isfinite(epsilon) and epsilon >= 0:
        figures["epsilon"] = _round_up_significant(epsilon, 6)
    return CheckResult.decide(CheckName.DP, reasons, figures)
