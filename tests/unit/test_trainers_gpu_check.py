"""``trainers.gpu_check`` on the CPU: each built-in trainer runs and its rate is read off the
run's own progress lines (the steps after the first, over their ``time_s`` span)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from trainers import gpu_check
from trainers.runtime import ROOT_ENV


@pytest.fixture(autouse=True)
def environment() -> Iterator[None]:
    saved = dict(os.environ)  # gpu_check sets SEALROOM_ROOT; Lightning writes PL_* variables
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("trainer", gpu_check.TRAINERS)
def test_measure_times_the_steps_from_the_progress_lines(trainer: str) -> None:
    run = gpu_check.measure("tiny", steps=4, batch_size=2, block_size=32, trainer=trainer)
    assert run["trainer"] == trainer and run["steps"] == 4
    assert run["steps_per_s"] is not None and run["steps_per_s"] > 0
    # The timed span leaves out loading and evaluation, so it is faster than the wall rate.
    assert run["steps_per_s"] > run["steps_per_s_wall"]
    assert ROOT_ENV in os.environ  # measure points the harness at its temporary root
