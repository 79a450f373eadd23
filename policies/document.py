"""Data owners' policy documents: parsing YAML into a frozen :class:`PolicyDocument`.

A data owner writes one policy per dataset: who may use it and for what, which base models and
trainers, resource caps, when the policy expires, how jobs are approved, what may be released
(:class:`policies.release.ReleaseRules`) and who may read a job's logs. This is the edge where
the owner's text becomes a domain value, so every error names the LINE and the FIELD at fault:
the hardened loader (:mod:`policies._loader`, shared with job specs) reads the YAML into plain
values with a path -> line map, and the strict schema (:mod:`policies._policy_schema`) validates
them; its error locations are looked up in that map. The loader refuses what YAML would
otherwise accept silently and a reader would misread: duplicate keys (the last one would win),
anchors and aliases (shared nodes, and the "billion laughs" expansion), merge keys, and tags
other than YAML's plain types.

The canonical hash (:meth:`PolicyDocument.digest`) is the SHA-256 of the canonical JSON of the
parsed document (:mod:`policies._policy_canonical`), so comments and layout do not change it;
:func:`diff_policies` says, field by field, what one version changes from another. Storing and
listing versions is the gateway's.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from policies._loader import Path, field_name, line_for, load_document
from policies._policy_canonical import canonical_bytes, canonicalize, diff_canonical
from policies._policy_schema import MESSAGES, PRINCIPAL_RE, PolicySchema, parse_instant
from policies.channels import ChannelRules
from policies.errors import PolicyDocumentError
from policies.release import (
    ArtifactKind,
    CheckName,
    DPRules,
    MemorizationRules,
    ReleaseRules,
)

__all__ = [
    "DTYPES",
    "MAX_POLICY_BYTES",
    "PRINCIPAL_RE",
    "SCHEMA",
    "AccessRules",
    "ApprovalMode",
    "ApprovalRule",
    "CustomCode",
    "LogVisibility",
    "PolicyDocument",
    "PolicyRef",
    "ResourceCaps",
    "TrainerRules",
    "diff_policies",
    "parse_policy",
    "policy_digest",
    "policy_from_mapping",
]

SCHEMA = "sealroom.policy/v1"
MAX_POLICY_BYTES = 64 * 1024

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
        return canonical_bytes(self.canonical)

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: the content's identity, independent of layout."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def ref(self) -> PolicyRef:
        return PolicyRef(dataset=self.dataset, version=self.version, digest=self.digest())

    def is_expired(self, *, now: dt.datetime) -> bool:
        return now >= self.expires


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
        model = PolicySchema.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            message = MESSAGES.get(err["type"], err["msg"])
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            problems.append(f"{where(loc)}{field_name(loc)}: {message}")
        raise PolicyDocumentError("policy is invalid: " + "; ".join(problems)) from None
    return _build(model, where=where(("release",)), version=version)


def _build(model: PolicySchema, *, where: str, version: int) -> PolicyDocument:
    """The domain value; ``where`` is the release section's "line N: " prefix (or "")."""
    canonical = canonicalize(model)
    digest = hashlib.sha256(canonical_bytes(canonical)).hexdigest()
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
        expires=parse_instant(model.expires),
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


def policy_digest(text: str | bytes) -> str:
    """The canonical hash of a policy text (parses it; raises :class:`PolicyDocumentError`)."""
    return parse_policy(text).digest()


def diff_policies(old_text: str | bytes, new_text: str | bytes) -> str:
    """What ``new_text`` changes from ``old_text``, field by field; "" when nothing in effect.

    Lines read ``~ field: old -> new`` for a changed value, ``+ field: value`` and
    ``- field: value`` for an added or removed set member or field. Comments and layout are not
    differences. Raises :class:`PolicyDocumentError` if either text does not validate.
    """
    return diff_canonical(parse_policy(old_text).canonical, parse_policy(new_text).canonical)
