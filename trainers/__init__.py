"""What runs inside the job container: the harness (``python -m trainers.harness``) and the
built-in trainers. This package must import nothing from gateway/, enclave/ or policies/: only
trainers/ is baked into the runtime image. :mod:`trainers.contract` is the in-container
contract shared with the site agent.

Importing the package stays torch-free, so the host side (the gateway validating
hyperparameters, the release gate reading weight layouts) can use what is exported here.
Torch-bound modules are imported by name: :mod:`trainers.causal_lm`,
:mod:`trainers.classification`, :mod:`trainers.training`, :mod:`trainers.basemodel`. What the
site computes about a built-in trainer's release (:func:`expected_release`) is torch-free.
"""

from trainers.contract import JobConfig
from trainers.errors import ConfigError, DataError, TrainerError, TrainingFailed, WeightsError
from trainers.hparams import (
    CausalLMHyperparameters,
    ClassificationHyperparameters,
    LoRAHyperparameters,
    parse_hyperparameters,
)
from trainers.release import ExpectedRelease, expected_release
from trainers.runtime import Paths, RunContext
from trainers.weights import TensorLayout, read_header, tensor_layout, verify_layout

__all__ = [
    "CausalLMHyperparameters",
    "ClassificationHyperparameters",
    "ConfigError",
    "DataError",
    "ExpectedRelease",
    "JobConfig",
    "LoRAHyperparameters",
    "Paths",
    "RunContext",
    "TensorLayout",
    "TrainerError",
    "TrainingFailed",
    "WeightsError",
    "expected_release",
    "parse_hyperparameters",
    "read_header",
    "tensor_layout",
    "verify_layout",
]
