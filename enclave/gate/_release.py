"""What a release is and what the gate decides: the values :func:`run_gate` takes and returns.

What a release is comes from the site, never from the job: a :class:`ReleaseForm` (computed
from the approved hyperparameters by the trainers' trusted functions) says which tensors the
weights must hold, under which name they are released, and carries the config file the site
writes beside them (``weights/adapter_config.json`` for a LoRA adapter, ``weights/config.json``
for a classifier), so that ``weights/`` loads as it is in ``peft`` or ``transformers``. The
site's inputs to the probe and the privacy check (:class:`MemorizationInputs`,
:class:`DPInputs`) and the decision itself (:class:`GateResult`, with the
:class:`ReleasedArtifact` files it wrote) are here too.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enclave.gate import _memorization
from policies.errors import InvalidInput, ReleaseRefused
from policies.release import (
    CheckResult,
    TensorSpec,
)

RELEASED_WEIGHTS = "weights/model.safetensors"
RELEASED_ADAPTER = "weights/adapter_model.safetensors"
RELEASED_METRICS = "metrics.json"
MAX_CONFIG_BYTES = 1024 * 1024


class ReleaseKind(enum.StrEnum):
    """What a release's weights are, which decides their released name, the config file the
    site adds and how the memorization probe loads them."""

    FULL = "full"
    """All of the base model's tensors: ``weights/model.safetensors``."""
    LORA_ADAPTER = "lora-adapter"
    """A PEFT LoRA adapter: ``weights/adapter_model.safetensors`` + ``adapter_config.json``."""
    CLASSIFIER = "classifier"
    """A sequence classifier on the base's backbone: ``weights/model.safetensors`` +
    ``config.json``."""
    GRAPH_PARAMETERS = "graph-parameters"
    """The trainable parameters of a team's graph trained by the site's DP-SGD trainer
    (``custom_code: private``): ``weights/model.safetensors``, no config. No library loads
    them as a model, so the memorization probe cannot run; the policy's DP budget bounds
    them instead (:func:`_dp_bounds_memorization`)."""


_WEIGHTS_PATHS = {
    ReleaseKind.FULL: RELEASED_WEIGHTS,
    ReleaseKind.LORA_ADAPTER: RELEASED_ADAPTER,
    ReleaseKind.CLASSIFIER: RELEASED_WEIGHTS,
    ReleaseKind.GRAPH_PARAMETERS: RELEASED_WEIGHTS,
}
_CONFIG_PATHS = {
    ReleaseKind.LORA_ADAPTER: "weights/adapter_config.json",
    ReleaseKind.CLASSIFIER: "weights/config.json",
}


@dataclass(frozen=True)
class ReleaseForm:
    """The site's declaration of a release: the layout the weights must have and, for the
    kinds that need one, the config file (JSON, written by the site) released beside them.

    Raises :class:`InvalidInput` for a config on a full release, a missing config, or one that
    is not a JSON object."""

    kind: ReleaseKind
    layout: Mapping[str, TensorSpec | tuple[str, Iterable[int]]]
    config: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _CONFIG_PATHS:
            if self.config is not None:
                raise InvalidInput(f"a {self.kind} release carries no config of the site's")
            return
        if self.config is None:
            raise InvalidInput(f"a {self.kind} release needs the site's config file")
        if len(self.config) > MAX_CONFIG_BYTES:
            raise InvalidInput(f"the {self.kind} config exceeds {MAX_CONFIG_BYTES} bytes")
        try:
            parsed = json.loads(self.config)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInput(f"the {self.kind} config is not JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidInput(f"the {self.kind} config is not a JSON object")

    @property
    def weights_path(self) -> str:
        return _WEIGHTS_PATHS[self.kind]

    @property
    def config_path(self) -> str | None:
        return _CONFIG_PATHS.get(self.kind)


@dataclass(frozen=True)
class ReleasedArtifact:
    """One file the gate wrote for release, relative to the release directory."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class GateResult:
    """The gate's decision. ``artifacts`` is empty and ``release_dir`` None unless ``passed``."""

    passed: bool
    checks: tuple[CheckResult, ...]
    artifacts: tuple[ReleasedArtifact, ...]
    release_dir: Path | None
    rules_version: str

    def require_passed(self) -> None:
        """Raise :class:`ReleaseRefused` naming each refused check and its reasons."""
        if self.passed:
            return
        failed = [c for c in self.checks if not c.passed]
        text = "; ".join(f"{c.name}: {', '.join(c.reasons)}" for c in failed)
        raise ReleaseRefused(f"release refused by the gate: {text or 'no checks ran'}")


@dataclass(frozen=True)
class MemorizationInputs:
    """What the site supplies for the memorization probe: the trusted base model directory,
    the tokenizer and the protected texts (staged data, read once)."""

    model_dir: Path
    tokenizer: _memorization.Tokenizer
    texts: Iterable[str]


@dataclass(frozen=True)
class DPInputs:
    """The privacy-accounting hook. ``spent`` is what earlier releases on the same data used.
    ``epsilon`` is the site's accountant's ε for this job (:mod:`enclave._dp`); None means the
    site set no DP for it, which is charged as +inf. The job's own ``epsilon`` metric never
    counts, and is released only as the site's value."""

    spent: float
    epsilon: float | None = None
