"""The errors the in-container code raises on purpose.

``trainers/`` is baked into the runtime image without the rest of Sealroom, so it cannot derive
from :class:`policies.errors.SealroomError`. The site agent sees these only as the harness's exit
code (:data:`trainers.contract.EXIT_BAD_CONFIG` for :class:`ConfigError`,
:data:`trainers.contract.EXIT_TRAINING_FAILED` for the rest); host-side callers of the
torch-free helpers (the release gate reading a layout, the gateway validating hyperparameters at
submission) map them at their edge, e.g. ``ConfigError -> SpecError`` and
``WeightsError -> IntegrityError``.

    TrainerError
    ├── ConfigError     the job configuration or a hyperparameter is bad; ``field`` names it
    ├── DataError       the mounted data cannot be used (no text, too few tokens, bad encoding)
    ├── WeightsError    a safetensors file is malformed or its layout differs from the expected
    └── TrainingFailed  training itself went wrong (non-finite loss, missing tensor at export)
"""

from __future__ import annotations


class TrainerError(Exception):
    """Root of every error the trainers raise on purpose."""


class ConfigError(TrainerError, ValueError):
    """A job configuration field is bad. ``field`` is its dotted name, e.g.
    ``hyperparameters.learning_rate``; the message starts with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DataError(TrainerError):
    """The mounted data cannot be used for this job."""


class WeightsError(TrainerError, ValueError):
    """A safetensors file is malformed, or its tensor layout differs from the expected one."""


class TrainingFailed(TrainerError):
    """Training ran but did not produce a usable result."""
