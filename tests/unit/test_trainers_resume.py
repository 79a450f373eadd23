"""Resume checkpoints: a job killed mid-run (SIGKILL, in a real harness process) and started
again resumes from ``/output/checkpoints/last.ckpt`` and ends bit-identical to a run that was
never stopped; a shorter first run continues to the longer ``max_steps``; a checkpoint written
under other hyperparameters is refused; and the release gate never looks inside the folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from enclave.gate import run_gate
from tests.unit._release_support import rules
from tests.unit._trainer_support import make_inputs, mount, run_harness
from trainers import contract
from trainers.contract import JobConfig
from trainers.runtime import ROOT_ENV
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = {"max_steps": 12, "batch_size": 4, "block_size": 32, "seed": 3, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"), labelled="labelled")


def _steps(root: Path) -> list[int]:
    lines = (root / "output" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines]


def _kill_after_first_checkpoint(root: Path, trainer: str, hp: dict[str, Any]) -> None:
    """Run the harness as the container does, in its own process, and SIGKILL it as soon as
    its first checkpoint is in place: no clean-up code of ours runs."""
    env = {
        **os.environ,
        contract.JOB_ENV: JobConfig(
            job_id="job-1", trainer=trainer, datasets=("books",), hyperparameters=hp
        ).to_json(),
        ROOT_ENV: str(root),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers.harness"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = root / "output" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the harness ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within two minutes"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "output" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("trainer", "extra"),
    [
        ("causal-lm", {}),
        ("causal-lm-lora", {"lora_r": 4, "lora_dropout": 0.2}),  # dropout: torch's RNG restored
    ],
)
def test_a_killed_run_resumes_and_ends_as_if_never_stopped(
    template: Path, tmp_path: Path, trainer: str, extra: dict[str, Any]
) -> None:
    hp = {**LONG, **extra}
    straight = mount(tmp_path / "straight", template)
    assert run_harness(straight, hp, trainer=trainer)[0] == contract.EXIT_OK

    stopped = mount(tmp_path / "stopped", template)
    _kill_after_first_checkpoint(stopped, trainer, hp)
    done = _steps(stopped)
    assert done and done[-1] < LONG["max_steps"]
    rc, err = run_harness(stopped, hp, trainer=trainer)
    assert rc == contract.EXIT_OK, err

    # Every step once, however far the killed run got past its checkpoint.
    assert _steps(stopped) == list(range(1, LONG["max_steps"] + 1))
    for name in ("weights/model.safetensors", "metrics.json"):
        assert (stopped / "output" / name).read_bytes() == (straight / "output" / name).read_bytes()


@pytest.mark.parametrize(
    ("trainer", "dataset", "extra"),
    [
        ("causal-lm-lora", "books", {"block_size": 32, "lora_r": 4}),
        ("classification", "labelled", {"learning_rate": 0.003}),
    ],
)
def test_a_shorter_run_continues_from_its_checkpoint(
    template: Path, tmp_path: Path, trainer: str, dataset: str, extra: dict[str, Any]
) -> None:
    root = mount(tmp_path / "root", template)
    first = {"max_steps": 3, "batch_size": 4, "seed": 3, "checkpoint_every": 3, **extra}
    assert run_harness(root, first, trainer=trainer, datasets=(dataset,))[0] == contract.EXIT_OK
    checkpoint = root / "output" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 3
    rc, err = run_harness(root, {**first, "max_steps": 6}, trainer=trainer, datasets=(dataset,))
    assert rc == contract.EXIT_OK, err
    lines = [json.loads(x) for x in (root / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["total"]) for r in lines] == [
        (1, 3),
        (2, 3),
        (3, 3),
        (4, 6),
        (5, 6),
        (6, 6),
    ]
    assert json.loads((root / "output" / "metrics.json").read_text())["steps"] == 6
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 6
    if trainer == "causal-lm-lora":
        # A LoRA checkpoint holds what trains, not the frozen base.
        assert state["state_dict"] and all(".lora_" in k for k in state["state_dict"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"learning_rate": 0.5}, "checkpoint"),
        ({"seed": 4}, "checkpoint"),
        ({"max_steps": 4}, "hyperparameters.max_steps"),  # the checkpoint is at step 4 already
    ],
)
def test_a_checkpoint_from_other_settings_is_refused(
    template: Path, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    root = mount(tmp_path / "root", template)
    first = {**LONG, "max_steps": 4}
    assert run_harness(root, first)[0] == contract.EXIT_OK
    rc, err = run_harness(root, {**first, **change})
    assert rc == contract.EXIT_BAD_CONFIG
    assert err.startswith(f"sealroom-harness: bad config: {field}: "), err


def test_the_gate_never_releases_or_reads_checkpoints(template: Path, tmp_path: Path) -> None:
    root = mount(tmp_path / "root", template)
    assert run_harness(root, {**LONG, "max_steps": 4})[0] == contract.EXIT_OK
    out = root / "output"
    assert (out / "checkpoints" / "last.ckpt").is_file()  # a pickle, which the gate refuses
    (out / "checkpoints" / "notes.txt").write_text("anything at all")
    result = run_gate(
        out,
        rules=rules(allowed_metrics=frozenset(json.loads((out / "metrics.json").read_text()))),
        base_layout=tensor_layout(root / "model" / "base"),
        dest_dir=tmp_path / "release",
    )
    result.require_passed()
    released = sorted(
        str(p.relative_to(tmp_path / "release"))
        for p in (tmp_path / "release").rglob("*")
        if p.is_file()
    )
    assert released == ["metrics.json", "weights/model.safetensors"]
