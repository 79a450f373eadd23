"""A federated round of a whole model in the trainer (trainers.rounds): a full fine-tune and a
classifier start from the base plus the global difference the site mounts, and write what they
trained as a difference from the base, in F32; the site composes the final difference back into
a release of the base's layout and dtypes, the same bytes wherever it is done."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from tests.unit._trainer_support import make_inputs, run_harness
from trainers import contract, labelled, rounds
from trainers.contract import RoundTraining
from trainers.runtime import Paths
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FAST: dict[str, Any] = {"max_steps": 3, "batch_size": 4, "block_size": 32, "seed": 3}
LABELS = "weather,speech,errand"


@pytest.fixture(scope="module")
def labelled_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(
        tmp_path_factory.mktemp("labelled"), books=None, labelled="books", labelled_count=120
    )


def _round(
    template: Path, tmp: Path, start: dict[str, np.ndarray], hp: dict[str, Any], trainer: str
) -> dict[str, torch.Tensor]:
    root = tmp / "root"
    (root / "model").mkdir(parents=True)
    (root / "data").symlink_to(template / "data")
    (root / "model" / "base").symlink_to(template / "model" / "base")
    paths = Paths.under(root)
    paths.start_weights.parent.mkdir()
    save_numpy(start, str(paths.start_weights), metadata={"format": "pt"})
    rc, err = run_harness(root, hp, trainer=trainer, federated_round=RoundTraining(round=1))
    assert rc == contract.EXIT_OK, err
    out = paths.weights_dir / "model.safetensors"
    assert {dtype for dtype, _ in tensor_layout(out).values()} == {"F32"}
    return load_file(str(out))


def _gap(a: dict[str, torch.Tensor], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - torch.from_numpy(b[k])).abs().max()) for k in a)


def test_a_full_fine_tune_round_starts_from_base_plus_difference(
    template: Path, tmp_path: Path
) -> None:
    base = template / "model" / "base"
    layout = rounds.round_layout(tensor_layout(base))
    zero = rounds.initial_start(layout, new=frozenset(), seed=0)
    assert all(not v.any() for v in zero.values())
    rng = np.random.default_rng(5)
    moved = {k: rng.normal(0, 0.01, size=v.shape).astype(np.float32) for k, v in zero.items()}
    still = {**FAST, "learning_rate": 1e-9}
    # A rate too small to move anything: what comes out is the start, as a difference.
    assert _gap(_round(template, tmp_path / "a", zero, still, "causal-lm"), zero) < 1e-5
    assert _gap(_round(template, tmp_path / "b", moved, still, "causal-lm"), moved) < 1e-5
    # A real rate trains away from it.
    trained = _round(template, tmp_path / "c", moved, {**FAST, "learning_rate": 0.01}, "causal-lm")
    assert _gap(trained, moved) > 1e-3


def test_the_final_difference_composes_to_the_same_release_anywhere(
    template: Path, tmp_path: Path
) -> None:
    base = template / "model" / "base"
    release = tensor_layout(base)
    rng = np.random.default_rng(9)
    diff = {
        k: rng.normal(0, 0.01, size=s).astype(np.float32)
        for k, (_, s) in rounds.round_layout(release).items()
    }
    save_numpy(diff, str(tmp_path / "diff.safetensors"))
    for name in ("one", "two"):
        rounds.compose(
            tmp_path / "diff.safetensors",
            release=release,
            model_dir=base,
            dest=tmp_path / name / "model.safetensors",
        )
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert tensor_layout(tmp_path / "one" / "model.safetensors") == release
    composed, original = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(base / "model.safetensors")),
    )
    for k, d in diff.items():
        assert torch.allclose(composed[k], original[k] + torch.from_numpy(d), atol=1e-6)
    bad = {**diff, next(iter(diff)): np.full_like(next(iter(diff.values())), np.nan)}
    save_numpy(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(Exception, match="not finite"):
        rounds.compose(
            tmp_path / "bad.safetensors", release=release, model_dir=base, dest=tmp_path / "x"
        )


def test_a_classifier_round_starts_its_head_from_the_start(
    labelled_template: Path, tmp_path: Path
) -> None:
    base = labelled_template / "model" / "base"
    release = labelled.released_layout(base, 3)
    new = rounds.new_tensors("classification")
    assert new == set(release) - rounds.base_names(base)
    start = rounds.initial_start(rounds.round_layout(release), new=new, seed=4)
    head = start[labelled.HEAD]
    assert head.std() == pytest.approx(rounds.HEAD_INIT_STD, rel=0.3)
    assert all(not v.any() for k, v in start.items() if k != labelled.HEAD)
    hp = {"max_steps": 3, "batch_size": 8, "labels": LABELS, "seed": 3}
    # The head the round began from is the start's, not a fresh one: at a vanishing rate it
    # comes out as it went in (whole), and the backbone as no difference at all.
    out = _round(
        labelled_template, tmp_path / "a", start, {**hp, "learning_rate": 1e-9}, "classification"
    )
    assert _gap(out, start) < 1e-5
    out = _round(
        labelled_template, tmp_path / "b", start, {**hp, "learning_rate": 0.01}, "classification"
    )
    assert _gap(out, start) > 1e-3


def test_a_start_that_does_not_fit_the_whole_model_is_a_bad_config(
    template: Path, tmp_path: Path
) -> None:
    layout = rounds.round_layout(tensor_layout(template / "model" / "base"))
    start = rounds.initial_start(layout, new=frozenset(), seed=0)
    name = sorted(start)[0]
    for case, bad in {
        "missing": {k: v for k, v in start.items() if k != name},
        "reshaped": {**start, name: np.zeros((1, *start[name].shape), np.float32)},
        "not finite": {**start, name: np.full_like(start[name], np.inf)},
    }.items():
        root = tmp_path / case / "root"
        (root / "model").mkdir(parents=True)
        (root / "data").symlink_to(template / "data")
        (root / "model" / "base").symlink_to(template / "model" / "base")
        paths = Paths.under(root)
        paths.start_weights.parent.mkdir()
        save_numpy(bad, str(paths.start_weights))
        rc, err = run_harness(
            root, FAST, trainer="causal-lm", federated_round=RoundTraining(round=1)
        )
        assert rc == contract.EXIT_BAD_CONFIG, (case, err)
        assert "federated_round" in err, case
        assert not (paths.weights_dir / "model.safetensors").exists(), case
        shutil.rmtree(tmp_path / case)
