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
from typing import Any, TypeVar

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


@dataclass(frozen=True)
class CausalLMHyperparameters:
    """Full fine-tune of a causal language model on the text files of the job's datasets."""

    max_steps: int = _spec(30, lo=1, hi=1_000_000, doc="optimizer steps")
    learning_rate: float = _spec(1e-3, lo=0.0, hi=1.0, lo_open=True, doc="peak AdamW rate")
    batch_size: int = _spec(8, lo=1, hi=4096, doc="blocks per step")
    block_size: int = _spec(64, lo=8, hi=1_048_576, doc="tokens per block (≤ model context)")
    seed: int = _spec(0, lo=0, hi=2**32 - 1, doc="seeds split, shuffling and torch")
    eval_fraction: float = _spec(0.1, lo=0.0, hi=0.5, lo_open=True, doc="blocks held out")
    weight_decay: float = _spec(0.0, lo=0.0, hi=1.0, doc="AdamW decay on matrices")
    warmup_steps: int = _spec(0, lo=0, hi=1_000_000, doc="linear warm-up, then linear decay")
    gradient_clip: float = _spec(1.0, lo=0.0, hi=1e6, doc="max grad norm; 0 disables")
    log_every: int = _spec(1, lo=1, hi=1_000_000, doc="steps between progress lines")
    precision: str = _spec(
        "auto", choices=("auto", "32-true", "bf16-mixed"), doc="auto: bf16-mixed on a GPU with bf16"
    )

    def __post_init__(self) -> None:
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"{PREFIX}.warmup_steps",
                f"must not exceed max_steps ({self.max_steps}), got {self.warmup_steps}",
            )

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CausalLMHyperparameters:
        return parse_hyperparameters(cls, raw)


def _check(name: str, value: Any, kind: Any, meta: Mapping[str, Any]) -> Any:
    where = f"{PREFIX}.{name}"
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
