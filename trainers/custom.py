"""Custom code: a model team's own LightningModule, run by the same harness as the built-ins.

The contract (also in the README). The bundle is mounted read-only at ``/code``; the spec's
``entrypoint`` names ``module:ClassName`` there. The class is a ``LightningModule`` built as
``ClassName(ctx, **hyperparameters)`` with the :class:`~trainers.runtime.RunContext` (dataset
directories, the base model directory, a scratch directory) and the spec's hyperparameters;
it loads its network from ``ctx.model_dir`` into ``self.model`` and provides its own
``train_dataloader`` (or a ``datamodule()`` method returning a ``LightningDataModule``). The
harness trains it for ``max_steps`` (a reserved hyperparameter, default 100), then writes
``self.model.state_dict()`` in the base model's exact tensor layout
(:func:`trainers.weights.export_like`) and the standard metrics the module logged
(``train_loss``, ``eval_loss``, ``perplexity``, ``accuracy``...), so its output goes through
the same release gate. Progress lines go to ``/output/metrics.jsonl`` as for the built-ins.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Mapping
from typing import Any

from trainers.contract import CUSTOM_DEFAULT_STEPS
from trainers.errors import ConfigError, TrainerError
from trainers.runtime import RunContext

STANDARD_METRICS = ("train_loss", "eval_loss", "perplexity", "accuracy", "tokens_seen", "epsilon")
RESERVED = ("max_steps",)


def load(entrypoint: str, *, code_dir: Any) -> type:
    """Import ``module:ClassName`` from ``code_dir``. Raises :class:`ConfigError`."""
    module_name, _, class_name = entrypoint.partition(":")
    if not module_name or not class_name:
        raise ConfigError("entrypoint", "must be 'module:ClassName'")
    sys.path.insert(0, str(code_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            "entrypoint", f"cannot import {module_name!r} from the bundle: {e}"
        ) from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError("entrypoint", f"{module_name} has no class {class_name!r}")
    return cls


def run(cls: type, hyperparameters: Mapping[str, Any], ctx: RunContext) -> dict[str, float]:
    """Train ``cls`` through Lightning and write its weights; return the metrics."""
    import pytorch_lightning as pl
    import torch

    from trainers.causal_lm import JsonlProgress
    from trainers.weights import export_like

    hp = dict(hyperparameters)
    max_steps = hp.pop("max_steps", CUSTOM_DEFAULT_STEPS)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(
            "hyperparameters.max_steps", f"must be a positive integer, got {max_steps!r}"
        )
    if not issubclass(cls, pl.LightningModule):
        raise ConfigError("entrypoint", f"{cls.__name__} is not a LightningModule")
    module = cls(ctx, **hp)
    net: Any = getattr(module, "model", None)
    if not isinstance(net, torch.nn.Module):
        raise ConfigError("entrypoint", f"{cls.__name__} has no network in self.model")
    make_data = getattr(module, "datamodule", None)
    datamodule = make_data() if callable(make_data) else None
    gpu = torch.cuda.is_available()
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=ctx.scratch_dir,
        num_sanity_val_steps=0,
        callbacks=[JsonlProgress(ctx.progress_file, every=1)],
    )
    trainer.fit(module, datamodule=datamodule)
    export_like(net.state_dict(), base_dir=ctx.model_dir, dest=ctx.weights_file)
    metrics: dict[str, float] = {"steps": float(trainer.global_step)}
    for name in STANDARD_METRICS:
        value = trainer.callback_metrics.get(name)
        if value is not None:
            v = float(value)
            if not math.isfinite(v):
                raise TrainerError(f"metric {name} is not finite")
            metrics[name] = v
    return metrics
