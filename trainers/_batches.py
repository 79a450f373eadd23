"""Training batches that are a function of the step, so a resumed run sees the same batches.

:class:`StepBatches` yields endless batches of row indices, each computed from its absolute
step alone: seeded epoch permutations, or under DP-SGD a Poisson sample drawn from the job's
secret key. Iteration starts at the trainer's current step, so a run resumed from a checkpoint
at step k goes on with batch k. :func:`step_loader` wraps it in a ``DataLoader`` that draws
nothing from torch's global RNG. See :mod:`trainers.training`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers._dp_sgd import PrivateTraining, derive_seed


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
            g = torch.Generator().manual_seed(derive_seed(self.key(), b"sample", step))
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
