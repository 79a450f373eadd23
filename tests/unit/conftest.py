"""Fixtures the unit tests share; each module asks for what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: on a shared 2-core machine two threads spin
    against each other, and one is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only trainer inputs for a module's runs: a text dataset and a tiny base model
    (:func:`tests.unit._trainer_support.make_inputs`); a module that needs others overrides it."""
    from tests.unit._trainer_support import make_inputs

    return make_inputs(tmp_path_factory.mktemp("inputs"))
