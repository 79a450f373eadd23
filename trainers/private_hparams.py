"""The hyperparameters of the private-graph trainer (:mod:`trainers.private`), torch-free so
that the harness and the gateway refuse a bad configuration before torch is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainers.errors import ConfigError
from trainers.hparams import DP_DEFAULT_DELTA, DP_DEFAULT_MAX_GRAD_NORM

PREFIX = "hyperparameters"
_PREFIX = PREFIX


@dataclass(frozen=True)
class PrivateHyperparameters:
    """What a private job may set. The DP parameters follow from them (site-computed)."""

    dp_epsilon: float
    dp_delta: float = DP_DEFAULT_DELTA
    dp_max_grad_norm: float = DP_DEFAULT_MAX_GRAD_NORM
    max_steps: int = 50
    batch_size: int = 16
    learning_rate: float = 0.1
    block_size: int = 64
    seed: int = 0

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> PrivateHyperparameters:
        """Torch-free validation; raises :class:`ConfigError` naming the field."""
        known = {f for f in cls.__dataclass_fields__}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{_PREFIX}.{key}", "unknown for trainer 'private'")
        if "dp_epsilon" not in raw:
            raise ConfigError(f"{_PREFIX}.dp_epsilon", "required: a private job is always DP")
        bounds: dict[str, tuple[type, float, float]] = {
            "dp_epsilon": (float, 0.01, 100.0),
            "dp_delta": (float, 1e-12, 1e-3),
            "dp_max_grad_norm": (float, 1e-6, 1e6),
            "max_steps": (int, 1, 100_000),
            "batch_size": (int, 1, 65_536),
            "learning_rate": (float, 1e-8, 1e3),
            "block_size": (int, 2, 65_536),
            "seed": (int, 0, 2**31 - 1),
        }
        values: dict[str, Any] = {}
        for key, value in raw.items():
            kind, lo, hi = bounds[key]
            ok = not isinstance(value, bool) and isinstance(value, int | float)
            if kind is int:
                ok = ok and isinstance(value, int)
            if not ok or not math.isfinite(float(value)) or not lo <= float(value) <= hi:
                raise ConfigError(
                    f"{_PREFIX}.{key}", f"must be {kind.__name__} within [{lo:g}, {hi:g}]"
                )
            values[key] = kind(value)
        return cls(**values)
