"""Data owners' policy documents: parsing YAML into a frozen :class:`PolicyDocument`.

A data owner writes one policy per dataset: who may use it and for what, which base models and
trainers, resource caps, when the policy expires, how jobs are approved, what may be released
(:class:`policies.release.ReleaseRules`) and who may read a job's logs. This is the edge where
the owner's text becomes a domain value, so every error names the LINE and the FIELD at fault:
the hardened loader (:mod:`policies._loader`, shared with job specs) reads the YAML into plain
values with a path -> line map, and a strict schema validates them; its error locations are
looked up in that map. The loader refuses what YAML would otherwise accept silently and a
reader would misread: duplicate keys (the last one would win), anchors and aliases (shared
nodes, and the "billion laughs" expansion), merge keys, and tags other than YAML's plain types.

The canonical hash (:meth:`PolicyDocument.digest`) is the SHA-256 of the canonical JSON of the
parsed document, so comments and layout do not change it; :func:`diff_policies` says, field by
field, what one version changes from another. Storing and listing versions is the gateway's.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies._loader import Path, field_name, line_for, load_document
from policies.channels import MAX_PROGRESS_POINTS, ChannelRules
from policies.errors import PolicyDocumentError
from policies.release import (
    MAX_PASSAGE_TOKENS,
    ArtifactKind,
    CheckName,
    DPRules,
    MemorizationRules,
    ReleaseRules,
)
from policies.spec import NAME_RE

SCHEMA = "sealroom.policy/v1"
MAX_POLICY_BYTES = 64 * 1024
PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
"""Team and principal names as they appear in client certificates (subject O and CN)."""

DTYPES: Mapping[str, str] = {"bfloat16": "BF16", "float16": "F16"}
"""Release dtype as the owner writes it -> safetensors dtype name used by the release gate."""


class ApprovalMode(enum.StrEnum):
    AUTOMATIC = "automatic"
    """Jobs that satisfy the policy are approved without a person."""
    MANUAL = "manual"
    """One of the dataset's owners approves each job."""
    QUORUM = "quorum"
    """``quorum`` distinct owners approve each job."""


class LogVisibility(enum.StrEnum):
    """Who may read a job's stdout and stderr (they stay in the site and can carry data)."""

    DATA_OWNER = "data-owner"
    MODEL_TEAM = "model-team"


@dataclass(frozen=True)
class PolicyRef:
    """Which version of which dataset's policy a decision or approval used."""

    dataset: str
    version: int
    digest: str

    def __str__(self) -> str:
        return f"{self.dataset} policy v{self.version} ({self.digest[:12]})"


@dataclass(frozen=True)
class AccessRules:
    """Who may use the dataset and for what. ``purposes`` None: any purpose."""

    teams: frozenset[str]
    principals: frozenset[str]
    purposes: frozenset[str] | None


class CustomCode(enum.StrEnum):
    """How a team's own code may touch the dataset (``trainers.custom_code``)."""

    FORBIDDEN = "false"
    """Built-in trainers only."""
    REVIEWED = "reviewed"
    """The team's own Python (``trainer: custom``) may run. Its weights can carry the data, up
    to the capacity the owner's review report states; so approval is manual and the release
    waits for the owner's review. The legacy ``custom_code: true`` means this."""
    PRIVATE = "private"
    """The team's model and loss only as a ``torch.export`` graph (``trainer: private``), which
    the site's own DP-SGD trainer runs: the release is (epsilon, delta)-DP whatever it computes."""


@dataclass(frozen=True)
class TrainerRules:
    builtin: frozenset[str]
    custom_code: CustomCode

    @property
    def allows_python(self) -> bool:
        """The team's own Python (``trainer: custom``) may run."""
        return self.custom_code is CustomCode.REVIEWED

    @property
    def allows_graph(self) -> bool:
        """A team's computation graph may run under the site's DP-SGD trainer. Reviewed code
        allows it too: a graph under DP-SGD bounds strictly more than arbitrary code."""
        return self.custom_code in (CustomCode.PRIVATE, CustomCode.REVIEWED)


