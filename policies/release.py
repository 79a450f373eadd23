"""Release rules and the release gate's pure checks: what may leave a site, decided without I/O.

A data owner's release policy becomes a frozen :class:`ReleaseRules`. The gate
(:mod:`enclave.gate`) reads the job's ``/output`` and calls the functions here to decide:
:func:`check_metrics` (a flat object of allowed names and finite, rounded numbers),
:func:`compare_layout` (the weights' tensor names, dtypes and shapes equal the declared model's),
:func:`decide_memorization` (the extractable-memorization rate under the owner's threshold) and
:func:`decide_dp` (the privacy loss within the per-job and cumulative budgets).

Everything a job writes is hostile, and refusal reasons travel back to the model team, so a
reason never echoes a job-chosen string or number: it names what the *rules* or the *base model*
expected (tensor names from the base layout, allowed metric names, dtype names from a fixed
vocabulary) and says what kind of difference was found. Otherwise a refused release would itself
be a channel out of the site. For the same reason a check's figures (which are signed into the
release manifest) hold no number the job chose freely, such as file counts or sizes.

This module is the public surface; the code lives by concern in :mod:`policies._release_rules`
(the rules and result values), :mod:`policies._release_outputs` (layout and metrics) and
:mod:`policies._release_privacy` (memorization and DP decisions).
"""

from __future__ import annotations

from policies._release_outputs import (
    MetricsDecision,
    check_metrics,
    compare_layout,
    round_significant,
)
from policies._release_privacy import (
    MemorizationFigures,
    decide_dp,
    decide_memorization,
    is_reproduced,
    normalized_edit_distance,
)
from policies._release_rules import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    MANDATORY_CHECKS,
    MAX_PASSAGE_TOKENS,
    MAX_REASONS,
    MAX_SCRUB_BITS,
    METRIC_NAME_RE,
    RELEASE_DTYPES,
    RULES_SCHEMA,
    SCAN,
    ArtifactKind,
    CheckName,
    CheckOutcome,
    CheckResult,
    DPRules,
    Figure,
    Layout,
    MemorizationRules,
    OutputLimits,
    ReleaseRules,
    ScanThresholds,
    TensorSpec,
    cap_reasons,
    make_layout,
)

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "MANDATORY_CHECKS",
    "MAX_PASSAGE_TOKENS",
    "MAX_REASONS",
    "MAX_SCRUB_BITS",
    "METRIC_NAME_RE",
    "RELEASE_DTYPES",
    "RULES_SCHEMA",
    "SCAN",
    "ArtifactKind",
    "CheckName",
    "CheckOutcome",
    "CheckResult",
    "DPRules",
    "Figure",
    "Layout",
    "MemorizationFigures",
    "MemorizationRules",
    "MetricsDecision",
    "OutputLimits",
    "ReleaseRules",
    "ScanThresholds",
    "TensorSpec",
    "cap_reasons",
    "check_metrics",
    "compare_layout",
    "decide_dp",
    "decide_memorization",
    "is_reproduced",
    "make_layout",
    "normalized_edit_distance",
    "round_significant",
]
