"""A model team's own LightningModule trains through the harness and leaves what the gate takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainers import contract
from trainers.basemodel import create_base_model
from trainers.contract import JobConfig
from trainers.harness import run_job
from trainers.runtime import Paths
from trainers.synthetic import corpus, write_corpus
from trainers.weights import tensor_layout

EXAMPLE = Path(__file__).resolve().parents[2] / "trainers" / "examples" / "custom_lm"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    paths = Paths.under(tmp_path)
    create_base_model(paths.model, texts=corpus(documents=8, seed=1), seed=0)
    write_corpus(paths.data / "books", documents=4, seed=2)
    shutil.copytree(EXAMPLE, tmp_path / "code")
    paths.output.mkdir(parents=True)
    monkeypatch.setenv("SEALROOM_ROOT", str(tmp_path))
    return tmp_path


def _job(**kw: object) -> JobConfig:
    base: dict[str, object] = {
        "job_id": "job-custom",
        "trainer": "custom",
        "datasets": ("books",),
        "entrypoint": "lm:TinyLM",
        "hyperparameters": {"max_steps": 3, "learning_rate": 0.01},
    }
    base.update(kw)
    return JobConfig(**base)  # type: ignore[arg-type]


def test_a_custom_module_trains_and_writes_the_base_layout(root: Path) -> None:
    paths = Paths.under(root)
    assert run_job(_job(), paths=paths) == contract.EXIT_OK
    metrics = json.loads(paths.metrics_file.read_text())
    assert metrics["steps"] == 3 and metrics["train_loss"] > 0
    weights = paths.weights_dir / "model.safetensors"
    assert tensor_layout(weights) == tensor_layout(paths.model / "model.safetensors")
    lines = paths.progress_file.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][-1] == 3


@pytest.mark.parametrize(
    ("entry", "hp", "message"),
    [
        ("nope:TinyLM", {}, "cannot import 'nope'"),
        ("lm:Missing", {}, "no class 'Missing'"),
        ("lm:TinyLM", {"max_steps": 0}, "max_steps: must be a positive integer"),
    ],
)
def test_a_bad_entrypoint_or_hyperparameter_is_named(
    root: Path, entry: str, hp: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    import io

    err = io.StringIO()
    code = run_job(_job(entrypoint=entry, hyperparameters=hp), paths=Paths.under(root), stderr=err)
    assert code == contract.EXIT_BAD_CONFIG, err.getvalue()
    assert message in err.getvalue()