@dataclass(frozen=True)
class ResourceCaps:
    """The most one job on this dataset may ask for."""

    gpus: int
    cpus: float
    memory_mb: int
    timeout_s: int


@dataclass(frozen=True)
class ApprovalRule:
    """``quorum`` is 0 for automatic approval, 1 for manual, N for a quorum of N owners."""

    mode: ApprovalMode
    quorum: int
    valid_for: dt.timedelta


@dataclass(frozen=True)
class PolicyDocument:
    """A validated policy for one dataset. Build it with :func:`parse_policy`.

    ``version`` is the number the gateway's store gave this text (0 before it is stored); the
    content's identity is :meth:`digest`.
    """

    dataset: str
    description: str
    expires: dt.datetime
    access: AccessRules
    base_models: frozenset[str]
    trainers: TrainerRules
    resources: ResourceCaps
    approval: ApprovalRule
    release: ReleaseRules
    logs: LogVisibility
    channels: ChannelRules
    canonical: Mapping[str, Any]
    """The canonical form of the parsed document: what the digest and the diff are made of."""
    version: int = 0

    def canonical_json(self) -> bytes:
        return _canonical_bytes(self.canonical)

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: the content's identity, independent of layout."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def ref(self) -> PolicyRef:
        return PolicyRef(dataset=self.dataset, version=self.version, digest=self.digest())

    def is_expired(self, *, now: dt.datetime) -> bool:
        return now >= self.expires


# --- schema (pydantic, strict; only at this edge) ---------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Access(_Strict):
    teams: list[str] = Field(default_factory=list, max_length=256)
    principals: list[str] = Field(default_factory=list, max_length=256)
    purposes: list[str] | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("teams", "principals")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not PRINCIPAL_RE.match(name):
                raise ValueError(f"{name!r} is not a team or principal name")
        return v

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, v: list[str] | None) -> list[str] | None:
        for purpose in v or ():
            if not purpose.strip() or len(purpose) > 500:
                raise ValueError("a purpose is a non-empty text of at most 500 characters")
        return v


class _Trainers(_Strict):
    builtin: list[str] = Field(default_factory=list, max_length=64)
    # ``true`` is kept as written (not rewritten to "reviewed") so the digest of a policy stored
    # before the modes existed does not change, and neither do approvals bound to it.
    custom_code: bool | Literal["reviewed", "private"] = False

    @field_validator("builtin")
    @classmethod
    def _builtin(cls, v: list[str]) -> list[str]:
        for name in v:
            if name in ("custom", "private"):
                raise ValueError(
                    f"{name!r} is not a built-in trainer: use custom_code: reviewed or private"
                )
            if not NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a trainer name")
        return v


class _Resources(_Strict):
    max_gpus: int = Field(ge=0, le=64)
    max_cpus: float = Field(gt=0, le=1024)
    max_memory_mb: int = Field(ge=256, le=16 * 1024 * 1024)
    max_timeout_s: int = Field(ge=10, le=30 * 24 * 3600)


class _Approval(_Strict):
    mode: Literal["automatic", "manual", "quorum"]
    quorum: int | None = Field(default=None, ge=2, le=64)
    valid_for_hours: int = Field(default=168, ge=1, le=24 * 366)

    @model_validator(mode="after")
    def _quorum(self) -> _Approval:
        if self.mode == "quorum" and self.quorum is None:
            raise ValueError("mode 'quorum' needs 'quorum: N' (N >= 2)")
        if self.mode != "quorum" and self.quorum is not None:
            raise ValueError(f"'quorum' only goes with mode 'quorum', not {self.mode!r}")
        return self


