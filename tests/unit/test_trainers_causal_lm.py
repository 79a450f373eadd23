"""The causal-LM trainer's parts on their own: the data module's packing and split, and the
Lightning module with a network it is handed (a ``fast_dev_run`` on CPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from trainers import causal_lm
from trainers.causal_lm import CausalLMModule, TextBlockDataModule
from trainers.errors import DataError, TrainingFailed


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def _module(files: list[Path], **overrides: Any) -> TextBlockDataModule:
    args: dict[str, Any] = {
        "encode": _bytes,
        "separator_id": 0,
        "block_size": 8,
        "batch_size": 4,
        "eval_fraction": 0.25,
        "seed": 1,
        **overrides,
    }
    return TextBlockDataModule(files, **args)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, text in enumerate(["abcdefghij" * 5, "KLMNOPQRST" * 4, "uvw"]):
        path = tmp_path / f"{i}.txt"
        path.write_text(text)
        paths.append(path)
    return paths


def test_blocks_pack_every_document_with_separators(files: list[Path]) -> None:
    data = _module(files)
    data.setup("fit")
    assert data.train_blocks is not None and data.eval_blocks is not None
    stream = [t for p in files for t in [*_bytes(p.read_text()), 0]]
    n = len(stream) // 8
    blocks = torch.cat([data.train_blocks, data.eval_blocks])
    assert blocks.shape == (n, 8)
    expected = {tuple(stream[i * 8 : (i + 1) * 8]) for i in range(n)}
    assert {tuple(b.tolist()) for b in blocks} == expected
    assert len(data.eval_blocks) == round(n * 0.25)


def test_split_is_a_function_of_the_seed(files: list[Path]) -> None:
    def split(seed: int) -> list[list[int]]:
        data = _module(files, seed=seed)
        data.setup("fit")
        assert data.eval_blocks is not None
        return data.eval_blocks.tolist()

    assert split(1) == split(1)
    assert split(1) != split(2)


def test_at_least_one_block_each_side(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x" * 17)  # 18 tokens with the separator: two blocks of 8
    data = _module([path], eval_fraction=0.01)
    data.setup("fit")
    assert data.train_blocks is not None and data.eval_blocks is not None
    assert (len(data.train_blocks), len(data.eval_blocks)) == (1, 1)


def test_too_little_text_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x" * 10)
    with pytest.raises(DataError, match="yield 11 tokens, fewer than the 16"):
        _module([path]).setup("fit")


class _BagOfBytes(torch.nn.Module):
    """Not a transformer: the module must train whatever network it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.head = torch.nn.Linear(16, 256)

    def forward(self, *, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.head(self.embed(input_ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss)


# Lightning 2.6 uses a torch 2.13 API that torch deprecates; the harness filters this too.
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning")
def test_fast_dev_run_trains_a_network_it_is_given(files: list[Path]) -> None:
    pl.seed_everything(0, verbose=False)
    net = _BagOfBytes()
    before = net.head.weight.detach().clone()
    module = CausalLMModule(net, learning_rate=0.01, weight_decay=0.1, warmup_steps=0, max_steps=1)
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=_module(files))
    assert len(module.train_losses) == 1
    assert module.eval_loss is not None
    assert module.tokens_seen == 4 * 8
    assert not torch.equal(before, net.head.weight)


class _Diverged(_BagOfBytes):
    def forward(self, *, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        loss = super().forward(input_ids=input_ids, labels=labels).loss
        return SimpleNamespace(loss=loss * float("nan"))


@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning")
def test_a_non_finite_loss_stops_training(files: list[Path]) -> None:
    module = CausalLMModule(
        _Diverged(), learning_rate=0.01, weight_decay=0.0, warmup_steps=0, max_steps=5
    )
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(TrainingFailed, match="loss is not finite at step 1"):
        trainer.fit(module, datamodule=_module(files))
    assert module.train_losses == []


def test_schedule_warms_up_then_decays_to_zero() -> None:
    module = CausalLMModule(
        torch.nn.Linear(2, 2), learning_rate=1.0, weight_decay=0.0, warmup_steps=2, max_steps=6
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    # Norms and biases are not decayed.
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_precision_is_fp32_on_cpu() -> None:
    assert causal_lm._precision("auto") == "32-true"
