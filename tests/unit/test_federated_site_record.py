"""What a site keeps of the federated jobs it takes part in, whatever the gateway asks: a round
is trained once (a retry gets the kept update, at no privacy cost), never more trainings than
the approved rounds nor past the per-job ε, and an update goes into one sum at most. And the
update as a vector: the trained weights minus the start, and the next global model back."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from enclave.federated import (
    RoundBook,
    apply_mean,
    read_vector,
    round_vector,
    split_mean,
    update_layout,
    update_length,
    write_update,
)
from policies.errors import IntegrityError, PolicyViolation
from trainers import privacy
from trainers.contract import DPParameters
from trainers.hparams import DPSettings

DELTA = 1e-5


def _dp(rounds: int, local_steps: int, epsilon: float = 4.0) -> DPParameters:
    """DP-SGD calibrated, as the site calibrates it, for the whole plan; one round's steps."""
    whole = privacy.calibrate(
        DPSettings(epsilon, DELTA, 1.0), sample_rate=0.05, steps=rounds * local_steps
    )
    return dataclasses.replace(whole, steps=local_steps)


def _train(
    book: RoundBook, r: int, dp: DPParameters | None, cap: float = 4.0, rounds: int = 3
) -> bool:
    return book.train(
        "job-1", r, local_steps=10, planned_rounds=rounds, dp=dp, max_epsilon=cap, delta=DELTA
    )


