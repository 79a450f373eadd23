"""The built-in ``causal-lm`` trainer: a full fine-tune of a causal language model.

Three parts, as in lightning-hydra-template: :class:`CausalLMModule` trains whatever network it
is given, :class:`TextBlockDataModule` turns text files into packed token blocks, and :func:`run`
wires them to the job (base model from the model dir, text from the dataset dirs, outputs to the
output dir). Runs are reproducible: the same seed on CPU gives bit-identical weights. Lightning's
loggers, checkpoints, progress bar and model summary are off; it writes only to the scratch dir.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainers.errors import ConfigError, DataError, TrainingFailed
from trainers.hparams import PREFIX, CausalLMHyperparameters
from trainers.runtime import RunContext, find_text_files
from trainers.weights import export_like

TRAIN_LOSS_WINDOW = 10
"""``train_loss`` in metrics.json is the mean of the last this many steps' losses."""


class CausalLMModule(pl.LightningModule):
    """Next-token training of ``net``, any module called as ``net(input_ids=, labels=)`` that
    returns an object with ``.loss`` (every Hugging Face ``*ForCausalLM`` does)."""

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
        self._eval_sum = 0.0
        self._eval_blocks = 0
        self.eval_loss: float | None = None

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss: torch.Tensor = self.net(input_ids=ids, labels=ids).loss
        self.tokens_seen += ids.numel()
        value = float(loss.detach())
        if not math.isfinite(value):
            # Stop at once: more steps would only spend the site's compute on a dead run.
            raise TrainingFailed(f"loss is not finite at step {self.global_step + 1}")
        self.train_losses.append(value)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._eval_sum, self._eval_blocks = 0.0, 0

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        loss = self.net(input_ids=ids, labels=ids).loss
        # Blocks all have the same length, so a block-weighted mean is the token-weighted mean.
        self._eval_sum += float(loss.detach()) * ids.shape[0]
        self._eval_blocks += ids.shape[0]

    def on_validation_epoch_end(self) -> None:
        if self._eval_blocks:
            self.eval_loss = self._eval_sum / self._eval_blocks

    def configure_optimizers(self) -> Any:
        # No decay on norms and biases (1-D tensors), as is usual for transformers.
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate)
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


