"""Hyperparameters of the built-in trainers: frozen values parsed from the job's untrusted JSON.

Torch-free on purpose, so that the gateway can refuse a bad spec at submission with the same
rules the harness applies in the container. Every field declares its type and bounds; unknown
names, wrong types (``true`` is not an integer, ``"0.1"`` is not a number), non-finite numbers
and out-of-range values raise :class:`~trainers.errors.ConfigError` naming the field as
``hyperparameters.<name>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from trainers.contract import BUILTIN_DEFAULT_STEPS
from trainers.errors import ConfigError

PREFIX = "hyperparameters"

T = TypeVar("T")


def _spec(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple[str, ...] = (),
    doc: str = "",
) -> Any:
    return field(
        default=default,
        metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc},
    )


DP_DEFAULT_DELTA = 1e-5
DP_DEFAULT_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD as asked for: ``target_epsilon`` at ``delta`` after ``max_steps`` steps, each
    sample's gradient clipped to ``max_grad_norm`` (the noise is calibrated to that)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainingHyperparameters:
    """What every built-in trainer takes: the optimizer, its schedule, seeding, progress,
    checkpoints and differential privacy. DP-SGD is on when ``dp_epsilon`` is set (the same
    name the access policy charges the dataset's privacy budget with)."""

    max_steps: int = _spec(BUILTIN_DEFAULT_STEPS, lo=1, hi=1_000_000, doc="optimizer steps")
    learning_rate: float = _spec(1e-3, lo=0.0, hi=1.0, lo_open=True, doc="peak AdamW rate")
    batch_size: int = _spec(8, lo=1, hi=4096, doc="samples per step (expected, under DP)")
    seed: int = _spec(0, lo=0, hi=2**32 - 1, doc="seeds split, shuffling and torch")
    eval_fraction: float = _spec(0.1, lo=0.0, hi=0.5, lo_open=True, doc="samples held out")
    weight_decay: float = _spec(0.0, lo=0.0, hi=1.0, doc="AdamW decay on matrices")
    warmup_steps: int = _spec(0, lo=0, hi=1_000_000, doc="linear warm-up, then linear decay")
    gradient_clip: float = _spec(1.0, lo=0.0, hi=1e6, doc="max grad norm; 0 disables; not DP")
    log_every: int = _spec(1, lo=1, hi=1_000_000, doc="steps between progress lines")
    precision: str = _spec(
        "auto", choices=("auto", "32-true", "bf16-mixed"), doc="auto: bf16-mixed on a GPU with bf16"
    )
    checkpoint_every: int = _spec(
        0, lo=0, hi=1_000_000, doc="steps between resume checkpoints (/output/checkpoints); 0: none"
    )
    dp_epsilon: float | None = _spec(
        None, lo=0.0, hi=100.0, lo_open=True, doc="DP-SGD target epsilon; unset: no DP"
    )
    dp_delta: float | None = _spec(
        None, lo=0.0, hi=1e-3, lo_open=True, doc=f"DP delta (default {DP_DEFAULT_DELTA})"
    )
    dp_max_grad_norm: float | None = _spec(
        None,
        lo=0.0,
        hi=1e4,
        lo_open=True,
        doc=f"DP per-sample clipping norm (default {DP_DEFAULT_MAX_GRAD_NORM})",
    )

    def __post_init__(self) -> None:
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"{PREFIX}.warmup_steps",
                f"must not exceed max_steps ({self.max_steps}), got {self.warmup_steps}",
            )
        if self.dp_epsilon is None:
            for name in ("dp_delta", "dp_max_grad_norm"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{PREFIX}.{name}", "is only used with dp_epsilon, unset")

    @property
    def dp(self) -> DPSettings | None:
        """The DP-SGD settings, or None when the job trains without differential privacy."""
        if self.dp_epsilon is None:
            return None
        return DPSettings(
            target_epsilon=self.dp_epsilon,
            delta=DP_DEFAULT_DELTA if self.dp_delta is None else self.dp_delta,
            max_grad_norm=(
                DP_DEFAULT_MAX_GRAD_NORM if self.dp_max_grad_norm is None else self.dp_max_grad_norm
            ),
        )

    def resume_key(self) -> dict[str, Any]:
        """The hyperparameters a checkpoint must have been written under to be resumed: all
        but those that only say how often to report or save, and how long to train (except
        under DP, whose noise is calibrated to ``max_steps``: more steps would overspend)."""
        skip = {"log_every", "checkpoint_every"}
        if self.dp_epsilon is None:
            skip.add("max_steps")
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name not in skip}


@dataclass(frozen=True)
class CausalLMHyperparameters(TrainingHyperparameters):
    """Full fine-tune of a causal language model on the text files of the job's datasets."""

    block_size: int = _spec(64, lo=8, hi=1_048_576, doc="tokens per block (≤ model context)")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Self:
        return parse_hyperparameters(cls, raw)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers a LoRA adapter may wrap (attention and MLP projections of Llama-family
models); anything else is refused, so the adapter's layout is known before the job runs."""