def test_a_round_is_trained_once_and_the_plan_bounds_the_count(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    dp = _dp(3, 10)
    assert _train(book, 0, dp) and _train(book, 1, dp)
    assert not _train(book, 1, dp)  # a retry: the kept update, no new training
    assert _train(book, 2, dp)
    with pytest.raises(PolicyViolation, match="beyond the 3 rounds"):
        _train(book, 3, dp)
    rec = book.job("job-1")
    assert rec is not None and rec.trained == (0, 1, 2)
    # Calibrated for the plan: the whole job ends at its ε, not past it.
    assert rec.epsilon(delta=DELTA) == pytest.approx(4.0, rel=0.02)
    assert rec.epsilon(delta=DELTA) <= 4.0 + 1e-9


def test_a_round_past_the_per_job_epsilon_is_refused_before_it_trains(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    dp = _dp(2, 10)  # noise for 2 rounds at ε 4, while the plan claims 5
    assert _train(book, 0, dp, rounds=5) and _train(book, 1, dp, rounds=5)
    before = book.path.read_bytes()
    with pytest.raises(PolicyViolation, match="over the per-job cap 4"):
        _train(book, 2, dp, rounds=5)
    assert book.path.read_bytes() == before  # nothing recorded


def test_without_site_set_dp_any_finite_cap_refuses(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    with pytest.raises(PolicyViolation, match="epsilon to inf"):
        _train(book, 0, None)
    assert _train(book, 0, None, cap=float("inf"))


def test_settings_changed_mid_job_are_refused(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    dp = _dp(3, 10)
    assert _train(book, 0, dp)
    with pytest.raises(PolicyViolation, match="other steps, rounds or DP"):
        book.train("job-1", 1, local_steps=20, planned_rounds=3, dp=dp, max_epsilon=4, delta=DELTA)
    with pytest.raises(PolicyViolation, match="other steps, rounds or DP"):
        _train(book, 1, _dp(3, 10, epsilon=8.0))


def test_an_update_goes_into_one_sum_at_most(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    dp = _dp(3, 10)
    with pytest.raises(PolicyViolation, match="not trained here"):
        book.mask("job-1", 0)
    _train(book, 0, dp)
    book.mask("job-1", 0)
    with pytest.raises(PolicyViolation, match="no second one"):
        book.mask("job-1", 0)
    # The record survives the site: a new book on the same file knows it.
    assert RoundBook.of_site(tmp_path).job("job-1").masked == (0,)  # type: ignore[union-attr]


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    errors: list[BaseException] = []

    def one(job: str) -> None:
        try:
            RoundBook.of_site(tmp_path).train(
                job,
                0,
                local_steps=1,
                planned_rounds=1,
                dp=None,
                max_epsilon=float("inf"),
                delta=DELTA,
            )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(f"job-{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(book.held()) == 16


def test_a_malformed_record_is_the_sites_error_not_a_fresh_start(tmp_path: Path) -> None:
    book = RoundBook.of_site(tmp_path)
    book.path.parent.mkdir(parents=True)
    book.path.write_text(json.dumps({"job-1": {"trained": "x"}}))
    with pytest.raises(Exception, match="malformed"):
        _train(book, 0, None, cap=float("inf"))


def _weights(path: Path, seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    save_file(tensors, str(path))
    return tensors


def test_the_update_is_the_difference_and_the_mean_applies_back(tmp_path: Path) -> None:
    shapes = {"b.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4)}
    start = _weights(tmp_path / "start.safetensors", 0, **shapes)
    trained = _weights(tmp_path / "trained.safetensors", 1, **shapes)
    write_update(
        tmp_path / "trained.safetensors",
        tmp_path / "start.safetensors",
        tmp_path / "update" / "w.safetensors",
    )
    layout = update_layout(tmp_path / "start.safetensors")
    vec = read_vector(tmp_path / "update" / "w.safetensors", layout)
    assert vec.shape == (64,) and vec.dtype == np.float64 and update_length(layout) == 64
    # Name order: a.* first.
    assert np.allclose(vec[:32], (trained["a.lora_B.weight"] - start["a.lora_B.weight"]).ravel())
    apply_mean(tmp_path / "start.safetensors", vec, tmp_path / "next.safetensors")
    back = load_file(str(tmp_path / "next.safetensors"))
    for n in shapes:
        assert back[n].dtype == np.float32
        assert np.allclose(back[n], trained[n], atol=1e-6)


def test_a_gated_update_in_bf16_reads_back_and_the_loss_rides_along(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    layout = {"w": ("F32", (3, 2))}
    values = torch.tensor([[0.5, -0.25], [1e-3, 0.0], [2.0, -3.0]])
    save_torch({"w": values.to(torch.bfloat16)}, str(tmp_path / "gated.safetensors"))
    vec = read_vector(tmp_path / "gated.safetensors", layout)
    assert np.allclose(vec, values.numpy().ravel(), rtol=1e-2)
    full = round_vector(vec, 2.5, clip=0.5)
    assert full.shape == (7,)
    mean, loss = split_mean(full, clip=0.5)
    assert loss == pytest.approx(2.5) and np.array_equal(mean, vec)
    assert split_mean(round_vector(vec, float("nan"), clip=1.0), clip=1.0)[1] == 64.0


def test_updates_that_do_not_fit_the_start_are_refused(tmp_path: Path) -> None:
    _weights(tmp_path / "start.safetensors", 0, w=(4, 4))
    _weights(tmp_path / "other.safetensors", 1, w=(4, 5))
    _weights(tmp_path / "renamed.safetensors", 1, v=(4, 4))
    for bad in ("other", "renamed"):
        with pytest.raises(IntegrityError, match="do not fit"):
            write_update(
                tmp_path / f"{bad}.safetensors",
                tmp_path / "start.safetensors",
                tmp_path / "u.safetensors",
            )
        with pytest.raises(IntegrityError, match="does not fit"):
            read_vector(tmp_path / f"{bad}.safetensors", {"w": ("F32", (4, 4))})
    with pytest.raises(IntegrityError, match="does not fit"):
        apply_mean(tmp_path / "start.safetensors", np.zeros(15), tmp_path / "n.safetensors")
    with pytest.raises(IntegrityError, match="does not fit"):
        apply_mean(tmp_path / "start.safetensors", np.full(16, np.nan), tmp_path / "n.safetensors")
    save_file({"w": np.zeros((2, 2), dtype=np.int32)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(IntegrityError, match="cannot be averaged"):
        update_layout(tmp_path / "ints.safetensors")
