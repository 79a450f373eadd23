"""An example custom trainer: next-token training of the base model with a plain loop.

Bundle this directory (``sealroom job submit spec.yaml --bundle trainers/examples/custom_lm``)
with ``trainer: custom`` and ``entrypoint: "lm:TinyLM"`` in the spec. The harness builds
``TinyLM(ctx, **hyperparameters)``, trains it for ``max_steps`` and releases
``self.model``'s weights in the base model's layout, through the same release gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:
    from trainers.runtime import RunContext


class TinyLM(pl.LightningModule):
    def __init__(
        self,
        ctx: RunContext,
        learning_rate: float = 1e-3,
        block_size: int = 32,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.learning_rate = learning_rate
        self.block_size = block_size
        self.batch_size = batch_size
        self.model = AutoModelForCausalLM.from_pretrained(
            ctx.model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir, local_files_only=True)

    def train_dataloader(self) -> DataLoader[Any]:
        ids: list[int] = []
        for d in self.ctx.dataset_dirs:
            for f in sorted(Path(d).rglob("*.txt")):
                ids += self.tokenizer(f.read_text(), add_special_tokens=False, verbose=False)[
                    "input_ids"
                ]
        n = len(ids) // self.block_size
        blocks = torch.tensor(ids[: n * self.block_size]).view(n, self.block_size)
        return DataLoader(TensorDataset(blocks), batch_size=self.batch_size, shuffle=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss: torch.Tensor = self.model(input_ids=x, labels=x).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate)
