"""Job specs: parsing untrusted spec documents into a frozen :class:`JobSpec`.

A model team writes a spec (YAML or JSON) naming the datasets, the base model, the trainer and
its hyperparameters, and the resources it wants. This is the edge where untrusted text becomes a
domain value, so it is the only place pydantic appears; every error names the field at fault,
and the line too when the spec is text: it is read by the same hardened loader as policies
(:mod:`policies._loader`), which refuses duplicate keys (a second ``purpose:`` does not
silently win), anchors, aliases, merge keys, tags, several documents and oversized text.

A spec cannot ask for anything that would weaken the container: privileged mode, host
namespaces, devices, capabilities, extra mounts, or environment variables outside the ``JOB_``
prefix (``LD_PRELOAD``, ``PYTHONPATH`` and friends change what code runs). Those are refused
before any container exists, with a message that says why.

The spec hash (:meth:`JobSpec.digest`) is the SHA-256 of the canonical JSON of the parsed
spec, so two spellings of the same spec bind the same approval.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies._loader import Path, line_for, load_document
from policies.errors import SpecError
from policies.federation import FEDERATED_TRAINERS, FederationModel, FederationPlan

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
"""Names of datasets, models and jobs: lowercase, short, safe as a path component."""

DATASET_REF_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,62})(@v(?P<version>[0-9]{1,9}))?$")
ENV_NAME_RE = re.compile(r"^JOB_[A-Z0-9_]{1,60}$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}:[A-Za-z_][A-Za-z0-9_]{0,127}$")

FORBIDDEN_FIELDS: Mapping[str, str] = {
    "privileged": "jobs cannot run privileged",
    "cap_add": "jobs cannot add capabilities",
    "capabilities": "jobs cannot add capabilities",
    "devices": "jobs cannot ask for host devices (GPUs come from resources.gpus)",
    "mounts": "jobs cannot ask for extra mounts",
    "volumes": "jobs cannot ask for extra mounts",
    "network": "jobs have no network",
    "network_mode": "jobs have no network",
    "pid_mode": "jobs cannot share host namespaces",
    "ipc_mode": "jobs cannot share host namespaces",
    "userns_mode": "jobs cannot share host namespaces",
    "uts_mode": "jobs cannot share host namespaces",
    "host_namespaces": "jobs cannot share host namespaces",
    "security_opt": "jobs cannot change the security profile",
    "user": "jobs run as the site's unprivileged user",
    "image": "the site pins the runtime image",
    "runtime": "the site chooses the container runtime",
}

MAX_SPEC_BYTES = 64 * 1024
MAX_GPUS = 8


class _Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    gpus: int = Field(default=0, ge=0, le=MAX_GPUS)
    cpus: float = Field(default=1.0, gt=0, le=64)
    memory_mb: int = Field(default=4096, ge=256, le=1024 * 1024)
    timeout_s: int = Field(default=3600, ge=10, le=7 * 24 * 3600)


Scalar = str | int | float | bool


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    datasets: list[str] = Field(min_length=1, max_length=16)
    base_model: str
    trainer: str
    entrypoint: str | None = None
    purpose: str = Field(default="", max_length=500)
    hyperparameters: dict[str, Scalar] = Field(default_factory=dict, max_length=64)
    resources: _Resources = Field(default_factory=_Resources)
    env: dict[str, str] = Field(default_factory=dict, max_length=32)
    federation: FederationModel | None = None

    @field_validator("name", "base_model")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-', at most 63")
        return v

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a built-in trainer's name or 'custom'")
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str]) -> list[str]:
        for ref in v:
            if not DATASET_REF_RE.match(ref):
                raise ValueError(f"{ref!r} is not a dataset name (optionally name@vN)")
        names = [ref.split("@")[0] for ref in v]
        if len(set(names)) != len(names):
            raise ValueError("names a dataset twice")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, v: str | None) -> str | None:
        if v is not None and not ENTRYPOINT_RE.match(v):
            raise ValueError("must be 'module:ClassName'")
        return v

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters(cls, v: dict[str, Scalar]) -> dict[str, Scalar]:
        for key, value in v.items():
            if not re.match(r"^[a-z][a-z0-9_]{0,63}$", key):
                raise ValueError(f"{key!r} is not a hyperparameter name")
            if isinstance(value, str) and len(value) > 256:
                raise ValueError(f"{key!r} is longer than 256 characters")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME_RE.match(key):
                raise ValueError(
                    f"{key!r} is not allowed: job environment names must start with JOB_ "
                    "(variables such as LD_PRELOAD or PYTHONPATH would change what runs)"
                )
            if len(value) > 4096 or "\x00" in value:
                raise ValueError(f"{key!r} has a value over 4096 characters or a NUL byte")
        return v


@dataclass(frozen=True)
class DatasetRef:
    """A dataset named by a spec; ``version`` is None for "the latest at submission"."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    cpus: float = 1.0
    memory_mb: int = 4096
    timeout_s: int = 3600


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec. Build it with :func:`parse_spec`."""

    name: str
    datasets: tuple[DatasetRef, ...]
    base_model: str
    trainer: str
    entrypoint: str | None = None
    purpose: str = ""
    hyperparameters: Mapping[str, Scalar] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    env: Mapping[str, str] = field(default_factory=dict)
    federation: FederationPlan | None = None
    """Set for a federated job (:mod:`policies.federation`): trained across sites in rounds."""

    @property
    def is_custom(self) -> bool:
        return self.trainer == "custom"

    @property
    def is_federated(self) -> bool:
        return self.federation is not None

    def to_dict(self) -> dict[str, Any]:
        out = self._base_dict()
        if self.federation is not None:  # absent otherwise: older specs keep their digests
            out["federation"] = self.federation.to_dict()
        return out

    def _base_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datasets": [str(d) for d in self.datasets],
            "base_model": self.base_model,
            "trainer": self.trainer,
            "entrypoint": self.entrypoint,
            "purpose": self.purpose,
            "hyperparameters": dict(sorted(self.hyperparameters.items())),
            "resources": {
                "gpus": self.resources.gpus,
                "cpus": self.resources.cpus,
                "memory_mb": self.resources.memory_mb,
                "timeout_s": self.resources.timeout_s,
            },
            "env": dict(sorted(self.env.items())),
        }

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: what an approval binds."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(spec)"


def parse_spec(text: str | bytes) -> JobSpec:
    """Parse a YAML or JSON job spec. Raises :class:`SpecError` naming the line and field."""
    raw, lines = load_document(text, what="job spec", max_bytes=MAX_SPEC_BYTES, error=SpecError)
    return _validate(raw, lines=lines)


def spec_from_mapping(raw: object) -> JobSpec:
    """Validate an already-decoded spec mapping (errors name the field, not a line).

    Raises :class:`SpecError`.
    """
    if not isinstance(raw, dict):
        raise SpecError("job spec must be a mapping of fields")
    return _validate(raw, lines=None)


def _validate(raw: dict[Any, Any], *, lines: Mapping[Path, int] | None) -> JobSpec:
    def where(*loc: int | str) -> str:
        return "" if lines is None else f"line {line_for(lines, loc)}: "

    for key in raw:
        reason = FORBIDDEN_FIELDS.get(str(key))
        if reason is not None:
            raise SpecError(f"{where(key)}job spec field {key!r} is not allowed: {reason}")
    resources = raw.get("resources")
    if isinstance(resources, dict):
        for key in resources:
            reason = FORBIDDEN_FIELDS.get(str(key))
            if reason is not None:
                raise SpecError(
                    f"{where('resources', key)}job spec field 'resources.{key}' is not allowed: "
                    f"{reason}"
                )
    try:
        model = _Spec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{where(*err['loc'])}{_field_path(err['loc'])}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise SpecError(f"job spec is invalid: {problems}") from None
    if model.trainer == "custom" and model.entrypoint is None:
        raise SpecError(
            f"job spec is invalid: {where('trainer')}entrypoint: required when trainer is 'custom'"
        )
    if model.trainer != "custom" and model.entrypoint is not None:
        raise SpecError(
            f"job spec is invalid: {where('entrypoint')}entrypoint: only allowed when trainer is "
            "'custom'"
        )
    federation = None
    if model.federation is not None:
        federation = _federation(model, where)
    refs = []
    for ref in model.datasets:
        m = DATASET_REF_RE.match(ref)
        assert m is not None  # checked by the validator
        version = m.group("version")
        refs.append(DatasetRef(m.group("name"), int(version) if version else None))
    return JobSpec(
        name=model.name,
        datasets=tuple(refs),
        base_model=model.base_model,
        trainer=model.trainer,
        entrypoint=model.entrypoint,
        purpose=model.purpose,
        hyperparameters=dict(model.hyperparameters),
        resources=Resources(**model.resources.model_dump()),
        env=dict(model.env),
        federation=federation,
    )


def _federation(model: _Spec, where: Callable[..., str]) -> FederationPlan:
    """The plan of a federated spec, checked against the rest of the spec."""
    assert model.federation is not None
    if model.trainer not in FEDERATED_TRAINERS:
        raise SpecError(
            f"job spec is invalid: {where('trainer')}trainer: a federated job runs a built-in "
            f"trainer ({', '.join(FEDERATED_TRAINERS)}), not {model.trainer!r}"
        )
    if len(model.datasets) < 2:
        raise SpecError(
            f"job spec is invalid: {where('datasets')}datasets: a federated job names datasets "
            "held at two or more sites"
        )
    if model.federation.min_sites > len(model.datasets):
        raise SpecError(
            f"job spec is invalid: {where('federation', 'min_sites')}federation.min_sites: "
            f"{model.federation.min_sites} sites cannot take part with {len(model.datasets)} "
            "datasets"
        )
    if "max_steps" in model.hyperparameters:
        raise SpecError(
            f"job spec is invalid: {where('hyperparameters', 'max_steps')}hyperparameters."
            "max_steps: a federated job's steps are federation.rounds times local_steps"
        )
    if model.trainer == "classification" and "labels" not in model.hyperparameters:
        # Each site would take the classes from its own data: heads of different shapes (and
        # the number of classes at each site, a fact of its data, would shape the update).
        raise SpecError(
            f"job spec is invalid: {where('hyperparameters')}hyperparameters.labels: a "
            "federated classifier names its labels (every site trains the same head)"
        )
    return FederationPlan.from_model(model.federation)
