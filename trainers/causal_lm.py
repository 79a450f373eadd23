"""The built-in causal-LM trainers: ``causal-lm`` (a full fine-tune) and ``causal-lm-lora``
(a PEFT LoRA adapter on the frozen base; only the adapter is written).

Three parts, as in lightning-hydra-template: :class:`CausalLMModule` trains whatever network it
is given, :class:`TextBlockDataModule` turns text files into packed token blocks, and :func:`run`
/ :func:`run_lora` wire them to the job (base model from the model dir, text from the dataset
dirs, outputs to the output dir). Runs are reproducible: the same seed on CPU gives
bit-identical weights (except under DP-SGD, whose noise is secret; see
:mod:`trainers.training`, which also resumes a stopped run from its checkpoint). Lightning's
loggers, progress bar and model summary are off; it writes only to the scratch dir and the
output dir.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainers import lora, rounds, training
from trainers.errors import ConfigError, DataError, TrainingFailed
from trainers.hparams import PREFIX, CausalLMHyperparameters, LoRAHyperparameters
from trainers.runtime import RunContext, find_text_files
from trainers.training import FineTuneModule, step_batches, step_loader
from trainers.weights import export_layout, export_like, tensor_layout

TRAIN_LOSS_WINDOW = training.TRAIN_LOSS_WINDOW


class CausalLMModule(FineTuneModule):
    """Next-token training of ``net``, any module called as ``net(input_ids=, labels=)`` that
    returns an object with ``.loss`` (every Hugging Face ``*ForCausalLM`` does)."""

    # Evaluation figures (reset as each evaluation starts); the constructor is the base's.
    _eval_sum: float = 0.0
    _eval_blocks: int = 0
    eval_loss: float | None = None

    def batch_loss(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        (ids,) = batch
        loss: torch.Tensor = self.net(input_ids=ids, labels=ids).loss
        return loss, ids.numel()

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
        self.private: training.PrivateTraining | None = None

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

    def train_dataloader(self) -> DataLoader[Any]:
        if self.train_blocks is None:
            raise RuntimeError("setup() has not run")
        blocks = self.train_blocks
        sampler = step_batches(
            self,
            len(blocks),
            batch_size=self.batch_size,
            seed=self.seed + 1,
            private=self.private,
        )

        def collate(rows: list[tuple[torch.Tensor]]) -> tuple[torch.Tensor]:
            if not rows:  # an empty Poisson batch under DP
                return (blocks.new_empty((0, self.block_size)),)
            return (torch.stack([r[0] for r in rows]),)

        return step_loader(TensorDataset(blocks), sampler, collate, seed=self.seed + 2)

    def val_dataloader(self) -> DataLoader[Any]:
        if self.eval_blocks is None:
            raise RuntimeError("setup() has not run")
        return DataLoader(
            TensorDataset(self.eval_blocks),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
        )


JsonlProgress = training.JsonlProgress
_precision = training.precision


def _load(ctx: RunContext, hp: CausalLMHyperparameters) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return tokenizer, net


def _train(
    hp: CausalLMHyperparameters,
    ctx: RunContext,
    *,
    trainer_name: str,
    prepare: Callable[[Any], torch.nn.Module],
    export: Callable[[torch.nn.Module], None],
) -> dict[str, float]:
    files = find_text_files(ctx.dataset_dirs)
    pl.seed_everything(hp.seed, workers=True, verbose=False)
    tokenizer, net = _load(ctx, hp)
    net = prepare(net)

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
    module = CausalLMModule.for_run(net, hp)
    if ctx.proximal_mu is not None:
        module.pull_towards_start(ctx.proximal_mu)
    if hp.dp is not None:
        data.setup("fit")
        assert data.train_blocks is not None
        module.private = data.private = training.PrivateTraining.attach(
            net,
            hp.dp,
            rows=len(data.train_blocks),
            batch_size=hp.batch_size,
            steps=hp.max_steps,
            site=ctx.dp,
        )
    trainer = training.fit(module, data, hp, ctx, trainer_name=trainer_name)
    if module.eval_loss is None or not math.isfinite(module.eval_loss):
        raise TrainingFailed(f"evaluation loss is missing or not finite ({module.eval_loss})")
    metrics = training.common_metrics(module, trainer)
    export(net)
    return {
        **metrics,
        "eval_loss": module.eval_loss,
        # exp() of a large loss overflows; cap it so that metrics stay finite numbers.
        "perplexity": math.exp(min(module.eval_loss, 50.0)),
        "tokens_seen": float(module.tokens_seen),
    }


def run(hp: CausalLMHyperparameters, ctx: RunContext) -> dict[str, float]:
    """Fine-tune the base model in ``ctx.model_dir`` on the text under ``ctx.dataset_dirs``.

    Writes ``ctx.weights_file`` (the base model's exact tensor layout; in a federated round,
    from and to the global difference: :mod:`trainers.rounds`) and appends progress to
    ``ctx.progress_file``; returns the flat metrics for ``metrics.json``. Raises
    :class:`ConfigError` for a block size beyond the model's context, :class:`DataError` for
    unusable data and :class:`TrainingFailed` for a non-finite loss.
    """

    release = tensor_layout(ctx.model_dir)
    start = ctx.start_weights  # a federated round: base plus the global difference

    def prepare(net: torch.nn.Module) -> torch.nn.Module:
        if start is not None:
            rounds.apply_start(net, start, release=release, model_dir=ctx.model_dir)
        return net

    def export(net: torch.nn.Module) -> None:
        if start is None:
            export_like(net.state_dict(), base_dir=ctx.model_dir, dest=ctx.weights_file)
        else:
            rounds.export_difference(
                net.state_dict(), release=release, model_dir=ctx.model_dir, dest=ctx.weights_file
            )

    return _train(hp, ctx, trainer_name="causal-lm", prepare=prepare, export=export)


def run_lora(hp: LoRAHyperparameters, ctx: RunContext) -> dict[str, float]:
    """LoRA on the base model: the base frozen, a PEFT adapter on ``hp.targets`` trained.

    Writes only the adapter's tensors to ``ctx.weights_file``, in exactly the layout
    :func:`trainers.lora.adapter_layout` gives the site; the adapter is built from
    :func:`trainers.lora.adapter_config`, the config the site releases with it. Raises as
    :func:`run` does, and :class:`ConfigError` for a base model LoRA cannot target.
    """
    expected = lora.adapter_layout(ctx.model_dir, hp)  # refuses a bad base before loading it

    def prepare(net: Any) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(**{**lora.adapter_config(hp), "inference_mode": False})
        with warnings.catch_warnings():
            # peft asking transformers for a name transformers deprecates: not ours.
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            peft_net: torch.nn.Module = get_peft_model(net, config)
        if ctx.start_weights is not None:
            lora.load_adapter(peft_net, ctx.start_weights, expected=expected)
        return peft_net

    def export(net: torch.nn.Module) -> None:
        from peft import get_peft_model_state_dict

        export_layout(get_peft_model_state_dict(net), expected=expected, dest=ctx.weights_file)

    return _train(hp, ctx, trainer_name="causal-lm-lora", prepare=prepare, export=export)
