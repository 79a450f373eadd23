"""A job's output as a hostile trainer would leave it at the end of a federated round: the site
reads the trained weights and the metrics only beneath ``/output`` (enclave._round_steps.
take_output), so a link to a file elsewhere (the next job's data, another round's update, the
site's keys), a hard link, a FIFO, a directory, a linked directory, or a sparse giant is
refused with a fixed reason, without reading it, blocking on it, or naming it; and the round
is left out (check_round's REJECTED), before anything of it reaches the gate."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from enclave._round_steps import check_round, take_output
from enclave.contract import RoundOrder
from policies.errors import IntegrityError
from policies.lifecycle import JobState
from policies.release import OutputLimits
from tests.unit._release_support import rules

SECRET = b"SECRET-BYTES-THE-SITE-KEEPS"
LINK_NAME = "SECRET_NAME_the_job_chose"


def _tensors(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    save_file({"w.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32)}, str(path))


@pytest.fixture
def setting(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(output, run_dir, elsewhere): the job's output with a weights dir, the site's run
    directory, and a directory outside the output holding a well-formed update and a secret."""
    output, run_dir, elsewhere = tmp_path / "output", tmp_path / "run", tmp_path / "elsewhere"
    for d in (output / "weights", run_dir, elsewhere / "weights"):
        d.mkdir(parents=True)
    _tensors(elsewhere / "weights" / "model.safetensors", 7)  # fits the start exactly
    (elsewhere / LINK_NAME).write_bytes(SECRET)
    _tensors(run_dir / "start.safetensors", 0)
    return output, run_dir, elsewhere


def _weights(output: Path) -> Path:
    return output / "weights" / "model.safetensors"


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


Plant = Callable[[Path, Path], None]
WEIGHTS_ATTACKS: dict[str, tuple[Plant, str]] = {
    "absolute link to a file that fits": (
        lambda o, e: _weights(o).symlink_to(e / "weights" / "model.safetensors"),
        "symbolic link",
    ),
    "relative link out": (
        lambda o, e: _weights(o).symlink_to(Path("../..") / e.name / LINK_NAME),
        "symbolic link",
    ),
    "linked weights directory": (
        lambda o, e: ((o / "weights").rmdir(), (o / "weights").symlink_to(e / "weights")),
        "symbolic link",
    ),
    "hard link to a file outside": (
        lambda o, e: os.link(e / "weights" / "model.safetensors", _weights(o)),
        "hard link",
    ),
    "FIFO": (lambda o, e: os.mkfifo(_weights(o)), "not a regular file"),
    "directory": (lambda o, e: _weights(o).mkdir(), "not a regular file"),
    "sparse giant": (lambda o, e: _sparse(_weights(o), 1 << 40), "size cap"),
    "missing": (lambda o, e: None, "does not exist"),
}
METRICS_ATTACKS: dict[str, tuple[Plant, str]] = {
    "link to a secret": (
        lambda o, e: (o / "metrics.json").symlink_to(e / LINK_NAME),
        "symbolic link",
    ),
    "hard link to a secret": (
        lambda o, e: os.link(e / LINK_NAME, o / "metrics.json"),
        "hard link",
    ),
    "FIFO": (lambda o, e: os.mkfifo(o / "metrics.json"), "not a regular file"),
    "over the metrics cap": (lambda o, e: _sparse(o / "metrics.json", 64 * 1024 + 1), "size cap"),
}


def _taken(output: Path, run_dir: Path) -> Path | IntegrityError:
    """take_output's result within 10 s (a FIFO must not block the site)."""
    result: list[Path | IntegrityError] = []

    def go() -> None:
        try:
            result.append(take_output(output, run_dir / "taken", [OutputLimits()]))
        except IntegrityError as e:
            result.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the site blocked on a file the job planted"
    return result[0]


def _nothing_read(run_dir: Path, error: IntegrityError) -> None:
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_bytes(), f"{f} holds bytes from outside the output"
    assert LINK_NAME not in str(error) and "elsewhere" not in str(error)
    assert not (run_dir / "taken" / "weights" / "model.safetensors").exists()


@pytest.mark.parametrize("attack", sorted(WEIGHTS_ATTACKS))
def test_planted_weights_are_refused_unread(setting: tuple[Path, Path, Path], attack: str) -> None:
    output, run_dir, elsewhere = setting
    plant, why = WEIGHTS_ATTACKS[attack]
    plant(output, elsewhere)
    error = _taken(output, run_dir)
    assert isinstance(error, IntegrityError)
    assert "trained weights were not read" in str(error) and why in str(error)
    _nothing_read(run_dir, error)


@pytest.mark.parametrize("attack", sorted(METRICS_ATTACKS))
def test_planted_metrics_are_refused_unread(setting: tuple[Path, Path, Path], attack: str) -> None:
    output, run_dir, elsewhere = setting
    _tensors(_weights(output), 1)
    plant, why = METRICS_ATTACKS[attack]
    plant(output, elsewhere)
    error = _taken(output, run_dir)
    assert isinstance(error, IntegrityError)
    assert "metrics were not read" in str(error) and why in str(error)
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_bytes()
    assert not (run_dir / "taken" / "metrics.json").exists()


def test_plain_output_is_taken_and_metrics_are_optional(setting: tuple[Path, Path, Path]) -> None:
    output, run_dir, _ = setting
    _tensors(_weights(output), 1)
    taken = _taken(output, run_dir)
    assert isinstance(taken, Path)
    assert (taken / "weights" / "model.safetensors").read_bytes() == _weights(output).read_bytes()
    assert not (taken / "metrics.json").exists()
    (output / "metrics.json").write_text('{"train_loss": 1.5}')
    taken = take_output(output, run_dir / "again", [OutputLimits()])
    assert (taken / "metrics.json").read_text() == '{"train_loss": 1.5}'


@pytest.mark.parametrize(
    "attack", ["absolute link to a file that fits", "FIFO", "hard link to a file outside"]
)
def test_a_round_with_planted_weights_is_left_out_before_the_gate(
    setting: tuple[Path, Path, Path], attack: str
) -> None:
    """check_round refuses the round itself: the vault, model and form are never reached
    (None here: touching them would fail the test with another error)."""
    output, run_dir, elsewhere = setting
    WEIGHTS_ATTACKS[attack][0](output, elsewhere)
    reports: list[object] = []
    end = check_round(
        RoundOrder(order=None, round=0, start=run_dir / "start.safetensors", start_sha256=""),  # type: ignore[arg-type]
        reports.append,
        run_id="job-1-round-0",
        vault=None,  # type: ignore[arg-type]
        run_dir=run_dir,
        output=output,
        rules=[("books-a", rules())],
        model_dir=run_dir,
        layout=None,
        versions=[],
        epsilon=0.0,
        weight=1,
    )
    assert getattr(end, "state", None) is JobState.REJECTED
    assert "trained weights were not read" in getattr(end, "detail", "")
    assert LINK_NAME not in str(end) and reports == []
    assert not (run_dir / "update").exists()
