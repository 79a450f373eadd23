"""What a ``causal-lm-lora`` release is, computed by the site from trusted inputs only.

The job writes the adapter's tensors and nothing else; the site must know, before it reads a
byte of the job's output, which tensors those are (names, shapes, dtypes) and it writes the
adapter's ``adapter_config.json`` itself, since any file the job writes can carry data. Both
come from here, from the site's copy of the base model (its ``config.json`` and safetensors
headers) and the approved hyperparameters, and the trainer builds its adapter from the very
same values, so what it writes and what the site expects cannot drift apart.

Torch-free: the layout follows PEFT's naming (``base_model.model.<module>.lora_A.weight``,
``[r, in]``, and ``lora_B.weight``, ``[out, r]``, per wrapped linear layer, biases untouched),
read off the base model's tensor headers. Only Llama-family architectures, whose projections
named in :data:`~trainers.hparams.LORA_TARGETS` are all plain linear layers, are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainers.errors import ConfigError, WeightsError
from trainers.hparams import PREFIX, LoRAHyperparameters
from trainers.weights import TensorLayout, tensor_layout, verify_layout

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The file names PEFT's ``from_pretrained`` reads in an adapter directory."""
ADAPTER_DTYPE = "F32"
"""The trainer keeps the adapter in fp32 (its master weights); the gate narrows it on release."""
PEFT_PREFIX = "base_model.model."

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})
"""``model_type`` values whose target projections are ``nn.Linear`` stored as ``[out, in]``."""


def read_config(model_dir: Path) -> dict[str, Any]:
    """The base model's ``config.json`` as a dict. Raises :class:`ConfigError` (``model``)."""
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("model", f"the base model's config.json cannot be read: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError("model", "the base model's config.json is not a JSON object")
    return raw


def require_family(config: dict[str, Any], *, trainer: str) -> str:
    """The config's ``model_type`` if it is one of :data:`LLAMA_FAMILY`; else ConfigError."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ConfigError(
            "model",
            f"the {trainer} trainer supports base models of type "
            f"{', '.join(sorted(LLAMA_FAMILY))}; this one is {model_type!r}",
        )
    return str(model_type)


def adapter_layout(model_dir: Path, hp: LoRAHyperparameters) -> TensorLayout:
    """The exact tensors the trainer writes for ``hp`` over the base model in ``model_dir``.

    Raises :class:`ConfigError` naming ``model`` for an unsupported architecture and
    ``hyperparameters.target_modules`` for a target the base model does not have.
    """
    require_family(read_config(model_dir), trainer="causal-lm-lora")
    base = tensor_layout(model_dir)
    out: TensorLayout = {}
    matched: set[str] = set()
    for name, (_, shape) in sorted(base.items()):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or len(shape) != 2:
            continue
        target = module.rpartition(".")[2]
        if target not in hp.targets:
            continue
        rows, cols = shape
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (ADAPTER_DTYPE, (hp.lora_r, cols))
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (ADAPTER_DTYPE, (rows, hp.lora_r))
        matched.add(target)
    missing = sorted(set(hp.targets) - matched)
    if missing:
        raise ConfigError(
            f"{PREFIX}.target_modules",
            f"the base model has no linear layer named {', '.join(missing)}",
        )
    return out


def load_adapter(net: Any, path: Path, *, expected: TensorLayout) -> None:
    """Set the adapter of the PEFT model ``net`` to the tensors in ``path`` (a federated
    round's global adapter), which must have exactly the layout ``expected``. Raises
    :class:`ConfigError` naming ``federated_round`` otherwise."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        verify_layout(expected=expected, actual=tensor_layout(path))
    except WeightsError as e:
        raise ConfigError("federated_round", f"the starting adapter does not fit: {e}") from e
    result = set_peft_model_state_dict(net, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError("federated_round", f"the starting adapter has {unexpected[0]!r}")


def adapter_config(hp: LoRAHyperparameters) -> dict[str, Any]:
    """The ``adapter_config.json`` of the release: PEFT's ``LoraConfig`` fields for ``hp``.

    The trainer builds its ``LoraConfig(**adapter_config(hp))`` from the same dict, so the
    released config describes exactly the adapter that was trained. No path or name of the
    site's base model is recorded (``base_model_name_or_path`` is null).
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": hp.lora_r,
        "lora_alpha": hp.lora_alpha,
        "lora_dropout": hp.lora_dropout,
        "target_modules": list(hp.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_config_bytes(hp: LoRAHyperparameters) -> bytes:
    """:func:`adapter_config` as the canonical bytes the site writes into the release."""
    return (json.dumps(adapter_config(hp), sort_keys=True, indent=2) + "\n").encode("ascii")
