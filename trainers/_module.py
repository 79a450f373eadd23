"""The Lightning module the built-in trainers share: optimizer, schedule, losses, checkpoint state.

:class:`FineTuneModule` trains a network handed in (AdamW, linear warm-up then decay, no decay
on norms and biases), stops at a non-finite loss, feeds Opacus an empty per-sample gradient for
an empty Poisson batch, and keeps the figures the metrics need. Its checkpoint hooks save and
check what a resume needs beyond Lightning's own state: the resume key (trainer and
hyperparameters), torch's RNG, the DP key and accountant, the recent losses. Subclasses say how
a batch becomes a loss. See :mod:`trainers.training`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import pytorch_lightning as pl
import torch

from trainers._dp_sgd import PrivateTraining
from trainers.errors import ConfigError, TrainingFailed
from trainers.hparams import PREFIX, TrainingHyperparameters

CHECKPOINT_FILE = "last.ckpt"
TRAIN_LOSS_WINDOW = 10
"""``train_loss`` in metrics.json is the mean of the last this many steps' losses."""


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
        self._proximal: tuple[float, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._step_lr = 0.0
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
        self._step_lr = float(optimizer.param_groups[0]["lr"])  # the rate of this very step
        if self.private is not None and self._empty_batch:
            for p in self.net.parameters():
                if p.requires_grad:
                    # What Opacus' hooks would have recorded for a batch of no samples.
                    p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                        (0, *p.shape), dtype=p.dtype, device=p.device
                    )

    def pull_towards_start(self, mu: float) -> None:
        """FedProx: after every optimizer step, move each trained tensor ``lr · mu`` of the way
        (at most all of it) back to its value now (the round's global model). Decoupled from
        the loss, as AdamW's weight decay is: the pull depends on no sample, so under DP-SGD it
        costs no privacy (Opacus' per-sample gradients never see it) and the accountant's
        figure stands."""
        anchors: list[tuple[torch.Tensor, torch.Tensor]] = [
            (p, p.detach().clone()) for p in self.net.parameters() if p.requires_grad
        ]
        self._proximal = (mu, anchors)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._proximal is None:
            return
        mu, anchors = self._proximal
        pull = min(1.0, self._step_lr * mu)  # never past the start
        with torch.no_grad():
            for p, start in anchors:
                p.sub_(pull * (p - start))

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


def train_loss(module: FineTuneModule) -> float:
    window = module.train_losses[-TRAIN_LOSS_WINDOW:]
    return sum(window) / len(window)