class TextBlockDataModule(pl.LightningDataModule):
    """Text files -> token ids -> fixed-length blocks, split into train and eval blocks.

    Each file is one document; documents are encoded, joined with ``separator_id`` (the
    tokenizer's end-of-text) and cut into ``block_size`` blocks, the tail that fills no block
    dropped. A seeded permutation holds out ``eval_fraction`` of the blocks (at least one) for
    evaluation. Raises :class:`DataError` when the text yields fewer than two blocks or a file
    is not UTF-8.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        encode: Callable[[str], list[int]],
        separator_id: int | None,
        block_size: int,
        batch_size: int,
        eval_fraction: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.files = tuple(files)
        self.encode = encode
        self.separator_id = separator_id
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_fraction = eval_fraction
        self.seed = seed
        self.train_blocks: torch.Tensor | None = None
        self.eval_blocks: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        ids: list[int] = []
        for path in self.files:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path.name}: not UTF-8 text (byte {e.start})") from e
            ids.extend(self.encode(text))
            if self.separator_id is not None:
                ids.append(self.separator_id)
        n_blocks = len(ids) // self.block_size
        if n_blocks < 2:
            raise DataError(
                f"the datasets yield {len(ids)} tokens, fewer than the {2 * self.block_size} "
                f"needed for one training and one evaluation block of block_size "
                f"{self.block_size}"
            )
        blocks = torch.tensor(ids[: n_blocks * self.block_size], dtype=torch.long).view(
            n_blocks, self.block_size
        )
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(self.seed))
        n_eval = min(n_blocks - 1, max(1, round(n_blocks * self.eval_fraction)))
        self.eval_blocks = blocks[order[:n_eval]]
        self.train_blocks = blocks[order[n_eval:]]

    def _loader(self, blocks: torch.Tensor | None, *, shuffle: bool) -> DataLoader[Any]:
        if blocks is None:
            raise RuntimeError("setup() has not run")
        return DataLoader(
            TensorDataset(blocks),
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A generator of its own keeps the shuffle order a function of the seed alone.
            generator=torch.Generator().manual_seed(self.seed + 1) if shuffle else None,
            num_workers=0,  # workers would need shared memory the container does not give
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_blocks, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.eval_blocks, shuffle=False)


class JsonlProgress(pl.Callback):
    """Appends ``{"step", "total", "loss", "lr", "tokens_seen"}`` to ``path`` every ``every``
    steps and at the last step; each line goes to disk as it is written, for the agent to stream.
    """

    def __init__(self, path: Path, *, every: int) -> None:
        self.path = path
        self.every = every

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
        if isinstance(pl_module, CausalLMModule):
            loss, tokens = pl_module.train_losses[-1], pl_module.tokens_seen
        else:  # a custom module: what it logged as train_loss
            logged = trainer.callback_metrics.get("train_loss")
            loss, tokens = (float(logged) if logged is not None else float("nan")), None
        if not math.isfinite(loss):
            return
        line = {
            "step": step,
            "total": total,
            "loss": loss,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        if tokens is not None:
            line["tokens_seen"] = tokens
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
            f.flush()


def _precision(requested: str) -> str:
    gpu = torch.cuda.is_available()
    if requested == "auto":
        return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    if requested == "bf16-mixed" and gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{PREFIX}.precision", "bf16-mixed asked for on a GPU without bf16")
    return requested


def run(hp: CausalLMHyperparameters, ctx: RunContext) -> dict[str, float]:
    """Fine-tune the base model in ``ctx.model_dir`` on the text under ``ctx.dataset_dirs``.

    Writes ``ctx.weights_file`` (the base model's exact tensor layout) and appends progress to
    ``ctx.progress_file``; returns the flat metrics for ``metrics.json``. Raises
    :class:`ConfigError` for a block size beyond the model's context, :class:`DataError` for
    unusable data and :class:`TrainingFailed` for a non-finite loss.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = find_text_files(ctx.dataset_dirs)
    pl.seed_everything(hp.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(
        ctx.model_dir, local_files_only=True, trust_remote_code=False
    )
    net = AutoModelForCausalLM.from_pretrained(
        ctx.model_dir,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,  # never unpickle a .bin
        dtype=torch.float32,  # fp32 master weights; bf16 only inside autocast
    )
    context = getattr(net.config, "max_position_embeddings", None)
    if isinstance(context, int) and hp.block_size > context:
        raise ConfigError(
            f"{PREFIX}.block_size",
            f"must not exceed the base model's context of {context}, got {hp.block_size}",
        )

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    data = TextBlockDataModule(
        files,
        encode=encode,
        separator_id=tokenizer.eos_token_id,
        block_size=hp.block_size,
        batch_size=hp.batch_size,
        eval_fraction=hp.eval_fraction,
        seed=hp.seed,
    )
    module = CausalLMModule(
        net,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        warmup_steps=hp.warmup_steps,
        max_steps=hp.max_steps,
    )
    gpu = torch.cuda.is_available()
    common: dict[str, Any] = {
        "accelerator": "gpu" if gpu else "cpu",
        "devices": 1,
        "precision": _precision(hp.precision),
        "deterministic": not gpu,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": ctx.scratch_dir,
    }
    trainer = pl.Trainer(
        max_steps=hp.max_steps,
        max_epochs=-1,
        gradient_clip_val=hp.gradient_clip or None,
        # Evaluation runs once, after training, with a trainer of its own below.
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[JsonlProgress(ctx.progress_file, every=hp.log_every)],
        **common,
    )
    net.train()  # from_pretrained hands the model back in eval mode
    # Lightning turns deterministic algorithms on process-wide; restore the caller's setting.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        trainer.fit(module, datamodule=data)
        pl.Trainer(**common).validate(module, datamodule=data, verbose=False)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)

    if module.eval_loss is None or not module.train_losses:
        raise TrainingFailed("training finished without a training or evaluation loss")
    window = module.train_losses[-TRAIN_LOSS_WINDOW:]
    train_loss = sum(window) / len(window)
    if not (math.isfinite(train_loss) and math.isfinite(module.eval_loss)):
        raise TrainingFailed(f"loss is not finite (train {train_loss}, eval {module.eval_loss})")

    export_like(net.state_dict(), base_dir=ctx.model_dir, dest=ctx.weights_file)
    return {
        "train_loss": train_loss,
        "eval_loss": module.eval_loss,
        # exp() of a large loss overflows; cap it so that metrics stay finite numbers.
        "perplexity": math.exp(min(module.eval_loss, 50.0)),
        "steps": float(trainer.global_step),
        "tokens_seen": float(module.tokens_seen),
    }
