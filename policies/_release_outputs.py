"""The release gate's structural checks on what a job wrote: the weights' layout and the metrics.

:func:`compare_layout` says how the job's tensors differ from the declared model's (names,
dtypes, shapes) and :func:`check_metrics` accepts a flat object of allowed names to finite,
rounded numbers. Both treat the job's output as hostile: a reason names what the rules or the
base model expected and the kind of difference found, never a job-chosen name or value, since
refusal reasons travel back to the model team. Import from :mod:`policies.release`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from policies._release_rules import (
    ArtifactKind,
    CheckName,
    CheckResult,
    Layout,
    ReleaseRules,
)

# --- layouts ---------------------------------------------------------------------------------


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def compare_layout(actual: Layout, expected: Layout, *, what: str = "base model") -> list[str]:
    """Reasons the job's tensors differ from ``expected``; empty when they are equal.

    Names of unexpected tensors are job text and are never echoed, only counted. For expected
    tensors the reason gives the expected dtype or shape and says what kind of value was found.
    """
    reasons: list[str] = []
    extra = [n for n in actual if n not in expected]
    if extra:
        reasons.append(
            f"{len(extra)} tensor(s) not in the {what}'s layout (names withheld: job text)"
        )
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            reasons.append(f"tensor {name!r} of the {what} is missing")
            continue
        if got.dtype != want.dtype:
            reasons.append(
                f"tensor {name!r}: dtype {got.dtype} differs from the {what}'s {want.dtype}"
            )
        if got.shape != want.shape:
            reasons.append(
                f"tensor {name!r}: shape differs from the {what}'s {_shape_text(want.shape)} "
                f"(found rank {len(got.shape)}; values withheld)"
            )
    return reasons


# --- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsDecision:
    """The checked metrics (rounded) and the check's result."""

    values: Mapping[str, float]
    result: CheckResult


def round_significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant decimal digits; -0.0 becomes 0.0."""
    rounded = float(f"{value:.{digits}g}")
    return 0.0 if rounded == 0 else rounded


def check_metrics(raw: Any, *, rules: ReleaseRules) -> MetricsDecision:
    """Check parsed ``metrics.json`` content against the rules.

    ``raw`` is what the gate's strict JSON reader produced. Accepted: a flat object of allowed
    names (at most ``rules.max_metrics``) to finite numbers within ``rules.max_abs_metric``;
    bools, strings, nulls, lists and nested objects are refused. Accepted values are rounded to
    ``rules.metric_significant_digits`` so that low-order digits cannot carry data.
    """
    reasons: list[str] = []
    if not isinstance(raw, dict):
        reasons.append("metrics.json is not a JSON object")
        return MetricsDecision({}, CheckResult.decide(CheckName.METRICS, reasons))
    if ArtifactKind.METRICS not in rules.allowed_artifacts and raw:
        reasons.append("the release policy allows no metrics")
    if len(raw) > rules.max_metrics:
        # Past the cap nothing else is looked at, and the job's count is not echoed.
        reasons.append(f"more metrics than the cap of {rules.max_metrics}")
        return MetricsDecision({}, CheckResult.decide(CheckName.METRICS, reasons))
    values: dict[str, float] = {}
    unknown = 0
    for name, value in raw.items():
        if not isinstance(name, str) or name not in rules.allowed_metrics:
            unknown += 1
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            reasons.append(f"metric {name!r} is not a number")
            continue
        try:
            number = float(value)
        except OverflowError:
            reasons.append(f"metric {name!r} exceeds {rules.max_abs_metric:g} in magnitude")
            continue
        if not math.isfinite(number):
            reasons.append(f"metric {name!r} is not finite")
            continue
        if abs(number) > rules.max_abs_metric:
            reasons.append(f"metric {name!r} exceeds {rules.max_abs_metric:g} in magnitude")
            continue
        values[name] = (
            0.0
            if abs(number) < rules.min_abs_metric
            else round_significant(number, rules.metric_significant_digits)
        )
    if unknown:
        reasons.append("metric names not allowed by the policy (names withheld)")
    # The count is a figure only when the metrics are released (and show it anyway).
    result = CheckResult.decide(CheckName.METRICS, reasons)
    if result.passed:
        result = CheckResult.decide(CheckName.METRICS, [], {"count": len(values)})
    return MetricsDecision(MappingProxyType(values) if result.passed else {}, result)
