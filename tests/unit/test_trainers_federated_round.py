"""One round of a federated job in the trainer: it starts from the global adapter the site
mounts (not from a fresh one), FedProx pulls it back towards that start, and a start that does
not fit, a trainer that has no round form, or no start at all is a bad configuration (exit 2),
never a silent fresh start."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit._trainer_support import mount, run_harness
from trainers import contract
from trainers.contract import JobConfig, RoundTraining
from trainers.runtime import Paths

pytestmark = pytest.mark.usefixtures("one_thread")

FAST: dict[str, Any] = {
    "max_steps": 3,
    "batch_size": 4,
    "block_size": 32,
    "seed": 3,
    "lora_r": 4,
    "learning_rate": 0.01,
}


@pytest.fixture(scope="module")
def global_adapter(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained from scratch: a start whose B matrices are far from a fresh zero."""
    root = mount(tmp_path_factory.mktemp("first") / "root", template)
    rc, err = run_harness(
        root, {**FAST, "max_steps": 6, "learning_rate": 0.05}, trainer="causal-lm-lora"
    )
    assert rc == contract.EXIT_OK, err
    return Paths.under(root).weights_dir / "model.safetensors"


def _round(
    template: Path, tmp: Path, start: Path | None, hp: dict[str, Any], **round_kw: Any
) -> tuple[int, str, Path]:
    root = tmp / "root"
    (root / "model").mkdir(parents=True)
    (root / "data").symlink_to(template / "data")
    (root / "model" / "base").symlink_to(template / "model" / "base")
    paths = Paths.under(root)
    if start is not None:
        paths.start_weights.parent.mkdir()
        shutil.copy(start, paths.start_weights)
    rc, err = run_harness(
        root,
        hp,
        trainer=round_kw.pop("trainer", "causal-lm-lora"),
        federated_round=RoundTraining(round=2, **round_kw),
    )
    return rc, err, paths.weights_dir / "model.safetensors"


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_round_starts_from_the_global_adapter(
    template: Path, global_adapter: Path, tmp_path: Path
) -> None:
    start = load_file(str(global_adapter))
    assert max(float(t.abs().max()) for k, t in start.items() if "lora_B" in k) > 1e-3
    rc, err, out = _round(template, tmp_path, global_adapter, {**FAST, "learning_rate": 1e-7})
    assert rc == contract.EXIT_OK, err
    # A near-zero rate leaves the start as it was: the round began from it.
    assert _distance(load_file(str(out)), start) < 1e-4
    # And a real rate moves away from it.
    rc, err, out = _round(template, tmp_path / "moved", global_adapter, FAST)
    assert rc == contract.EXIT_OK, err
    assert _distance(load_file(str(out)), start) > 1e-3


def test_fedprox_pulls_each_step_back_to_the_start(
    template: Path, global_adapter: Path, tmp_path: Path
) -> None:
    start = load_file(str(global_adapter))
    # lr · mu = 1 at the first step: it lands back on the start exactly; later steps, at the
    # decayed rate, are pulled part of the way.
    rc, err, out = _round(
        template, tmp_path / "full", global_adapter, {**FAST, "warmup_steps": 0}, proximal_mu=100.0
    )
    assert rc == contract.EXIT_OK, err
    pulled = _distance(load_file(str(out)), start)
    rc, err, out = _round(template, tmp_path / "free", global_adapter, FAST)
    assert rc == contract.EXIT_OK, err
    free = _distance(load_file(str(out)), start)
    assert pulled < free / 5


@pytest.mark.parametrize("case", ["wrong rank", "no start", "full fine-tune"])
def test_a_round_that_cannot_start_as_asked_is_a_bad_config(
    template: Path, global_adapter: Path, tmp_path: Path, case: str
) -> None:
    start: Path | None = global_adapter
    hp, kw = dict(FAST), {}
    if case == "wrong rank":
        tensors = load_file(str(global_adapter))
        bad = tmp_path / "bad.safetensors"
        save_file(
            {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in tensors.items()},
            str(bad),
        )
        start = bad
    elif case == "no start":
        start = None
    else:
        kw["trainer"] = "causal-lm"
        hp.pop("lora_r")
    rc, err, out = _round(template, tmp_path, start, hp, **kw)
    assert rc == contract.EXIT_BAD_CONFIG, err
    assert "federated_round" in err and not out.exists()


def test_the_round_travels_in_the_job_config() -> None:
    job = JobConfig("j", "causal-lm-lora", ("books",), federated_round=RoundTraining(3, 0.5))
    assert JobConfig.from_json(job.to_json()) == job
    for bad in (-1, True):
        with pytest.raises(ValueError, match="round"):
            RoundTraining(bad)  # type: ignore[arg-type]
    for mu in (0.0, 101.0, float("nan")):
        with pytest.raises(ValueError, match="proximal_mu"):
            RoundTraining(1, mu)
