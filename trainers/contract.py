"""The in-container contract between the site agent and the code that runs in the job.

The agent mounts the paths below and passes the job's trainer configuration as JSON in the
environment variable :data:`JOB_ENV`. This module is imported on both sides (the agent on the
host, the harness in the container), so it holds only constants and plain parsing, no I/O
beyond reading the environment.

| path            | what                                                  | mode       |
| --------------- | ----------------------------------------------------- | ---------- |
| /data/<dataset> | the approved datasets, decrypted for this job only    | read-only  |
| /model/base     | the base model (Hugging Face format directory)        | read-only  |
| /model/start    | a federated round's starting weights (the global model) | read-only |
| /code           | the code bundle                                       | read-only  |
| /output         | the only writable place that outlives the job; capped | read-write |
| /tmp            | scratch, memory-backed, capped                        | read-write |

Release candidates: ``/output/weights/*.safetensors`` and ``/output/metrics.json`` (a flat
object of name -> number). Live progress: ``/output/metrics.jsonl``, one JSON object a line
with at least ``step``, ``total`` and ``loss``. Checkpoints for resuming go to
``/output/checkpoints/`` and are never released. Stdout and stderr stay in the site.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

BUILTIN_DEFAULT_STEPS = 30
"""``max_steps`` of a built-in trainer when the spec leaves it out (:mod:`trainers.hparams`)."""
CUSTOM_DEFAULT_STEPS = 100
"""``max_steps`` of the team's own module when the spec leaves it out (:mod:`trainers.custom`)."""


def planned_steps(hyperparameters: Mapping[str, object], *, custom: bool) -> int:
    """The optimizer steps a job runs: its ``max_steps``, else the trainer's default."""
    steps = hyperparameters.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        return steps
    return CUSTOM_DEFAULT_STEPS if custom else BUILTIN_DEFAULT_STEPS


DATA_DIR = PurePosixPath("/data")
MODEL_DIR = PurePosixPath("/model/base")
CODE_DIR = PurePosixPath("/code")
OUTPUT_DIR = PurePosixPath("/output")
WEIGHTS_DIR = OUTPUT_DIR / "weights"
METRICS_FILE = OUTPUT_DIR / "metrics.json"
PROGRESS_FILE = OUTPUT_DIR / "metrics.jsonl"
CHECKPOINT_DIR = OUTPUT_DIR / "checkpoints"
START_DIR = PurePosixPath("/model/start")
START_WEIGHTS = START_DIR / "model.safetensors"
"""A federated round's start: the global model's trainable tensors, in the layout the trainer
writes (a LoRA adapter's tensors), mounted only for a round."""

JOB_ENV = "SEALROOM_JOB"
"""Environment variable that carries :class:`JobConfig` as JSON."""

WARM_FLAG = "--warm"
"""``python -m trainers.harness --warm``: a warm container's harness (see the site's
``enclave._warm``): it imports the libraries every built-in trainer needs, says
:data:`WARM_READY` on stdout and waits for :data:`WARM_ASSIGN_FILE`, which the site writes
(read-only to the job) once it has given the container a job: ``{"env": {...}}``, the job's
environment (:data:`JOB_ENV` and the spec's ``JOB_*`` variables). Nothing of the job is in the
container before that file."""
WARM_READY = "sealroom-harness: warm"
WARM_ASSIGN_FILE = CODE_DIR / ".sealroom-job.json"

JOB_USER = "10001:10001"
"""The unprivileged uid:gid the job runs as (created in the runtime image)."""

# Exit codes of the harness, so the agent can tell the job's fault from a bad configuration.
EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_BAD_CONFIG = 2


