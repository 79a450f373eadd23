"""An update as the integers that are masked and summed: the weight first, then each number
times ``weight / max_weight``, clipped to ±clip, in signed fixed point with ``frac_bits``
fractional bits, all as 64-bit words. Addition modulo 2^64 of two's-complement words is
addition of the integers as long as the true sum fits, which :class:`RoundConfig` ensures; so the
sum of the encodings decodes to the weighted mean with no offset to undo.
"""

from __future__ import annotations

import numpy as np

from enclave.secagg._round import RoundConfig
from policies.errors import InvalidInput


def encode(config: RoundConfig, update: np.ndarray, weight: int) -> tuple[np.ndarray, int]:
    """The words of ``update`` (a flat float vector of ``config.length``) at ``weight``, and how
    many of its numbers were clipped (the site records that; it is never sent)."""
    flat = np.asarray(update, dtype=np.float64)
    if flat.shape != (config.length,):
        raise InvalidInput(
            f"secure aggregation: an update of shape {flat.shape}, the round expects "
            f"({config.length},)"
        )
    if not np.isfinite(flat).all():
        raise InvalidInput("secure aggregation: the update holds a NaN or an infinity")
    if not 0 < weight <= config.max_weight:
        raise InvalidInput(f"secure aggregation: weight {weight} is outside 1..{config.max_weight}")
    clipped = int(np.count_nonzero(np.abs(flat) > config.clip))
    scaled = np.clip(flat, -config.clip, config.clip) * (weight / config.max_weight)
    fixed = np.rint(scaled * 2.0**config.frac_bits).astype(np.int64)
    words = np.empty(config.length + 1, dtype=np.uint64)
    words[0] = weight
    words[1:] = fixed.view(np.uint64)
    return words, clipped


def decode(config: RoundConfig, total: np.ndarray) -> tuple[np.ndarray, int]:
    """The weighted mean and the total weight from the sum of every survivor's words."""
    signed = total.view(np.int64)
    weight = int(signed[0])
    if weight <= 0:
        raise InvalidInput("secure aggregation: the summed weight is not positive")
    mean = signed[1:].astype(np.float64) / 2.0**config.frac_bits * (config.max_weight / weight)
    return mean, weight


def resolution(config: RoundConfig, survivors: int, weight: int) -> float:
    """The most the decoded mean can differ from the exact weighted mean of the clipped
    updates: half a unit in the last place per survivor, scaled as :func:`decode` scales."""
    return survivors * 0.5 / 2.0**config.frac_bits * config.max_weight / weight
