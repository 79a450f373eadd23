"""A federated round of a whole model (``causal-lm``, ``classification``) in the trainer.

Secure aggregation sums the sites' updates and the gateway holds no base model, so a whole
model's global state travels as its difference from the base: for each tensor of the release
layout, the global value minus the base's where the base file stores that tensor, and the
global value itself where it does not (a classifier's new head). Every tensor travels in F32,
whatever the base's dtype (:func:`round_layout`): a BF16 difference would round small updates
away. Round 0's start is zero for the base's tensors (the base itself) and, for a new head, the
initialisation the gateway draws from the spec's seed (:func:`initial_start`), never from data.

In the container: :func:`apply_start` sets the freshly loaded model to base plus start;
:func:`export_difference` writes what was trained in the same form, so that the site's update
(written minus start) is the plain weight delta. At the site: :func:`compose` turns the final
global state back into the release (base plus difference, each tensor in its release dtype),
which the memorization probe reads and every site countersigns. A LoRA adapter needs none of
this: it is small, F32, and its start is the adapter itself (:func:`trainers.lora.load_adapter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainers.errors import ConfigError, WeightsError
from trainers.weights import (
    WEIGHTS_FILE,
    TensorLayout,
    export_layout,
    tensor_layout,
    verify_layout,
)

ROUND_DTYPE = "F32"
WHOLE_MODEL_TRAINERS = ("causal-lm", "classification")
HEAD_INIT_STD = 0.02
"""The standard deviation of a new head's round-0 initialisation (Hugging Face's default
``initializer_range``)."""


def whole_model(trainer: str) -> bool:
    """Whether a federated job of ``trainer`` federates the whole model (as its difference
    from the base) rather than a LoRA adapter."""
    return trainer in WHOLE_MODEL_TRAINERS


def round_layout(release: TensorLayout) -> TensorLayout:
    """The layout a round's start and update have: the release's names and shapes, in F32."""
    return {name: (ROUND_DTYPE, shape) for name, (_, shape) in release.items()}


def base_names(model_dir: Path) -> frozenset[str]:
    """The tensors the base model's weights file stores (the others start from nothing)."""
    return frozenset(tensor_layout(model_dir))


def initial_start(layout: TensorLayout, *, new: frozenset[str], seed: int) -> dict[str, Any]:
    """Round 0's start of a whole-model job as numpy arrays: zero for the base's tensors (the
    base model unchanged); for a ``new`` tensor (a classifier's head) its matrix drawn from
    N(0, ``HEAD_INIT_STD``²) with ``seed``, its vectors zero."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name in sorted(layout):
        _, shape = layout[name]
        if name in new and len(shape) >= 2:
            out[name] = rng.normal(0.0, HEAD_INIT_STD, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


def new_tensors(trainer: str) -> frozenset[str]:
    """The tensors of ``trainer``'s release the base model does not have: a classifier's
    head."""
    from trainers import labelled

    return frozenset({labelled.HEAD}) if trainer == "classification" else frozenset()


def apply_start(net: Any, start: Path, *, release: TensorLayout, model_dir: Path) -> None:
    """Set the model ``net`` (the base just loaded) to base plus ``start``, which must have
    exactly :func:`round_layout` of ``release``. Raises :class:`ConfigError` naming
    ``federated_round`` otherwise."""
    import torch
    from safetensors.torch import load_file

    try:
        verify_layout(expected=round_layout(release), actual=tensor_layout(start))
    except WeightsError as e:
        raise ConfigError("federated_round", f"the round's start does not fit: {e}") from e
    values = load_file(str(start))
    in_base = base_names(model_dir)
    state = net.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in values.items():
            target = state.get(name)
            if target is None:
                raise ConfigError("federated_round", f"the model has no tensor {name!r}")
            if not torch.isfinite(value).all():
                raise ConfigError("federated_round", f"the start of {name!r} is not finite")
            if name in in_base:
                target.add_(value.to(target.dtype))
            else:
                target.copy_(value.to(target.dtype))


def export_difference(
    state: Mapping[str, Any], *, release: TensorLayout, model_dir: Path, dest: Path
) -> None:
    """Write what was trained as a round's start is written: each tensor of ``release`` in F32,
    minus the base's value where the base stores it."""
    import torch
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as base:
        stored = set(base.keys())
        for name in release:
            trained = state[name].detach().to(torch.float32)
            if name in stored:
                trained = trained - base.get_tensor(name).to(torch.float32)
            out[name] = trained
    export_layout(out, expected=round_layout(release), dest=dest)


def compose(difference: Path, *, release: TensorLayout, model_dir: Path, dest: Path) -> None:
    """Write the release a whole-model job's final global state stands for: base plus
    ``difference`` where the base stores the tensor, the difference itself elsewhere, each in
    its ``release`` dtype. The same inputs give the same bytes at every site. Raises
    :class:`WeightsError` for a difference that does not fit or is not finite."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    verify_layout(expected=round_layout(release), actual=tensor_layout(difference))
    values = load_file(str(difference))
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as base:
        stored = set(base.keys())
        for name, value in values.items():
            if not bool(torch.isfinite(value).all()):
                raise WeightsError(f"the final difference of {name!r} is not finite")
            whole = value.to(torch.float64)
            if name in stored:
                whole = whole + base.get_tensor(name).to(torch.float64)
            out[name] = whole
    export_layout(out, expected=dict(release), dest=dest)
