"""What the built-in trainers share: the Lightning module's optimizer and bookkeeping, batches
that are a function of the step (so a resumed run sees the batches the stopped one would
have), resume checkpoints, DP-SGD with Opacus, progress lines, and the fit itself.

Resuming. Every ``checkpoint_every`` steps the full training state (weights, optimizer,
schedule, loop counters, torch's RNG, the privacy accountant) is written atomically to
``<output>/checkpoints/last.ckpt``; a run that finds that file resumes from it, provided it was
written under the same trainer and hyperparameters (all but ``max_steps``, ``log_every`` and
``checkpoint_every``) and at a step before ``max_steps``. The checkpoint is a Lightning
(pickle) file that only this job's container writes and reads; the release gate never enters
the folder.

DP-SGD. With ``dp_epsilon`` set, each step draws a Poisson sample of the training set (each
sample in with probability ``q = batch_size / n``), Opacus computes per-sample gradients, clips
each to ``dp_max_grad_norm`` and adds Gaussian noise whose multiplier Opacus calibrates so that
the RDP accountant reaches at most ``dp_epsilon`` at ``dp_delta`` after ``max_steps`` steps.
Inside a site the noise multiplier and the sample rate are the site's
(:class:`~trainers.contract.DPParameters` in the job's configuration, from
:func:`trainers.privacy.calibrate`) and the trainer uses exactly those; only a run outside a
site calibrates its own. The site charges the ε it computes from its parameters; the metric
``epsilon`` this trainer reports is for the record only. The sampling and the noise come from
a random key drawn from the OS for the job and kept in its checkpoint (never from ``seed``,
which the model team knows: known noise could be subtracted). One sample is one training
block (causal LM) or one example (classification); DP runs are therefore not reproducible from
the seed.

The pieces live by concern: :mod:`trainers._module` (the Lightning module and its checkpoint
state), :mod:`trainers._batches` (step-determined batches), :mod:`trainers._dp_sgd` (Opacus)
and :mod:`trainers._callbacks` (resume checkpoints, progress lines); this module runs the fit
and keeps the public names.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from trainers._batches import StepBatches, step_batches, step_loader
from trainers._callbacks import JsonlProgress, ResumeCheckpoints
from trainers._dp_sgd import KEY_BYTES, RDP_ORDERS, PrivateTraining
from trainers._module import CHECKPOINT_FILE, TRAIN_LOSS_WINDOW, FineTuneModule, train_loss
from trainers.errors import ConfigError, TrainingFailed
from trainers.hparams import PREFIX, TrainingHyperparameters
from trainers.runtime import RunContext

__all__ = [
    "CHECKPOINT_FILE",
    "KEY_BYTES",
    "RDP_ORDERS",
    "TRAIN_LOSS_WINDOW",
    "FineTuneModule",
    "JsonlProgress",
    "PrivateTraining",
    "ResumeCheckpoints",
    "StepBatches",
    "common_metrics",
    "fit",
    "precision",
    "step_batches",
    "step_loader",
    "train_loss",
]


def precision(requested: str) -> str:
    """The Lightning precision a run uses: ``auto`` is bf16-mixed on a GPU with bf16."""
    gpu = torch.cuda.is_available()
    if requested == "auto":
        return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    if requested == "bf16-mixed" and gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{PREFIX}.precision", "bf16-mixed asked for on a GPU without bf16")
    return requested


def fit(
    module: FineTuneModule,
    data: pl.LightningDataModule,
    hp: TrainingHyperparameters,
    ctx: RunContext,
    *,
    trainer_name: str,
) -> pl.Trainer:
    """Train ``module`` on ``data`` for ``hp.max_steps`` steps (resuming from the job's
    checkpoint if there is one), then evaluate it once. Returns the training ``Trainer``."""
    module.resume_key = {"trainer": trainer_name, **hp.resume_key()}
    gpu = torch.cuda.is_available()
    common: dict[str, Any] = {
        "accelerator": "gpu" if gpu else "cpu",
        "devices": 1,
        "precision": precision(hp.precision),
        "deterministic": not gpu,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": ctx.scratch_dir,
    }
    callbacks: list[pl.Callback] = [JsonlProgress(ctx.progress_file, every=hp.log_every)]
    resume: Path | None = None
    if ctx.checkpoint_dir is not None:
        if hp.checkpoint_every:
            callbacks.append(ResumeCheckpoints(ctx.checkpoint_dir, every=hp.checkpoint_every))
        found = ctx.checkpoint_dir / CHECKPOINT_FILE
        if found.is_file():
            resume = found
    trainer = pl.Trainer(
        max_steps=hp.max_steps,
        max_epochs=-1,
        # Under DP the per-sample clipping is the clipping; a global clip would undo its maths.
        gradient_clip_val=(hp.gradient_clip or None) if module.private is None else None,
        # Evaluation runs once, after training, with a trainer of its own below.
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **common,
    )
    module.net.train()  # from_pretrained hands the model back in eval mode
    # Lightning turns deterministic algorithms on process-wide; restore the caller's setting.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            # Opacus' backward hooks on the embedding, whose input (token ids) needs no grad.
            warnings.filterwarnings("ignore", message=r"Full backward hook is firing")
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=False)
            pl.Trainer(**common).validate(module, datamodule=data, verbose=False)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if not module.train_losses:
        raise TrainingFailed("training finished without a training loss")
    return trainer


def common_metrics(module: FineTuneModule, trainer: pl.Trainer) -> dict[str, float]:
    """``train_loss``, ``steps`` and, under DP, the spent ``epsilon``."""
    loss = train_loss(module)
    if not math.isfinite(loss):
        raise TrainingFailed(f"training loss is not finite ({loss})")
    metrics = {"train_loss": loss, "steps": float(trainer.global_step)}
    if module.private is not None:
        epsilon = module.private.epsilon()
        if not math.isfinite(epsilon):
            raise TrainingFailed("the privacy accountant's epsilon is not finite")
        metrics["epsilon"] = epsilon
    return metrics
