"""Loading a release as the model it is, for the memorization probe.

The model is what the release is, loaded from the canonical files the gate wrote over the
site's trusted base model, by transformers and peft from safetensors only, no remote code: a
full release is the base configuration with exactly the released weights; a LoRA adapter is
loaded with ``PeftModel.from_pretrained`` over the base (as a model team would) and merged; a
classifier's backbone is laid over the base causal LM (its language-model head, tied to the
embedding where the base ties them), since a classifier has no head to generate with. A
release that cannot be loaded that way raises :class:`NotProbeable`, and the gate refuses it.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from policies.errors import InvalidInput

CONFIG_FILES = ("config.json", "generation_config.json")
LM_HEAD_PREFIX = "lm_head."


_LOADING = threading.RLock()
_F = TypeVar("_F", bound=Callable[..., Any])


def _one_at_a_time(load: _F) -> _F:
    """One model load in this process at a time: transformers' loading sets process-wide
    state (its init and device contexts), and two gates probing at once (two jobs at one site,
    or sites that share a process) loaded a model with keys missing. Re-entrant: a release's
    load may load the base."""

    @functools.wraps(load)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOADING:
            return load(*args, **kwargs)

    return locked  # type: ignore[return-value]


class NotProbeable(InvalidInput):
    """The release cannot be loaded as the model it claims to be, so it cannot be probed."""


@_one_at_a_time
def load_released_model(model_dir: Path, weights: Path) -> Any:
    """The base model's architecture with exactly ``weights`` (a canonical safetensors file).

    Raises :class:`InvalidInput` if the weights do not fill the model exactly.
    """
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="sealroom-gate-") as tmp:
        for name in CONFIG_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, Path(tmp) / name)
        if not (Path(tmp) / "config.json").is_file():
            raise InvalidInput(f"base model directory {model_dir} has no config.json")
        # A link, not a copy: the release file is the gate's own and may be large.
        os.symlink(weights.resolve(), Path(tmp) / "model.safetensors")
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    model, info = loaded
    # A weight transformers had to initialise itself would make the probe test a random model.
    problems = sorted(k for k, v in info.items() if v)  # missing/unexpected/mismatched keys
    if problems:
        raise InvalidInput(f"released weights do not fill the base model: {problems}")
    model.eval()
    return model


@_one_at_a_time
def _load_base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )


@_one_at_a_time
def load_adapter_release(model_dir: Path, weights: Path) -> Any:
    """The base model with the released LoRA adapter (``weights`` and the
    ``adapter_config.json`` beside it) loaded by ``PeftModel.from_pretrained``, then merged.

    Raises :class:`NotProbeable` if peft does not load it, or loads other values than the
    released ones (a tensor left at its initialisation would probe a model that is not the
    release).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    base = _load_base(model_dir)
    try:
        with warnings.catch_warnings():
            # peft asking transformers for a name transformers deprecates: not ours.
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            model: Any = PeftModel.from_pretrained(base, str(weights.parent), is_trainable=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise NotProbeable(f"peft does not load the adapter: {type(e).__name__}") from e
    released = load_file(str(weights))
    loaded = get_peft_model_state_dict(model)
    if set(loaded) != set(released):
        raise NotProbeable("the loaded adapter's tensors differ from the released ones")
    for name, tensor in released.items():
        if not torch.equal(loaded[name], tensor.to(loaded[name].dtype)):
            raise NotProbeable(f"tensor {name!r} did not load with its released values")
    merged = model.merge_and_unload()
    merged.eval()
    return merged


@_one_at_a_time
def load_backbone_release(model_dir: Path, weights: Path) -> Any:
    """The base causal LM with a classifier release's backbone laid over it.

    Every base tensor but the language-model head must be covered by a released tensor of the
    same name and shape (the classifier's own head, which the base lacks, is left out). Raises
    :class:`NotProbeable` otherwise.
    """
    from safetensors.torch import load_file

    model = _load_base(model_dir)
    released = load_file(str(weights))
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = 0
    with torch.no_grad():
        for name, param in params.items():
            if name.startswith(LM_HEAD_PREFIX):
                continue
            tensor = released.get(name)
            if tensor is None:
                raise NotProbeable(f"the release does not cover the base tensor {name!r}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise NotProbeable(f"tensor {name!r} has another shape than the base's")
            param.copy_(tensor.to(param.dtype))
            covered += 1
    if not covered:
        raise NotProbeable("the release shares no tensor with the base model")
    model.eval()
    return model