@dataclass(frozen=True)
class DPParameters:
    """The DP-SGD a built-in trainer runs, decided by the site (never by the job): Gaussian
    noise of ``noise_multiplier`` times ``max_grad_norm`` on per-sample gradients clipped to
    ``max_grad_norm``, each sample drawn into a step with probability ``sample_rate``, for
    ``steps`` steps, calibrated for ``delta``. The site charges the ε of exactly these.
    Raises ``ValueError`` for values no accountant could use."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"dp.{name} must be a number")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"dp.{name} must be a positive finite number")
        if not (self.sample_rate <= 1 and self.delta < 1):
            raise ValueError("dp: sample_rate and delta must lie in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError("dp.steps must be a positive integer")

    def to_obj(self) -> dict[str, float | int]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.delta,
        }

    @classmethod
    def from_obj(cls, raw: Any) -> DPParameters:
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError(f"dp must be an object of {', '.join(cls.__dataclass_fields__)}")
        return cls(**raw)


@dataclass(frozen=True)
class RoundTraining:
    """One round of a federated job at a site: start from the global model's weights (mounted
    at :data:`START_WEIGHTS`) and, for FedProx, pull each step back towards them by
    ``proximal_mu``. The round's step count is the hyperparameters' ``max_steps``, which the site
    sets to the plan's ``local_steps``. Raises ``ValueError`` for a bad ``proximal_mu``."""

    round: int
    proximal_mu: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError("federated_round.round must be a non-negative integer")
        mu = self.proximal_mu
        if mu is not None and (
            isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 < mu <= 100
        ):
            raise ValueError("federated_round.proximal_mu must be a number in (0, 100]")

    def to_obj(self) -> dict[str, Any]:
        return {"round": self.round, "proximal_mu": self.proximal_mu}

    @classmethod
    def from_obj(cls, raw: Any) -> RoundTraining:
        if not isinstance(raw, dict) or set(raw) != {"round", "proximal_mu"}:
            raise ValueError("federated_round must be an object of round, proximal_mu")
        return cls(**raw)


@dataclass(frozen=True)
class JobConfig:
    """What the harness needs to know about the job. Built by the site agent from the spec.

    ``trainer`` is a built-in trainer's name (e.g. ``"causal-lm"``) or ``"custom"``, in which
    case ``entrypoint`` names ``module:ClassName`` inside ``/code``. ``dp`` is the DP-SGD the
    site decided for a built-in trainer asked for it (``dp_epsilon``); None otherwise.
    """

    job_id: str
    trainer: str
    datasets: tuple[str, ...]
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    entrypoint: str | None = None
    dp: DPParameters | None = None
    federated_round: RoundTraining | None = None
    """Set for one round of a federated job: train from :data:`START_WEIGHTS`."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "trainer": self.trainer,
                "datasets": list(self.datasets),
                "hyperparameters": dict(self.hyperparameters),
                "entrypoint": self.entrypoint,
                "dp": None if self.dp is None else self.dp.to_obj(),
                "federated_round": None
                if self.federated_round is None
                else self.federated_round.to_obj(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{JOB_ENV} must be a JSON object")
        for key in ("job_id", "trainer"):
            if key not in raw:
                raise ValueError(f"{JOB_ENV}: missing {key!r}")
            if not isinstance(raw[key], str):
                raise ValueError(f"{JOB_ENV}: {key} must be a string")
        datasets = raw.get("datasets", [])
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise ValueError(f"{JOB_ENV}: datasets must be a list of names")
        hyperparameters = raw.get("hyperparameters") or {}
        if not isinstance(hyperparameters, dict):
            raise ValueError(f"{JOB_ENV}: hyperparameters must be an object")
        entrypoint = raw.get("entrypoint")
        if entrypoint is not None and not isinstance(entrypoint, str):
            raise ValueError(f"{JOB_ENV}: entrypoint must be a string or null")
        dp = raw.get("dp")
        rnd = raw.get("federated_round")
        return cls(
            job_id=raw["job_id"],
            trainer=raw["trainer"],
            datasets=tuple(datasets),
            hyperparameters=hyperparameters,
            entrypoint=entrypoint,
            dp=None if dp is None else DPParameters.from_obj(dp),
            federated_round=None if rnd is None else RoundTraining.from_obj(rnd),
        )

    @classmethod
    def from_env(cls) -> JobConfig:
        text = os.environ.get(JOB_ENV)
        if text is None:
            raise ValueError(f"environment variable {JOB_ENV} is not set")
        return cls.from_json(text)
