"""``sealroom job try --mock``: a job dry-runs on a mock in the enclave's container and gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.mock import generate_mock
from tests.integration._deployment import policy
from trainers.basemodel import create_base_model
from trainers.synthetic import corpus, write_corpus

pytestmark = pytest.mark.docker

SPEC = """\
name: dry
datasets: [books]
base_model: tiny-lm
trainer: {trainer}
{extra}purpose: testing
hyperparameters: {{max_steps: 3, learning_rate: 0.01}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, runtime_image: str) -> Path:
    root = tmp_path_factory.mktemp("try")
    write_corpus(root / "books", documents=4, seed=3)
    generate_mock(root / "books", root / "books-mock", seed=1)
    create_base_model(root / "model", texts=corpus(documents=8, seed=1), seed=0)
    (root / "policy.yaml").write_text(policy("books", custom_code=True))
    return root


def _try(root: Path, spec: str, *extra: str) -> tuple[int, dict]:
    (root / "spec.yaml").write_text(spec)
    result = CliRunner().invoke(
        app,
        [
            "job",
            "try",
            str(root / "spec.yaml"),
            "--mock",
            f"books={root / 'books-mock'}",
            "--model",
            str(root / "model"),
            "--policy",
            str(root / "policy.yaml"),
            *extra,
            "--json",
        ],
    )
    return result.exit_code, json.loads(result.stdout)


def test_a_builtin_job_dry_runs_on_the_mock_and_would_be_released(setup: Path) -> None:
    code, out = _try(setup, SPEC.format(trainer="causal-lm", extra=""))
    assert code == 0, out
    assert out["would_release"] and out["metrics"]["steps"] == 3
    assert {c["check"] for c in out["checks"]} >= {"artifacts", "weights", "metrics"}
    assert "memorization" not in {c["check"] for c in out["checks"]}


def test_a_custom_job_that_smuggles_a_pickle_is_told_before_it_submits(setup: Path) -> None:
    code_dir = setup / "code"
    code_dir.mkdir(exist_ok=True)
    (code_dir / "attack.py").write_text(
        "import json, pickle, shutil, sys\n"
        "shutil.copy('/model/base/model.safetensors', '/output/model.safetensors')\n"
        "pickle.dump({'x': 1}, open('/output/model.pt', 'wb'))\n"
        "json.dump({'steps': 1}, open('/output/metrics.json', 'w'))\n"
        "sys.exit(0)\n"
    )
    code, out = _try(
        setup,
        SPEC.format(trainer="custom", extra='entrypoint: "attack:M"\n'),
        "--bundle",
        str(code_dir),
    )
    assert code == 1 and not out["would_release"]
    failed = [c for c in out["checks"] if not c["passed"]]
    assert failed and failed[0]["check"] == "artifacts"
