"""What a built-in trainer's release is, for the site: computed before the job's output is
read, from trusted inputs only (the approved hyperparameters, the site's copy of the base
model and, when a classifier's labels are not fixed by the hyperparameters, the dataset's
plaintext, which the site holds anyway; for the private trainer, the program in the code
bundle the site unpacked itself, read as data by :func:`trainers.private.released_layout`).

:func:`expected_release` is the one call the site makes: the kind of release, the exact tensor
layout the trainer writes, the name the weights are released under and the config file the
site writes beside them. Torch-free but for the private trainer's branch (it loads the
program); raises :class:`~trainers.errors.ConfigError` for hyperparameters or a base model the
trainer would have refused, and
:class:`~trainers.errors.DataError` for data it would have refused (a job that got as far as
the gate did not, so either means the site and the trainer disagree).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers import labelled, lora
from trainers.errors import ConfigError
from trainers.hparams import (
    CausalLMHyperparameters,
    ClassificationHyperparameters,
    LoRAHyperparameters,
)
from trainers.private_hparams import PrivateHyperparameters
from trainers.weights import WEIGHTS_FILE, TensorLayout, tensor_layout

FULL = "full"
LORA_ADAPTER = "lora-adapter"
CLASSIFIER = "classifier"
CLASSIFIER_CONFIG = "config.json"
GRAPH_PARAMETERS = "graph-parameters"
"""The trainable parameters of a team's graph (``trainer: private``), as the site's DP-SGD
trainer wrote them; not a model the base's libraries load."""


@dataclass(frozen=True)
class ExpectedRelease:
    """``kind`` is ``full``, ``lora-adapter``, ``classifier`` or ``graph-parameters``;
    ``config_name`` and ``config`` are None for a full release (its config is the base
    model's) and for a graph's parameters (they have none)."""

    kind: str
    layout: TensorLayout
    weights_name: str
    config_name: str | None = None
    config: bytes | None = field(default=None, repr=False)


def release_names(trainer: str) -> tuple[str, str | None]:
    """The names a built-in ``trainer``'s release gives its weights and its config file (None:
    the base model's config serves). Raises :class:`ConfigError` for another trainer."""
    names: dict[str, tuple[str, str | None]] = {
        "causal-lm": (WEIGHTS_FILE, None),
        "causal-lm-lora": (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG),
        "classification": (WEIGHTS_FILE, CLASSIFIER_CONFIG),
        "private": (WEIGHTS_FILE, None),
    }
    if trainer not in names:
        raise ConfigError("trainer", f"{trainer!r} is not a built-in trainer")
    return names[trainer]


DatasetFiles = Callable[[], Iterable[tuple[str, bytes]]]
"""Yields (path within its dataset, plaintext) for every file of the job's datasets."""


def expected_release(
    trainer: str,
    hyperparameters: Mapping[str, Any],
    *,
    model_dir: Path,
    dataset_files: DatasetFiles | None = None,
    code_dir: Path | None = None,
) -> ExpectedRelease:
    """The release a built-in ``trainer`` produces under ``hyperparameters``.

    ``dataset_files`` is called only for a classifier whose ``labels`` are not given (the
    number of classes, hence the head's shape, comes from the data then). ``code_dir`` is the
    job's unpacked code bundle, read only for the private trainer (its program says which
    parameters are trained). Raises :class:`ConfigError` for an unknown trainer
    (``trainer``), bad hyperparameters or a private job without a bundle, and
    :class:`~trainers.private.GraphRefused` for a program the trainer would have refused.
    """
    if trainer == "private":
        PrivateHyperparameters.parse(hyperparameters)
        if code_dir is None:
            raise ConfigError("bundle", "trainer 'private' trains the bundle's program: none given")
        from trainers import private  # torch: only the private trainer's release needs it

        layout = private.released_layout(code_dir / private.PROGRAM_FILE)
        return ExpectedRelease(GRAPH_PARAMETERS, layout, WEIGHTS_FILE)
    if trainer == "causal-lm":
        CausalLMHyperparameters.parse(hyperparameters)
        return ExpectedRelease(FULL, tensor_layout(model_dir), WEIGHTS_FILE)
    if trainer == "causal-lm-lora":
        hp = LoRAHyperparameters.parse(hyperparameters)
        return ExpectedRelease(
            LORA_ADAPTER,
            lora.adapter_layout(model_dir, hp),
            lora.ADAPTER_WEIGHTS,
            lora.ADAPTER_CONFIG,
            lora.adapter_config_bytes(hp),
        )
    if trainer == "classification":
        chp = ClassificationHyperparameters.parse(hyperparameters)
        given = chp.label_names
        if given is not None:
            count = len(given)
        else:
            if dataset_files is None:
                raise ConfigError(
                    "hyperparameters.labels", "unset, and the site supplied no data to count"
                )
            files = ((n, d) for n, d in dataset_files() if labelled.labelled_file(n))
            count = len(labelled.resolve_labels(chp, labelled.read_examples(files)))
        names = labelled.release_label_names(chp, count)
        return ExpectedRelease(
            CLASSIFIER,
            labelled.released_layout(model_dir, count),
            WEIGHTS_FILE,
            CLASSIFIER_CONFIG,
            labelled.release_config_bytes(model_dir, names),
        )
    raise ConfigError("trainer", f"{trainer!r} is not a built-in trainer")
