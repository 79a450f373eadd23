"""Lightning callbacks of a built-in run: resume checkpoints and the progress file.

:class:`ResumeCheckpoints` writes the whole training state to ``last.ckpt`` every so many
steps, atomically, so a job killed at any moment leaves a usable one. :class:`JsonlProgress`
appends one line per reporting step to the progress file the agent streams, and on resume drops
the lines the stopped run wrote past its checkpoint. See :mod:`trainers.training`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from trainers._module import CHECKPOINT_FILE, FineTuneModule


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
