"""Release rules as values: what a data owner lets leave a site, and what a check decides.

:class:`ReleaseRules` is the owner's release policy as the gate applies it (which checks run,
which artifacts and metric names may leave, the release dtype and the bits scrubbed, the
memorization and DP parameters, the caps on ``/output``); invalid rules raise
:class:`PolicyDocumentError` on construction, so a gate never runs under rules that pass
everything. The safetensors dtype vocabulary, tensor layouts, and :class:`CheckResult` (one
check's outcome, figures and capped reasons) are the shared vocabulary of the checks in
:mod:`policies._release_outputs` and :mod:`policies._release_privacy`. Import from
:mod:`policies.release`.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.errors import PolicyDocumentError

RULES_SCHEMA = "sealroom.release-rules/v1"


class ArtifactKind(enum.StrEnum):
    """What a job may release: safetensors weights and a flat object of numeric metrics."""

    WEIGHTS = "weights"
    METRICS = "metrics"


class CheckName(enum.StrEnum):
    """The gate's checks, in the order they run."""

    ARTIFACTS = "artifacts"
    WEIGHTS = "weights"
    METRICS = "metrics"
    MEMORIZATION = "memorization"
    DP = "dp"


MANDATORY_CHECKS: frozenset[CheckName] = frozenset(
    {CheckName.ARTIFACTS, CheckName.WEIGHTS, CheckName.METRICS}
)
"""Structural checks no policy may turn off: without them nothing else the gate says holds."""


class CheckOutcome(enum.StrEnum):
    PASSED = "passed"
    REFUSED = "refused"
    NOT_RUN = "not-run"
    """An earlier check it depends on refused; counts as a refusal."""


# safetensors dtype name -> bytes per element. Only these are understood; anything else is refused.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U64": 8,
        "U32": 4,
        "U16": 2,
        "U8": 1,
        "BOOL": 1,
    }
)
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})
"""Dtypes the gate can re-quantise; released weights must be made of these only."""
RELEASE_DTYPES: frozenset[str] = frozenset({"BF16", "F16"})
"""Release dtypes: narrow enough that rounding to them wipes the low-order bits of wider floats."""
MAX_SCRUB_BITS = 4
"""At most this many of the release dtype's mantissa bits (7 for BF16, 10 for F16) are rounded
away: beyond it the model itself suffers."""

