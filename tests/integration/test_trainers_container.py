"""The built-in causal-LM trainer inside the real runtime image, started with the isolation the
site agent uses: no network, read-only root, no capabilities, the job user, inputs read-only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from trainers import contract, synthetic
from trainers.basemodel import create_base_model, tensor_layout
from trainers.contract import JobConfig

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("container-inputs")
    synthetic.write_corpus(root / "books", documents=12, seed=1)
    create_base_model(root / "base", texts=synthetic.corpus(documents=12, seed=0))
    return root


def _output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "output"
    out.mkdir()
    uid, gid = (int(x) for x in contract.JOB_USER.split(":"))
    if os.geteuid() == 0:
        os.chown(out, uid, gid)
    else:
        out.chmod(0o777)
    return out


def _run(
    docker_client: Any, image: str, labels: dict[str, str], inputs: Path, out: Path, job: JobConfig
) -> tuple[int, str]:
    container = docker_client.containers.run(
        image,
        detach=True,
        environment={contract.JOB_ENV: job.to_json()},
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        user=contract.JOB_USER,
        tmpfs={"/tmp": "size=512m"},
        volumes={
            str(inputs / "books"): {"bind": "/data/books", "mode": "ro"},
            str(inputs / "base"): {"bind": str(contract.MODEL_DIR), "mode": "ro"},
            str(out): {"bind": str(contract.OUTPUT_DIR), "mode": "rw"},
        },
        labels=labels,
    )
    try:
        status = container.wait(timeout=300)
        return int(status["StatusCode"]), container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


def test_causal_lm_trains_in_the_runtime_image(
    docker_client: Any,
    runtime_image: str,
    test_labels: dict[str, str],
    inputs: Path,
    tmp_path: Path,
) -> None:
    out = _output_dir(tmp_path)
    job = JobConfig(
        job_id="container-1",
        trainer="causal-lm",
        datasets=("books",),
        hyperparameters={"max_steps": 5, "batch_size": 4, "block_size": 32},
    )
    rc, logs = _run(docker_client, runtime_image, test_labels, inputs, out, job)
    assert rc == contract.EXIT_OK, logs
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["metrics.json", "metrics.jsonl", "weights/model.safetensors"]
    assert tensor_layout(out / "weights" / "model.safetensors") == tensor_layout(inputs / "base")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5
    assert all(math.isfinite(v) for v in metrics.values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_bad_hyperparameter_exits_bad_config_in_the_image(
    docker_client: Any,
    runtime_image: str,
    test_labels: dict[str, str],
    inputs: Path,
    tmp_path: Path,
) -> None:
    out = _output_dir(tmp_path)
    job = JobConfig(
        job_id="container-2",
        trainer="causal-lm",
        datasets=("books",),
        hyperparameters={"learning_rate": -1},
    )
    rc, logs = _run(docker_client, runtime_image, test_labels, inputs, out, job)
    assert rc == contract.EXIT_BAD_CONFIG
    assert "bad config: hyperparameters.learning_rate: " in logs
    assert list(out.iterdir()) == []