@dataclass(frozen=True)
class LoRAHyperparameters(CausalLMHyperparameters):
    """LoRA (PEFT) on a causal language model: the base stays frozen, only the adapter trains
    and is released. ``target_modules`` is a comma-separated subset of :data:`LORA_TARGETS`."""

    lora_r: int = _spec(8, lo=1, hi=1024, doc="adapter rank")
    lora_alpha: float = _spec(16.0, lo=0.0, hi=1e4, lo_open=True, doc="scaling is alpha / r")
    lora_dropout: float = _spec(0.0, lo=0.0, hi=0.9, doc="dropout on the adapter's input")
    target_modules: str = _spec(
        "q_proj,v_proj", doc=f"comma-separated, from {', '.join(LORA_TARGETS)}"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        where = f"{PREFIX}.target_modules"
        names = [n.strip() for n in self.target_modules.split(",")]
        if not self.target_modules.strip() or any(not n for n in names):
            raise ConfigError(where, "must name at least one module, comma-separated")
        unknown = sorted({n for n in names if n not in LORA_TARGETS})
        if unknown:
            shown = ", ".join(repr(n[:32]) for n in unknown[:3])
            raise ConfigError(where, f"{shown} not allowed; choose from {', '.join(LORA_TARGETS)}")
        if len(set(names)) != len(names):
            raise ConfigError(where, "names a module twice")

    @property
    def targets(self) -> tuple[str, ...]:
        """The target modules, sorted (the order PEFT's config records them in)."""
        return tuple(sorted(n.strip() for n in self.target_modules.split(",")))


MAX_LABELS = 1000
MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class ClassificationHyperparameters(TrainingHyperparameters):
    """Sequence classification over labelled JSONL or CSV files. ``labels`` (comma-separated)
    fixes the classes and their order; unset, they are the sorted distinct labels of the data
    and the release names them ``LABEL_<i>`` only (label strings are data and do not leave)."""

    learning_rate: float = _spec(5e-4, lo=0.0, hi=1.0, lo_open=True, doc="peak AdamW rate")
    max_length: int = _spec(128, lo=4, hi=1_048_576, doc="tokens per text (truncated)")
    labels: str | None = _spec(None, doc="comma-separated class names, in index order")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is None:
            return
        where = f"{PREFIX}.labels"
        names = [n.strip() for n in self.labels.split(",")]
        if any(not n for n in names):
            raise ConfigError(where, "an empty label name")
        if not 2 <= len(names) <= MAX_LABELS:
            raise ConfigError(where, f"must name 2 to {MAX_LABELS} labels, got {len(names)}")
        if any(len(n) > MAX_LABEL_CHARS or not n.isprintable() for n in names):
            raise ConfigError(where, f"labels are printable and at most {MAX_LABEL_CHARS} long")
        if len(set(names)) != len(names):
            raise ConfigError(where, "names a label twice")

    @property
    def label_names(self) -> tuple[str, ...] | None:
        return None if self.labels is None else tuple(n.strip() for n in self.labels.split(","))

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Self:
        return parse_hyperparameters(cls, raw)


def _check(name: str, value: Any, kind: Any, meta: Mapping[str, Any]) -> Any:
    where = f"{PREFIX}.{name}"
    if isinstance(kind, str) and kind.endswith(" | None"):
        # An optional field: JSON null (or leaving it out) means unset.
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind in (int, "int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(where, f"must be an integer, got {type(value).__name__}")
    elif kind in (float, "float"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(where, f"must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(where, f"must be finite, got {value}")
    elif kind in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(where, f"must be a string, got {type(value).__name__}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(where, f"must be one of {', '.join(meta['choices'])}; got {value!r}")
        return value
    else:  # pragma: no cover - a field declared with a type this parser does not know
        raise TypeError(f"{where}: unsupported field type {kind!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
        raise ConfigError(where, f"must be {'>' if meta['lo_open'] else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(where, f"must be <= {hi}, got {value}")
    return value


def parse_hyperparameters(cls: type[T], raw: Mapping[str, Any]) -> T:
    """Build ``cls`` (a frozen dataclass declared with ``_spec`` fields) from ``raw``.

    Missing names take their defaults. Raises :class:`ConfigError` naming the first bad field;
    unknown names are all listed, sorted.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(PREFIX, f"must be an object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise ConfigError(
            f"{PREFIX}.{unknown[0]}",
            f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}",
        )
    values = {
        name: _check(name, raw[name], fields[name].type, fields[name].metadata)
        for name in fields
        if name in raw
    }
    return cls(**values)


def describe(cls: type[Any]) -> dict[str, dict[str, Any]]:
    """Each field's default, bounds and meaning, for documentation and the CLI."""
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        out[f.name] = {
            "default": f.default,
            **{k: v for k, v in meta.items() if v not in (None, ())},
        }
    return out
