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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers import privacy
from trainers.contract import DPParameters
from trainers.errors import ConfigError, TrainingFailed
from trainers.hparams import PREFIX, DPSettings, TrainingHyperparameters
from trainers.runtime import RunContext

CHECKPOINT_FILE = "last.ckpt"
TRAIN_LOSS_WINDOW = 10
"""``train_loss`` in metrics.json is the mean of the last this many steps' losses."""
KEY_BYTES = 32
_LOOSE_ORDER = privacy.LOOSE_ORDER
RDP_ORDERS = privacy.RDP_ORDERS


def _derive(key: bytes, purpose: bytes, step: int) -> int:
    """A 63-bit seed for ``purpose`` at ``step``, from the job's secret key."""
    digest = hashlib.sha256(key + purpose + step.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class StepBatches(Sampler[list[int]]):
    """Endless batches of row indices, each a function of its absolute step alone.

    Without ``poisson_rate``: epochs of a seeded permutation cut into ``batch_size`` batches
    (the last of an epoch smaller). With it: each row joins a step's batch with that
    probability, drawn from ``key()`` (batches may be empty). Iteration starts at ``start()``,
    read when iteration begins, so that a run resumed at step k goes on with batch k.
    """

    def __init__(
        self,
        rows: int,
        *,
        batch_size: int,
        seed: int,
        start: Callable[[], int],
        poisson_rate: float | None = None,
        key: Callable[[], bytes] | None = None,
    ) -> None:
        if rows < 1:
            raise ValueError("rows must be at least 1")
        if poisson_rate is not None and key is None:
            raise ValueError("Poisson sampling needs the job's secret key")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.poisson_rate = poisson_rate
        self.key = key

    def batch(self, step: int) -> list[int]:
        if self.poisson_rate is not None:
            assert self.key is not None
            g = torch.Generator().manual_seed(_derive(self.key(), b"sample", step))
            mask = torch.rand(self.rows, generator=g) < self.poisson_rate
            return [int(i) for i in mask.nonzero().flatten()]
        per_epoch = math.ceil(self.rows / self.batch_size)
        epoch, at = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.rows, generator=g)
        return [int(i) for i in order[at * self.batch_size : (at + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start()
        while True:
            yield self.batch(step)
            step += 1


def step_batches(
    data: pl.LightningDataModule,
    rows: int,
    *,
    batch_size: int,
    seed: int,
    private: PrivateTraining | None,
) -> StepBatches:
    """The batches of ``data``'s training rows, starting at its trainer's step."""

    def start() -> int:
        trainer = data.trainer
        return int(trainer.global_step) if trainer is not None else 0

    if private is None:
        return StepBatches(rows, batch_size=batch_size, seed=seed, start=start)
    return StepBatches(
        rows,
        batch_size=batch_size,
        seed=seed,
        start=start,
        poisson_rate=private.sample_rate,
        key=lambda: private.key,  # read per batch: a resumed run restores the key first
    )


def step_loader(
    rows: Dataset[Any], sampler: StepBatches, collate: Callable[[list[Any]], Any], *, seed: int
) -> DataLoader[Any]:
    return DataLoader(
        rows,
        batch_sampler=sampler,
        collate_fn=collate,
        # Its own generator: creating the iterator must not draw from torch's global RNG,
        # or a resumed run's dropout would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
        num_workers=0,  # workers would need shared memory the container does not give
    )


@dataclass
class PrivateTraining:
    """Opacus pieces for one run: per-sample gradients on ``net``, the DP optimizer made in
    :meth:`wrap`, the RDP accountant, and the job's secret key."""

    settings: DPSettings
    sample_rate: float
    noise_multiplier: float
    expected_batch_size: int
    key: bytes
    grad_module: Any
    accountant: Any
    optimizer: Any = None

    @classmethod
    def attach(
        cls,
        net: torch.nn.Module,
        settings: DPSettings,
        *,
        rows: int,
        batch_size: int,
        steps: int,
        site: DPParameters | None = None,
    ) -> PrivateTraining:
        """DP-SGD on ``net`` with the ``site``'s parameters, used as given; without them (a
        run outside a site) calibrated here for ``batch_size`` of ``rows`` samples. Raises
        :class:`ConfigError` when the site's parameters are not the ones the hyperparameters
        ask for (steps, clipping, δ), or the target cannot be reached."""
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant

        if site is None:
            site = privacy.calibrate(settings, sample_rate=min(1.0, batch_size / rows), steps=steps)
        elif (site.steps, site.max_grad_norm, site.delta) != (
            steps,
            settings.max_grad_norm,
            settings.delta,
        ):
            raise ConfigError(
                f"{PREFIX}.dp_epsilon",
                "the site's DP-SGD parameters do not match the hyperparameters",
            )
        return cls(
            settings=settings,
            sample_rate=site.sample_rate,
            noise_multiplier=site.noise_multiplier,
            expected_batch_size=max(1, round(site.sample_rate * rows)),
            key=os.urandom(KEY_BYTES),
            # Hooks on net's layers record per-sample gradients; net itself is unchanged.
            grad_module=GradSampleModule(net, loss_reduction="mean"),
            accountant=RDPAccountant(),
        )

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=torch.Generator(),
        )
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        return self.optimizer  # type: ignore[no-any-return]

    def seed_noise(self, step: int) -> None:
        if self.optimizer is not None:
            self.optimizer.generator.manual_seed(_derive(self.key, b"noise", step))

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOOSE_ORDER)
            return float(self.accountant.get_epsilon(delta=self.settings.delta, alphas=RDP_ORDERS))

    def state(self) -> dict[str, Any]:
        return {"key": self.key, "history": [list(h) for h in self.accountant.history]}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.key = bytes(state["key"])
        self.accountant.history = [tuple(h) for h in state["history"]]


class FineTuneModule(pl.LightningModule):
    """Trains ``net`` (handed in; see lightning-hydra-template) with AdamW, linear warm-up then
    linear decay, and keeps the figures the metrics need. Subclasses say how a batch becomes a
    loss (:meth:`batch_loss`) and how it is evaluated."""

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        learning_rate: float,
        weight_decay: float,
        warmup_steps: int,
        max_steps: int,
    ) -> None:
        super().__init__()
        self.net = net
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.train_losses: list[float] = []
        self.tokens_seen = 0
        self.private: PrivateTraining | None = None
        self.resume_key: Mapping[str, Any] | None = None
        self.resumed_from: int | None = None
        self._restored_rng: torch.Tensor | None = None
        self._empty_batch = False
        # Checkpoints hold only what trains (a LoRA run's frozen base is the base model).
        self.strict_loading = False

    @classmethod
    def for_run(cls, net: torch.nn.Module, hp: TrainingHyperparameters) -> Self:
        """The module a built-in trainer's run trains, with the optimizer settings of ``hp``."""
        return cls(
            net,
            learning_rate=hp.learning_rate,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
            max_steps=hp.max_steps,
        )

    # -- what subclasses provide ---------------------------------------------------------------

    def batch_loss(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The mean loss over the batch's samples, and the tokens it covered."""
        raise NotImplementedError

    @staticmethod
    def batch_rows(batch: Sequence[torch.Tensor]) -> int:
        return int(batch[0].shape[0])

    # -- training ------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.private is not None:
            self.private.seed_noise(self.global_step)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self._empty_batch = self.batch_rows(batch) == 0
        if self._empty_batch:
            # Only Poisson sampling gives empty batches: the step still adds its noise (and is
            # accounted for) in on_before_optimizer_step below.
            return None
        loss, tokens = self.batch_loss(batch)
        self.tokens_seen += tokens
        value = float(loss.detach())
        if not math.isfinite(value):
            # Stop at once: more steps would only spend the site's compute on a dead run.
            raise TrainingFailed(f"loss is not finite at step {self.global_step + 1}")
        self.train_losses.append(value)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.private is not None and self._empty_batch:
            for p in self.net.parameters():
                if p.requires_grad:
                    # What Opacus' hooks would have recorded for a batch of no samples.
                    p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                        (0, *p.shape), dtype=p.dtype, device=p.device
                    )

    def configure_optimizers(self) -> Any:
        # No decay on norms and biases (1-D tensors), as is usual for transformers.
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.learning_rate
        )
        if self.private is not None:
            optimizer = self.private.wrap(optimizer)
        warmup, total = self.warmup_steps, self.max_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = {
            f"net.{n}"
            for n, p in self.net.named_parameters(remove_duplicate=False)
            if not p.requires_grad
        }
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k not in frozen
        }
        checkpoint["sealroom"] = {
            "resume_key": json.dumps(self.resume_key, sort_keys=True),
            "rng": torch.get_rng_state(),
            "dp": None if self.private is None else self.private.state(),
            "train_losses": self.train_losses[-TRAIN_LOSS_WINDOW:],
            "tokens_seen": self.tokens_seen,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        mine = checkpoint.get("sealroom")
        if not isinstance(mine, dict):
            raise ConfigError("checkpoint", f"{CHECKPOINT_FILE} was not written by this trainer")
        if mine.get("resume_key") != json.dumps(self.resume_key, sort_keys=True):
            raise ConfigError(
                "checkpoint",
                f"{CHECKPOINT_FILE} was written under another trainer or other hyperparameters",
            )
        step = int(checkpoint.get("global_step", 0))
        if step >= self.max_steps:
            raise ConfigError(
                f"{PREFIX}.max_steps",
                f"must exceed the {step} steps the checkpoint has done, got {self.max_steps}",
            )
        if (mine["dp"] is None) != (self.private is None):
            raise ConfigError("checkpoint", "the checkpoint and the job disagree on DP-SGD")
        if self.private is not None:
            self.private.restore(mine["dp"])
        self._restored_rng = mine["rng"]
        self.train_losses = [float(x) for x in mine["train_losses"]]
        self.tokens_seen = int(mine["tokens_seen"])
        self.resumed_from = step

    def on_train_start(self) -> None:
        if self._restored_rng is not None:
            torch.set_rng_state(self._restored_rng)


class ResumeCheckpoints(pl.Callback):
    """Writes the training state to ``directory/last.ckpt`` every ``every`` steps, atomically
    (a hidden file, then a rename), so a job killed at any moment leaves a usable one."""

    def __init__(self, directory: Path, *, every: int) -> None:
        self.directory = directory
        self.every = every

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.every:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{CHECKPOINT_FILE}.partial"
        trainer.save_checkpoint(partial)
        os.replace(partial, self.directory / CHECKPOINT_FILE)


class JsonlProgress(pl.Callback):
    """Appends ``{"step", "total", "loss", "lr", "time_s"}`` (and ``tokens_seen`` for the
    built-ins) to ``path`` every ``every`` steps and at the last step; each line goes to disk
    as it is written, for the agent to stream. ``time_s`` counts from the first step's start,
    so rates can be read off the file without model loading or evaluation."""

    def __init__(self, path: Path, *, every: int) -> None:
        self.path = path
        self.every = every
        self._t0: float | None = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The stopped run may have got further than its checkpoint: drop its later lines.
        _trim_progress(self.path, int(checkpoint.get("global_step", 0)))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every and step != total:
            return
        tokens: int | None = None
        if isinstance(pl_module, FineTuneModule):
            if not pl_module.train_losses:
                return  # only empty (DP) batches so far: no loss to report
            loss, tokens = pl_module.train_losses[-1], pl_module.tokens_seen
        else:  # a custom module: what it logged as train_loss
            logged = trainer.callback_metrics.get("train_loss")
            loss = float(logged) if logged is not None else float("nan")
        if not math.isfinite(loss):
            return
        line: dict[str, Any] = {
            "step": step,
            "total": total,
            "loss": loss,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "time_s": round(time.perf_counter() - (self._t0 or time.perf_counter()), 4),
        }
        if tokens is not None:
            line["tokens_seen"] = tokens
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
            f.flush()


def precision(requested: str) -> str:
    """The Lightning precision a run uses: ``auto`` is bf16-mixed on a GPU with bf16."""
    gpu = torch.cuda.is_available()
    if requested == "auto":
        return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    if requested == "bf16-mixed" and gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{PREFIX}.precision", "bf16-mixed asked for on a GPU without bf16")
    return requested


def _trim_progress(path: Path, step: int) -> None:
    """Drop progress lines past ``step``: the stopped run got further than its checkpoint."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")
    os.replace(partial, path)


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


def train_loss(module: FineTuneModule) -> float:
    window = module.train_losses[-TRAIN_LOSS_WINDOW:]
    return sum(window) / len(window)


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
