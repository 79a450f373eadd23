"""The built-in ``classification`` trainer: sequence classification over labelled examples.

:class:`ClassifierModule` trains whatever ``*ForSequenceClassification`` network it is given,
:class:`LabelledDataModule` turns tokenised examples into padded batches, and :func:`run` wires
them to the job: the examples of the datasets' JSONL/CSV files (:mod:`trainers.labelled`), a
classifier built on the base model under the config the site will release
(:func:`trainers.labelled.release_config`), the weights written in exactly the layout the site
expects (:func:`trainers.labelled.released_layout`). Reports ``accuracy`` and ``eval_loss`` on
a seeded held-out split, ``train_loss``, ``steps`` (and ``epsilon`` under DP-SGD). Seeding,
checkpoints and DP are :mod:`trainers.training`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from trainers import labelled, rounds, training
from trainers.errors import ConfigError, DataError, TrainingFailed
from trainers.hparams import PREFIX, ClassificationHyperparameters
from trainers.runtime import RunContext
from trainers.training import FineTuneModule, step_batches, step_loader
from trainers.weights import export_layout

Row = tuple[list[int], int]
"""(token ids, class index)."""


class ClassifierModule(FineTuneModule):
    """Cross-entropy training of ``net``, called as ``net(input_ids=, attention_mask=,
    labels=)`` and returning ``.loss`` and ``.logits`` (every HF sequence classifier does)."""

    # Evaluation figures (reset as each evaluation starts); the constructor is the base's.
    _eval_sum: float = 0.0
    _eval_correct: int = 0
    _eval_count: int = 0
    eval_loss: float | None = None
    accuracy: float | None = None

    def batch_loss(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        ids, mask, labels = batch
        loss: torch.Tensor = self.net(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss, int(mask.sum())

    def on_validation_epoch_start(self) -> None:
        self._eval_sum, self._eval_correct, self._eval_count = 0.0, 0, 0

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        ids, mask, labels = batch
        out = self.net(input_ids=ids, attention_mask=mask, labels=labels)
        n = int(labels.shape[0])
        self._eval_sum += float(out.loss.detach()) * n
        self._eval_correct += int((out.logits.argmax(dim=-1) == labels).sum())
        self._eval_count += n

    def on_validation_epoch_end(self) -> None:
        if self._eval_count:
            self.eval_loss = self._eval_sum / self._eval_count
            self.accuracy = self._eval_correct / self._eval_count


class _Rows(torch.utils.data.Dataset[Row]):
    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class LabelledDataModule(pl.LightningDataModule):
    """Tokenised examples, split by a seeded permutation into training and held-out rows
    (``eval_fraction`` of them, at least one each side), batched with right padding to the
    longest row of the batch. Raises :class:`DataError` for fewer than two examples."""

    def __init__(
        self,
        rows: Sequence[Row],
        *,
        pad_id: int,
        batch_size: int,
        eval_fraction: float,
        seed: int,
    ) -> None:
        super().__init__()
        if len(rows) < 2:
            raise DataError(
                f"the datasets hold {len(rows)} example(s); at least two are needed, one "
                "to train on and one to evaluate"
            )
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.seed = seed
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
        self.eval_rows = [rows[int(i)] for i in order[:n_eval]]
        self.train_rows = [rows[int(i)] for i in order[n_eval:]]
        self.private: training.PrivateTraining | None = None

    def collate(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max((len(ids) for ids, _ in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        labels = torch.tensor([label for _, label in rows], dtype=torch.long)
        return ids, mask, labels

    def train_dataloader(self) -> DataLoader[Any]:
        sampler = step_batches(
            self,
            len(self.train_rows),
            batch_size=self.batch_size,
            seed=self.seed + 1,
            private=self.private,
        )
        return step_loader(_Rows(self.train_rows), sampler, self.collate, seed=self.seed + 2)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(
            _Rows(self.eval_rows),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=0,
        )


def load_examples(ctx: RunContext) -> list[labelled.Example]:
    """The labelled examples of the job's datasets, files in their stable order."""
    found = labelled.find_labelled_files(ctx.dataset_dirs)
    return labelled.read_examples((name, path.read_bytes()) for name, path in found)


def run(hp: ClassificationHyperparameters, ctx: RunContext) -> dict[str, float]:
    """Train a sequence classifier on the base model in ``ctx.model_dir``.

    Writes ``ctx.weights_file`` in the layout :func:`trainers.labelled.released_layout` gives
    and appends progress to ``ctx.progress_file``; returns the metrics. Raises
    :class:`ConfigError` (an unsupported base model, ``max_length`` beyond its context),
    :class:`DataError` (no usable examples, labels outside ``labels``) and
    :class:`TrainingFailed`.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    examples = load_examples(ctx)
    classes = labelled.resolve_labels(hp, examples)
    names = labelled.release_label_names(hp, len(classes))
    expected = labelled.released_layout(ctx.model_dir, len(classes))
    raw_config = labelled.release_config(ctx.model_dir, names)
    pl.seed_everything(hp.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(
        ctx.model_dir, local_files_only=True, trust_remote_code=False
    )
    config = AutoConfig.for_model(**raw_config)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and hp.max_length > context:
        raise ConfigError(
            f"{PREFIX}.max_length",
            f"must not exceed the base model's context of {context}, got {hp.max_length}",
        )
    net = AutoModelForSequenceClassification.from_pretrained(
        ctx.model_dir,
        config=config,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=torch.float32,
    )
    if ctx.start_weights is not None:  # a federated round: base plus the global difference
        rounds.apply_start(net, ctx.start_weights, release=expected, model_dir=ctx.model_dir)
    index = {name: i for i, name in enumerate(classes)}
    rows: list[Row] = []
    for text, label in examples:
        ids = list(
            tokenizer(text, add_special_tokens=False, truncation=True, max_length=hp.max_length)[
                "input_ids"
            ]
        )
        if ids:
            rows.append((ids, index[label]))
    data = LabelledDataModule(
        rows,
        pad_id=int(raw_config["pad_token_id"]),
        batch_size=hp.batch_size,
        eval_fraction=hp.eval_fraction,
        seed=hp.seed,
    )
    module = ClassifierModule.for_run(net, hp)
    if ctx.proximal_mu is not None:
        module.pull_towards_start(ctx.proximal_mu)
    if hp.dp is not None:
        module.private = data.private = training.PrivateTraining.attach(
            net,
            hp.dp,
            rows=len(data.train_rows),
            batch_size=hp.batch_size,
            steps=hp.max_steps,
            site=ctx.dp,
        )
    trainer = training.fit(module, data, hp, ctx, trainer_name="classification")
    if module.eval_loss is None or module.accuracy is None or not math.isfinite(module.eval_loss):
        raise TrainingFailed(f"evaluation loss is missing or not finite ({module.eval_loss})")
    metrics = training.common_metrics(module, trainer)
    if ctx.start_weights is None:
        export_layout(net.state_dict(), expected=expected, dest=ctx.weights_file)
    else:
        rounds.export_difference(
            net.state_dict(), release=expected, model_dir=ctx.model_dir, dest=ctx.weights_file
        )
    return {**metrics, "eval_loss": module.eval_loss, "accuracy": module.accuracy}