METRIC_NAME_RE = re.compile(r"^[a-z][a-z0-9_./-]{0,63}$")
MAX_REASONS = 32
"""Refusal reasons kept per check; a hostile output must not make the refusal itself large."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: its safetensors dtype name and its shape."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise PolicyDocumentError(f"layout: unknown dtype {self.dtype!r}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.shape):
            raise PolicyDocumentError(f"layout: shape {self.shape!r} is not a tuple of sizes")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


Layout = Mapping[str, TensorSpec]


def make_layout(raw: Mapping[str, TensorSpec | tuple[str, Iterable[int]]]) -> Layout:
    """A layout from ``name -> TensorSpec`` or ``name -> (dtype, shape)``; read-only."""
    out: dict[str, TensorSpec] = {}
    for name, spec in raw.items():
        if isinstance(spec, TensorSpec):
            out[name] = spec
        else:
            dtype, shape = spec
            out[name] = TensorSpec(dtype=dtype, shape=tuple(shape))
    if not out:
        raise PolicyDocumentError("layout: an empty layout declares no model")
    return MappingProxyType(out)


@dataclass(frozen=True)
class OutputLimits:
    """Caps on what the gate will look at in ``/output`` before reading any content."""

    max_files: int = 64
    max_file_bytes: int = 64 * 1024**3
    max_total_bytes: int = 256 * 1024**3
    max_header_bytes: int = 8 * 1024**2
    max_tensors: int = 100_000
    max_rank: int = 8
    max_metrics_bytes: int = 64 * 1024
    max_depth: int = 2


@dataclass(frozen=True)
class MemorizationRules:
    """Extractable memorization, two ways.

    Sampled: ``samples`` prefixes of ``prefix_tokens`` from the protected texts, greedy
    continuations of ``suffix_tokens`` compared with the true suffixes; refused when the rate of
    reproduced continuations exceeds ``max_rate``.

    Whole data: every span of ``passage_tokens`` tokens of the protected texts is scored under
    the release and the base model (see :class:`ScanThresholds`), and the spans flagged are
    confirmed by greedy generation from their natural preceding context; refused when any one
    is reproduced. A continuation counts as reproduced when its token-level edit distance to
    the truth is at most ``near_verbatim_ratio`` of its length (0 is exact)."""

    samples: int = 64
    prefix_tokens: int = 32
    suffix_tokens: int = 50
    max_rate: float = 0.01
    near_verbatim_ratio: float = 0.10
    seed: int = 0
    passage_tokens: int = 50

    def __post_init__(self) -> None:
        if self.samples < 1 or self.prefix_tokens < 1 or self.suffix_tokens < 1:
            raise PolicyDocumentError("memorization: samples, prefix and suffix must be positive")
        if not 2 <= self.passage_tokens <= MAX_PASSAGE_TOKENS:
            raise PolicyDocumentError(
                f"memorization: passage_tokens must be 2..{MAX_PASSAGE_TOKENS}"
            )
        if not 0.0 <= self.max_rate < 1.0:
            raise PolicyDocumentError("memorization: max_rate must lie in [0, 1)")
        if not 0.0 <= self.near_verbatim_ratio < 1.0:
            raise PolicyDocumentError("memorization: near_verbatim_ratio must lie in [0, 1)")


MAX_PASSAGE_TOKENS = 4096


@dataclass(frozen=True)
class ScanThresholds:
    """When the whole-data scan flags a span of the protected data for confirmation.

    For each span of ``passage_tokens`` consecutive tokens of a text (each token predicted from
    the tokens before it in the same text, with at least a quarter of the model's context where
    the text has it), four figures: the mean per-token loss (nats) under the release and under
    the base model, and the fraction of tokens that are each model's top prediction (its greedy
    choice).
    A span is flagged when the release knows it far better than the base:

    - by loss: release loss <= ``loss_ratio`` x base loss, and base - release >= ``loss_margin``;
    - or by top-1: release top-1 >= ``top1`` and release - base top-1 >= ``top1_gain``.

    The top-1 rule is there because a loss can be inflated without changing a single greedy
    choice (logits divided by a constant): a span recited exactly has release top-1 = 1. At
    most ``max_confirmations`` spans are confirmed, the highest release top-1 first (then the
    largest loss drop), one per ``passage_tokens`` of text; so a job that makes many spans look
    suspicious hides a recited one only behind others with top-1 at least as high, that is behind
    other spans it recites (top-1 = 1 is an exact recital from the scan's own context).
    """

    loss_ratio: float = 0.5
    loss_margin: float = 1.0
    top1: float = 0.6
    top1_gain: float = 0.25
    max_confirmations: int = 64


SCAN = ScanThresholds()


@dataclass(frozen=True)
class DPRules:
    """Differential-privacy budgets: the most one job may spend and the dataset's lifetime total."""

    max_epsilon_per_job: float
    epsilon_budget: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("max_epsilon_per_job", "epsilon_budget", "delta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise PolicyDocumentError(f"dp: {name} must be a positive finite number")


@dataclass(frozen=True)
class ReleaseRules:
    """A data owner's release policy, as the gate applies it.

    ``checks`` lists the checks to run; the structural ones (:data:`MANDATORY_CHECKS`) must be
    there, and a check that needs parameters must have them. Invalid rules raise
    :class:`PolicyDocumentError` on construction, so a gate never runs under rules that would
    pass everything.
    """

    version: str
    checks: frozenset[CheckName]
    allowed_artifacts: frozenset[ArtifactKind] = frozenset(ArtifactKind)
    adapter_only: bool = False
    allowed_metrics: frozenset[str] = frozenset()
    max_metrics: int = 32
    metric_significant_digits: int = 4
    max_abs_metric: float = 1e12
    min_abs_metric: float = 1e-6
    """Released metric values smaller than this in magnitude are released as 0: with
    ``max_abs_metric`` it bounds how many values a metric can take (its bits in the account)."""
    release_dtype: str = "BF16"
    scrub_bits: int = 2
    """Low mantissa bits of the release dtype rounded away (to nearest, ties to even): a payload
    placed in bits that survive the narrowing to ``release_dtype`` dies here."""
    memorization: MemorizationRules | None = None
    dp: DPRules | None = None
    limits: OutputLimits = field(default_factory=OutputLimits)

    def __post_init__(self) -> None:
        if not self.version:
            raise PolicyDocumentError("release rules: version is empty")
        if not self.checks:
            raise PolicyDocumentError("release rules: an empty list of checks would pass anything")
        missing = MANDATORY_CHECKS - self.checks
        if missing:
            raise PolicyDocumentError(
                f"release rules: checks {sorted(missing)} cannot be turned off"
            )
        if ArtifactKind.WEIGHTS not in self.allowed_artifacts:
            raise PolicyDocumentError("release rules: weights must be an allowed artifact")
        if self.release_dtype not in RELEASE_DTYPES:
            raise PolicyDocumentError(
                f"release rules: release_dtype {self.release_dtype!r} is not one of "
                f"{sorted(RELEASE_DTYPES)}"
            )
        if not 0 <= self.scrub_bits <= MAX_SCRUB_BITS:
            raise PolicyDocumentError(f"release rules: scrub_bits must be 0..{MAX_SCRUB_BITS}")
        if not 1 <= self.metric_significant_digits <= 9:
            raise PolicyDocumentError("release rules: metric_significant_digits must be 1..9")
        if not 0 <= self.max_metrics <= 1024:
            raise PolicyDocumentError("release rules: max_metrics must be 0..1024")
        if not (math.isfinite(self.max_abs_metric) and self.max_abs_metric > 0):
            raise PolicyDocumentError("release rules: max_abs_metric must be positive and finite")
        if not (0 < self.min_abs_metric < self.max_abs_metric):
            raise PolicyDocumentError(
                "release rules: min_abs_metric must be positive and below max_abs_metric"
            )
        bad = sorted(n for n in self.allowed_metrics if not METRIC_NAME_RE.match(n))
        if bad:
            raise PolicyDocumentError(f"release rules: metric names {bad} are not well formed")
        if CheckName.MEMORIZATION in self.checks and self.memorization is None:
            raise PolicyDocumentError("release rules: the memorization check needs its parameters")
        if CheckName.DP in self.checks and self.dp is None:
            raise PolicyDocumentError("release rules: the dp check needs its budgets")


# --- results -------------------------------------------------------------------------------

Figure = int | float | str | bool


@dataclass(frozen=True)
class CheckResult:
    """What one check decided, with the figures it decided on (never data, never job text)."""

    name: CheckName
    outcome: CheckOutcome
    figures: Mapping[str, Figure] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", MappingProxyType(dict(self.figures)))
        if self.outcome is CheckOutcome.PASSED and self.reasons:
            raise ValueError("a passed check carries no refusal reasons")
        if self.outcome is not CheckOutcome.PASSED and not self.reasons:
            raise ValueError("a refused check must say why")

    @property
    def passed(self) -> bool:
        return self.outcome is CheckOutcome.PASSED

    @classmethod
    def decide(
        cls, name: CheckName, reasons: Iterable[str], figures: Mapping[str, Figure] | None = None
    ) -> CheckResult:
        """PASSED when there are no reasons, REFUSED otherwise (reasons capped)."""
        kept = cap_reasons(reasons)
        outcome = CheckOutcome.REFUSED if kept else CheckOutcome.PASSED
        return cls(name=name, outcome=outcome, figures=figures or {}, reasons=kept)

    @classmethod
    def not_run(cls, name: CheckName, because: CheckName) -> CheckResult:
        return cls(
            name=name,
            outcome=CheckOutcome.NOT_RUN,
            reasons=(f"not run: the {because} check refused",),
        )


def cap_reasons(reasons: Iterable[str]) -> tuple[str, ...]:
    items = list(reasons)
    if len(items) > MAX_REASONS:
        extra = len(items) - MAX_REASONS
        return (*items[:MAX_REASONS], f"... and {extra} more")
    return tuple(items)
