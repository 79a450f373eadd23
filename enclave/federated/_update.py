"""A round's update as the flat vector secure aggregation sums, and back: the difference of the
weights a site trained from the round's start, tensor by tensor in name order, and the next
global model as the start plus the mean of those differences.

Both ends read the same layout (names, dtypes, shapes) from the start file, so the vector needs
no header: the gateway and every site agree on it before any site trains. Only float tensors
numpy holds exactly (F16, F32, F64) take part; a LoRA adapter is F32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from policies.errors import IntegrityError
from trainers.errors import WeightsError
from trainers.weights import TensorLayout, tensor_layout, verify_layout

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def update_layout(start: Path) -> TensorLayout:
    """The layout of a round's start: the layout every update of the round has. Raises
    :class:`IntegrityError` for one that is not a well-formed file of float tensors."""
    try:
        layout = tensor_layout(start)
    except WeightsError as e:
        raise IntegrityError(f"federated round: the start is not usable: {e}") from e
    odd = sorted(n for n, (dtype, _) in layout.items() if dtype not in _DTYPES)
    if odd or not layout:
        raise IntegrityError(f"federated round: tensors that cannot be averaged: {odd[:3]}")
    return layout


def update_length(layout: TensorLayout) -> int:
    """How many numbers an update of ``layout`` has."""
    return sum(math.prod(shape) for _, shape in layout.values())


def update_vector(trained: Path, start: Path) -> np.ndarray:
    """``trained`` minus ``start``, flat, as float64. Raises :class:`IntegrityError` unless both
    have exactly the start's layout."""
    layout = update_layout(start)
    try:
        verify_layout(expected=layout, actual=tensor_layout(trained))
    except WeightsError as e:
        raise IntegrityError(f"federated round: the trained weights do not fit: {e}") from e
    a, b = load_file(str(trained)), load_file(str(start))
    return np.concatenate(
        [(a[n].astype(np.float64) - b[n].astype(np.float64)).ravel() for n in sorted(layout)]
    )


def apply_mean(start: Path, mean: np.ndarray, dest: Path) -> None:
    """Write ``start`` plus ``mean`` (a flat vector of the start's layout) to ``dest``, each
    tensor in its own dtype. Raises :class:`IntegrityError` for a vector of another length or
    one that is not finite."""
    layout = update_layout(start)
    if mean.shape != (update_length(layout),) or not np.isfinite(mean).all():
        raise IntegrityError("federated round: the mean does not fit the start's layout")
    tensors = load_file(str(start))
    out: dict[str, np.ndarray] = {}
    at = 0
    for name in sorted(layout):
        dtype, shape = layout[name]
        size = math.prod(shape)
        step = mean[at : at + size].reshape(shape)
        out[name] = (tensors[name].astype(np.float64) + step).astype(_DTYPES[dtype])
        at += size
    partial = dest.with_name(f".{dest.name}.partial")
    save_file(out, str(partial), metadata={"format": "pt"})
    partial.replace(dest)
