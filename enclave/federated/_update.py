"""A round's update as the flat vector secure aggregation sums, and back.

At the site: the update is the weights the job trained minus the round's start
(:func:`write_update`), written as a weights file so that the site's release gate checks it as
it would weights (structure, re-quantisation to the release dtype, scrubbing); the gated update
is then read back as one flat float vector (:func:`read_vector`), tensor by tensor in name
order, and the round's training loss appended (:func:`round_vector`). At the gateway: the next
global model is the start plus the mean update (:func:`apply_mean`).

Both ends take the layout (names, shapes) from the start, so the vector needs no header. A
start holds float tensors numpy keeps exactly (F16, F32, F64; a LoRA adapter is F32); a gated
update may be narrower (BF16), and is read through torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from policies.errors import IntegrityError
from trainers import rounds
from trainers.errors import WeightsError
from trainers.weights import TensorLayout, tensor_layout, verify_layout

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
MAX_ROUND_WEIGHT = 2**20
"""The most a site's FedAvg weight counts for: the masked sum's fixed point is sized for it
(the round's ``max_weight``)."""
LOSS_MAX = 64.0
"""The round's training loss rides in the sum as ``loss / LOSS_MAX`` of the clip range: losses
above this are summed as this."""


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
    """How many numbers an update of ``layout`` has (the round's loss not counted)."""
    return sum(math.prod(shape) for _, shape in layout.values())


def write_update(trained: Path, start: Path, dest: Path) -> None:
    """Write ``trained`` minus ``start``, in the start's layout, to ``dest``. ``trained`` is the
    job's output: its header is read strictly first. Raises :class:`IntegrityError` unless it
    has exactly the start's layout."""
    layout = update_layout(start)
    try:
        verify_layout(expected=layout, actual=tensor_layout(trained))
    except WeightsError as e:
        raise IntegrityError(f"federated round: the trained weights do not fit: {e}") from e
    a, b = load_file(str(trained)), load_file(str(start))
    diff = {n: (a[n].astype(np.float64) - b[n]).astype(b[n].dtype) for n in layout}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(diff, str(dest), metadata={"format": "pt"})


def read_vector(path: Path, layout: TensorLayout) -> np.ndarray:
    """The tensors of ``path`` (any float dtype, BF16 included) flat in name order, as float64.
    Raises :class:`IntegrityError` unless its names and shapes are ``layout``'s."""
    import torch
    from safetensors.torch import load_file as load_torch

    try:
        actual = tensor_layout(path)
    except WeightsError as e:
        raise IntegrityError(f"federated round: the gated update is unreadable: {e}") from e
    if {n: s for n, (_, s) in actual.items()} != {n: s for n, (_, s) in layout.items()}:
        raise IntegrityError("federated round: the gated update does not fit the start")
    tensors = load_torch(str(path))
    return np.concatenate([tensors[n].to(torch.float64).numpy().ravel() for n in sorted(layout)])


def round_vector(update: np.ndarray, loss: float, *, clip: float) -> np.ndarray:
    """The vector a site masks: its update, then its loss scaled into the clip range."""
    shown = min(max(loss, 0.0), LOSS_MAX) if math.isfinite(loss) else LOSS_MAX
    return np.append(update, shown / LOSS_MAX * clip)


def split_mean(mean: np.ndarray, *, clip: float) -> tuple[np.ndarray, float]:
    """The mean update and the mean loss from the decoded mean of the round's vectors."""
    return mean[:-1], float(mean[-1]) * LOSS_MAX / clip


def initial_adapter(layout: TensorLayout, *, seed: int, dest: Path) -> None:
    """Write a federated LoRA job's round-0 start: each ``lora_A`` uniform in
    ``±1/sqrt(fan_in)`` (PEFT's default, Kaiming-uniform with ``a = sqrt(5)``), each ``lora_B``
    zero, from ``seed``: a function of the public layout and the spec, never of any data.
    Raises :class:`IntegrityError` for a tensor that is not a LoRA matrix."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in sorted(layout):
        dtype, shape = layout[name]
        if dtype not in _DTYPES or len(shape) != 2:
            raise IntegrityError(f"federated round: {name} is not a LoRA matrix")
        if name.endswith("lora_A.weight"):
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(_DTYPES[dtype])
        elif name.endswith("lora_B.weight"):
            out[name] = np.zeros(shape, dtype=_DTYPES[dtype])
        else:
            raise IntegrityError(f"federated round: {name} is not a LoRA matrix")
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest), metadata={"format": "pt"})


def initial_start(trainer: str, layout: TensorLayout, *, seed: int, dest: Path) -> None:
    """Write round 0's start of a federated job of ``trainer``: a LoRA adapter's
    (:func:`initial_adapter`), or a whole model's difference from the base (zero, and a new
    head drawn from ``seed``: :func:`trainers.rounds.initial_start`). A function of the public
    layout and the spec, never of any data. Raises :class:`IntegrityError` for a layout that is
    not the trainer's."""
    if not rounds.whole_model(trainer):
        initial_adapter(layout, seed=seed, dest=dest)
        return
    odd = sorted(n for n, (dtype, _) in layout.items() if dtype != rounds.ROUND_DTYPE)
    if odd or not layout:
        raise IntegrityError(f"federated round: tensors not in {rounds.ROUND_DTYPE}: {odd[:3]}")
    start = rounds.initial_start(layout, new=rounds.new_tensors(trainer), seed=seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(start, str(dest), metadata={"format": "pt"})


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
