"""The DP-SGD arithmetic both sides share: how the site calibrates a job's noise and counts its
privacy loss, and how many training samples a built-in trainer draws from.

The site decides a DP job's parameters (:class:`~trainers.contract.DPParameters`: noise
multiplier, Poisson sample rate, steps, clipping norm, δ) before the job starts, with
:func:`calibrate`, and passes them in the job's configuration; the trainer runs DP-SGD with
exactly those. Afterwards the site computes the ε it charges with :func:`epsilon`, Opacus' RDP
accountant over those same parameters: what the job writes as ``epsilon`` never counts. The
sample rate is ``batch_size / n``, ``n`` the training samples the trainer will draw from,
which the site counts with :func:`training_rows` on its own copy of the data (a wrong count
would change the batch size, never the guarantee: Poisson sampling at rate ``q`` is what the
accountant bounds, whatever ``n``). Opacus and transformers are imported only where used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from trainers import labelled
from trainers.contract import DPParameters
from trainers.errors import ConfigError
from trainers.hparams import (
    PREFIX,
    CausalLMHyperparameters,
    ClassificationHyperparameters,
    DPSettings,
    LoRAHyperparameters,
    TrainingHyperparameters,
)
from trainers.private_hparams import PrivateHyperparameters
from trainers.release import DatasetFiles
from trainers.runtime import TEXT_SUFFIXES

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 257, 8))
"""Rényi orders the accountant optimises over: Opacus' defaults (to 63) and a few beyond, for
small-noise runs (any order gives a valid bound; more only cost time: high integer orders are
slow to evaluate)."""
LOOSE_ORDER = r"Optimal order is the (largest|smallest)"

PRIVATE = "private"
"""The site's trainer of a team's graph (:mod:`trainers.private`): always DP-SGD."""

_HPARAMS: Mapping[str, type[TrainingHyperparameters]] = {
    "causal-lm": CausalLMHyperparameters,
    "causal-lm-lora": LoRAHyperparameters,
    "classification": ClassificationHyperparameters,
}


@dataclass(frozen=True)
class DPRequest:
    """What a DP job's hyperparameters ask for: the target, and the batch size and steps the
    noise is calibrated to."""

    settings: DPSettings
    batch_size: int
    steps: int


def dp_request(trainer: str, hyperparameters: Mapping[str, Any]) -> DPRequest | None:
    """The DP-SGD a built-in ``trainer`` was asked for, or None (no DP, or not a built-in).
    Raises :class:`ConfigError` for hyperparameters the trainer would refuse."""
    if trainer == PRIVATE:
        php = PrivateHyperparameters.parse(hyperparameters)
        settings = DPSettings(php.dp_epsilon, php.dp_delta, php.dp_max_grad_norm)
        return DPRequest(settings, php.batch_size, php.max_steps)
    cls = _HPARAMS.get(trainer)
    if cls is None:
        return None
    hp: TrainingHyperparameters = cls.parse(hyperparameters)  # type: ignore[attr-defined]
    if hp.dp is None:
        return None
    return DPRequest(hp.dp, hp.batch_size, hp.max_steps)


def calibrate(settings: DPSettings, *, sample_rate: float, steps: int) -> DPParameters:
    """The smallest noise multiplier (Opacus, RDP accountant) for which ``steps`` steps of
    Poisson rate ``sample_rate`` spend at most ``settings.target_epsilon`` at
    ``settings.delta``. Raises :class:`ConfigError` when no noise reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"{PREFIX}.batch_size", f"sample rate {sample_rate!r} is not in (0, 1]")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LOOSE_ORDER)
            noise = get_noise_multiplier(
                target_epsilon=settings.target_epsilon,
                target_delta=settings.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                alphas=RDP_ORDERS,
            )
    except ValueError as e:  # "The privacy budget is too low."
        raise ConfigError(
            f"{PREFIX}.dp_epsilon",
            f"{settings.target_epsilon} cannot be reached in {steps} steps sampling "
            f"{sample_rate:.3g} of the samples: {e}",
        ) from e
    return DPParameters(
        noise_multiplier=float(noise),
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=settings.max_grad_norm,
        delta=settings.delta,
    )


def epsilon(params: DPParameters, *, delta: float) -> float:
    """The ε that ``params.steps`` steps of the subsampled Gaussian mechanism spend at
    ``delta``, by Opacus' RDP accountant (never below zero; +inf where it cannot say)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(params.noise_multiplier, params.sample_rate, params.steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LOOSE_ORDER)
        value = float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    return value if math.isfinite(value) and value >= 0 else math.inf


def _text_file(relpath: str) -> bool:
    parts = PurePosixPath(relpath).parts
    return (
        bool(parts)
        and not any(p.startswith(".") for p in parts)
        and relpath.endswith(TEXT_SUFFIXES)
    )


def _held_out(n: int, fraction: float) -> int:
    """How many of ``n`` samples the trainers hold out for evaluation (at least one)."""
    return min(n - 1, max(1, round(n * fraction)))


def training_rows(
    trainer: str,
    hyperparameters: Mapping[str, Any],
    *,
    model_dir: Path,
    dataset_files: DatasetFiles,
) -> int:
    """How many training samples the built-in ``trainer`` draws its batches from, counted as
    it counts them (packed blocks of text for the causal LMs, tokenised examples for the
    classifier, less the held-out split), from the site's plaintext and base model's
    tokenizer. Raises :class:`ConfigError` for an unknown trainer and for data that leaves no
    training sample."""
    from transformers import AutoTokenizer

    cls = _HPARAMS.get(trainer)
    if cls is None and trainer != PRIVATE:
        raise ConfigError("trainer", f"{trainer!r} is not a built-in trainer")
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=False
    )
    if cls is None:  # the private trainer: every block of the text, none held out
        php = PrivateHyperparameters.parse(hyperparameters)
        ids = sum(
            len(tokenizer(data.decode("utf-8", errors="replace"))["input_ids"])
            for name, data in dataset_files()
            if _text_file(name)
        )
        if ids < php.block_size:
            raise ConfigError("datasets", "fewer tokens than one block")
        return ids // php.block_size
    hp = cls.parse(hyperparameters)  # type: ignore[attr-defined]
    if isinstance(hp, ClassificationHyperparameters):
        files = ((n, d) for n, d in dataset_files() if labelled.labelled_file(n))
        n = sum(
            1
            for text, _ in labelled.read_examples(files)
            if tokenizer(text, add_special_tokens=False, truncation=True, max_length=hp.max_length)[
                "input_ids"
            ]
        )
        if n < 2:
            raise ConfigError("datasets", f"{n} usable example(s); at least two are needed")
        return n - _held_out(n, hp.eval_fraction)
    assert isinstance(hp, CausalLMHyperparameters)
    separator = 1 if tokenizer.eos_token_id is not None else 0
    tokens = 0
    for name, data in dataset_files():
        if _text_file(name):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError("datasets", "a text file is not UTF-8") from None
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + separator
    blocks = tokens // hp.block_size
    if blocks < 2:
        raise ConfigError("datasets", f"{tokens} tokens make fewer than two blocks")
    return blocks - _held_out(blocks, hp.eval_fraction)