class _Metrics(_Strict):
    allowed: list[str] = Field(max_length=1024)
    significant_digits: int = Field(default=4, ge=1, le=9)
    max_count: int = Field(default=32, ge=0, le=1024)
    max_abs: float = Field(default=1e12, gt=0, allow_inf_nan=False)
    min_abs: float = Field(default=1e-6, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _range(self) -> _Metrics:
        if self.min_abs >= self.max_abs:
            raise ValueError("min_abs must be below max_abs")
        return self


class _Memorization(_Strict):
    samples: int = Field(ge=1, le=100_000)
    prefix_tokens: int = Field(ge=1, le=4096)
    suffix_tokens: int = Field(ge=1, le=4096)
    threshold: float = Field(ge=0, lt=1)
    near_verbatim_ratio: float = Field(default=0.1, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    passage_tokens: int = Field(default=50, ge=2, le=MAX_PASSAGE_TOKENS)
    """The whole-data scan refuses a release that recites any passage this long."""


class _DP(_Strict):
    epsilon_per_job: float = Field(gt=0, allow_inf_nan=False)
    epsilon_budget: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _budgets(self) -> _DP:
        if self.epsilon_per_job > self.epsilon_budget:
            raise ValueError("epsilon_per_job exceeds epsilon_budget: no job could run")
        return self


class _Release(_Strict):
    artifacts: list[Literal["weights", "metrics"]] = Field(min_length=1)
    adapter_only: bool = False
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    scrub_bits: int = Field(default=2, ge=0, le=4)
    metrics: _Metrics
    memorization: _Memorization | None = None
    differential_privacy: _DP | None = None


class _Channels(_Strict):
    """What the model team observes of a job (see :mod:`policies.channels`)."""

    job_budget_bits: float = Field(default=512, gt=0, le=1e9, allow_inf_nan=False)
    dataset_budget_bits: float = Field(default=262_144, gt=0, le=1e12, allow_inf_nan=False)
    progress_points: int = Field(default=10, ge=0, le=MAX_PROGRESS_POINTS)
    loss_digits: int = Field(default=2, ge=1, le=4)
    time_quantum_s: float = Field(default=30, ge=1, le=3600, allow_inf_nan=False)
    gate_timeout_s: float = Field(default=1800, ge=10, le=24 * 3600, allow_inf_nan=False)


class _Logs(_Strict):
    visible_to: Literal["data-owner", "model-team"] = "data-owner"


class _Policy(_Strict):
    schema_: Literal["sealroom.policy/v1"] = Field(alias="schema")
    dataset: str
    description: str = Field(default="", max_length=2000)
    expires: str
    access: _Access
    base_models: list[str] = Field(max_length=256)
    trainers: _Trainers
    resources: _Resources
    approval: _Approval
    release: _Release
    logs: _Logs = Field(default_factory=_Logs)
    channels: _Channels = Field(default_factory=_Channels)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a dataset name: lowercase letters, digits, '.', '_', '-'")
        return v

    @field_validator("base_models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a model name")
        return v

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, v: object) -> str:
        if not isinstance(v, str):
            raise ValueError(_DATE_HELP)
        _parse_instant(v)  # raises ValueError naming the problem
        return v


_DATE_HELP = "must be a date (YYYY-MM-DD) or an ISO 8601 timestamp with a time zone"
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _parse_instant(text: str) -> dt.datetime:
    """A date means "expires at 00:00 UTC that day"; a timestamp must carry its time zone."""
    text = text.strip()
    try:
        if _DATE_RE.match(text):
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        instant = dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a valid date ({e}); {_DATE_HELP}") from None
    if instant.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; {_DATE_HELP}")
    return instant.astimezone(dt.UTC)


_MESSAGES = {
    "missing": "missing field (required)",
    "extra_forbidden": "unknown field",
}


# --- parsing ------------------------------------------------------------------------------------


def parse_policy(text: str | bytes, *, version: int = 0) -> PolicyDocument:
    """Parse and validate a policy document.

    ``version`` is the store's number for this text (0: not stored). Raises
    :class:`PolicyDocumentError` whose message gives ``line N: field.path: problem`` for every
    problem found.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise PolicyDocumentError(f"policy version must be a non-negative integer, not {version!r}")
    raw, lines = load_document(
        text,
        what="policy",
        max_bytes=MAX_POLICY_BYTES,
        error=PolicyDocumentError,
        exponent_floats=True,  # owners mean 1e-5 as a number
        dates_as_text=True,  # the schema parses ``expires`` and names a bad one
    )
    return _validate(raw, lines=lines, version=version)


def policy_from_mapping(raw: object, *, version: int = 0) -> PolicyDocument:
    """Validate an already-decoded policy (e.g. from JSON); errors name the field, not a line.

    Raises :class:`PolicyDocumentError`.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise PolicyDocumentError(f"policy version must be a non-negative integer, not {version!r}")
    if not isinstance(raw, Mapping):
        raise PolicyDocumentError("(document): the policy must be a mapping of fields")
    return _validate(dict(raw), lines=None, version=version)


def _validate(
    raw: dict[str, Any], *, lines: Mapping[Path, int] | None, version: int
) -> PolicyDocument:
    def where(loc: Path) -> str:
        return "" if lines is None else f"line {line_for(lines, loc)}: "

    try:
        model = _Policy.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            message = _MESSAGES.get(err["type"], err["msg"])
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            problems.append(f"{where(loc)}{field_name(loc)}: {message}")
        raise PolicyDocumentError("policy is invalid: " + "; ".join(problems)) from None
    return _build(model, where=where(("release",)), version=version)


def _build(model: _Policy, *, where: str, version: int) -> PolicyDocument:
    """The domain value; ``where`` is the release section's "line N: " prefix (or "")."""
    canonical = _canonicalize(model)
    digest = hashlib.sha256(_canonical_bytes(canonical)).hexdigest()
    rel = model.release
    checks = {CheckName.ARTIFACTS, CheckName.WEIGHTS, CheckName.METRICS}
    memorization = dp = None
    if rel.memorization is not None:
        checks.add(CheckName.MEMORIZATION)
        m = rel.memorization
        memorization = MemorizationRules(
            samples=m.samples,
            prefix_tokens=m.prefix_tokens,
            suffix_tokens=m.suffix_tokens,
            max_rate=m.threshold,
            near_verbatim_ratio=m.near_verbatim_ratio,
            seed=m.seed,
            passage_tokens=m.passage_tokens,
        )
    if rel.differential_privacy is not None:
        checks.add(CheckName.DP)
        d = rel.differential_privacy
        dp = DPRules(
            max_epsilon_per_job=d.epsilon_per_job, epsilon_budget=d.epsilon_budget, delta=d.delta
        )
    try:
        release = ReleaseRules(
            # The release gate records this with its results: the policy content it applied.
            version=f"{model.dataset}:{digest}",
            checks=frozenset(checks),
            allowed_artifacts=frozenset(ArtifactKind(a) for a in rel.artifacts),
            adapter_only=rel.adapter_only,
            allowed_metrics=frozenset(rel.metrics.allowed),
            max_metrics=rel.metrics.max_count,
            metric_significant_digits=rel.metrics.significant_digits,
            max_abs_metric=rel.metrics.max_abs,
            min_abs_metric=rel.metrics.min_abs,
            release_dtype=DTYPES[rel.dtype],
            scrub_bits=rel.scrub_bits,
            memorization=memorization,
            dp=dp,
        )
    except PolicyDocumentError as e:
        raise PolicyDocumentError(f"policy is invalid: {where}release: {e}") from None
    approval = model.approval
    quorum = {"automatic": 0, "manual": 1}.get(approval.mode, approval.quorum or 0)
    return PolicyDocument(
        dataset=model.dataset,
        description=model.description,
        expires=_parse_instant(model.expires),
        access=AccessRules(
            teams=frozenset(model.access.teams),
            principals=frozenset(model.access.principals),
            purposes=None if model.access.purposes is None else frozenset(model.access.purposes),
        ),
        base_models=frozenset(model.base_models),
        trainers=TrainerRules(
            builtin=frozenset(model.trainers.builtin),
            custom_code=_custom_code(model.trainers.custom_code),
        ),
        resources=ResourceCaps(
            gpus=model.resources.max_gpus,
            cpus=model.resources.max_cpus,
            memory_mb=model.resources.max_memory_mb,
            timeout_s=model.resources.max_timeout_s,
        ),
        approval=ApprovalRule(
            mode=ApprovalMode(approval.mode),
            quorum=quorum,
            valid_for=dt.timedelta(hours=approval.valid_for_hours),
        ),
        release=release,
        logs=LogVisibility(model.logs.visible_to),
        channels=ChannelRules(**model.channels.model_dump()),
        canonical=canonical,
        version=version,
    )


def _custom_code(value: bool | str) -> CustomCode:
    """``true`` (before the modes existed) is ``reviewed``: it allowed arbitrary code, whose
    weights can carry the data, so it now gets what that mode asks (manual approval, review)."""
    if value is True:
        return CustomCode.REVIEWED
    if value is False:
        return CustomCode.FORBIDDEN
    return CustomCode(value)


# Lists whose order means nothing: canonically sorted and de-duplicated.
_SET_FIELDS: frozenset[Path] = frozenset(
    {
        ("access", "teams"),
        ("access", "principals"),
        ("access", "purposes"),
        ("base_models",),
        ("trainers", "builtin"),
        ("release", "artifacts"),
        ("release", "metrics", "allowed"),
    }
)


def _canonicalize(model: _Policy) -> Mapping[str, Any]:
    raw = model.model_dump(by_alias=True, mode="python")
    for path in _SET_FIELDS:
        holder: Any = raw
        for part in path[:-1]:
            holder = holder[part]
        if holder[path[-1]] is not None:
            holder[path[-1]] = sorted(set(holder[path[-1]]))
    raw["expires"] = _parse_instant(model.expires).isoformat()
    frozen: Mapping[str, Any] = _freeze(raw)
    return frozen


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _canonical_bytes(canonical: Mapping[str, Any]) -> bytes:
    return json.dumps(
        _thaw(canonical), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def policy_digest(text: str | bytes) -> str:
    """The canonical hash of a policy text (parses it; raises :class:`PolicyDocumentError`)."""
    return parse_policy(text).digest()


# --- diff ---------------------------------------------------------------------------------------


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key in sorted(value):
            yield from _leaves(value[key], f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _show(value: Any) -> str:
    return json.dumps(_thaw(value), sort_keys=True)


def diff_policies(old_text: str | bytes, new_text: str | bytes) -> str:
    """What ``new_text`` changes from ``old_text``, field by field; "" when nothing in effect.

    Lines read ``~ field: old -> new`` for a changed value, ``+ field: value`` and
    ``- field: value`` for an added or removed set member or field. Comments and layout are not
    differences. Raises :class:`PolicyDocumentError` if either text does not validate.
    """
    old = dict(_leaves(parse_policy(old_text).canonical))
    new = dict(_leaves(parse_policy(new_text).canonical))
    lines: list[str] = []
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            lines.append(f"- {path}: {_show(old[path])}")
        elif path not in old:
            lines.append(f"+ {path}: {_show(new[path])}")
        elif old[path] != new[path]:
            a, b = old[path], new[path]
            if isinstance(a, tuple) and isinstance(b, tuple):
                lines.extend(f"- {path}: {_show(x)}" for x in a if x not in b)
                lines.extend(f"+ {path}: {_show(x)}" for x in b if x not in a)
            else:
                lines.append(f"~ {path}: {_show(a)} -> {_show(b)}")
    return "\n".join(lines) + ("\n" if lines else "")
