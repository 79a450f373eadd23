"""The release manifest: the signed record, its one canonical encoding, and its validation.

:class:`Manifest` binds every artifact's SHA-256 and size to the job, spec, bundle, image,
dataset and policy versions, approvals, each dataset's gate run, the audit-log position, the
site and the time. :meth:`Manifest.to_bytes` is canonical JSON (sorted keys, no whitespace,
ASCII); :meth:`Manifest.from_bytes` accepts only that encoding of a well-formed manifest. Pure:
no files, no keys; signing is :mod:`enclave.provenance._sign`, verifying
:mod:`enclave.provenance.verify`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from policies.errors import IntegrityError
from policies.release import Figure

SCHEMA = "sealroom.release/v1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SITE_CERT = "site.pem"
SIGNING_CONTEXT = b"sealroom.release.manifest.v1\x00"
"""Prefixed to the manifest before signing, so a site signature cannot be replayed as another
kind of signed message."""
SIGNED_FILES = frozenset({MANIFEST, SIGNATURE, SITE_CERT})
ARTIFACT_PATH_RE = re.compile(
    r"^(weights/[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.safetensors|weights/(adapter_)?config\.json"
    r"|metrics\.json)$"
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TEXT_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?$")
"""Names and identifiers in the manifest: printable ASCII, 1-256 characters, no outer spaces."""
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_RELEASE_FILES = 256
CLOCK_SKEW = dt.timedelta(minutes=5)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class ArtifactDigest:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CheckRecord:
    """A check's name, whether it passed, and its figures (no data)."""

    name: str
    passed: bool
    figures: Mapping[str, Figure] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", MappingProxyType(dict(self.figures)))


@dataclass(frozen=True)
class GateRecord:
    """One dataset's gate run: the rules it applied (their version) and each check's result."""

    dataset: str
    rules_version: str
    checks: tuple[CheckRecord, ...]


@dataclass(frozen=True)
class DatasetVersion:
    version: int
    root_hash: str


@dataclass(frozen=True)
class AuditPosition:
    """Where the release sits in the audit log: the root hash (hex) of the log as it stood
    when the job was dispatched, and optionally the sequence number of its last event.

    Releases made by the site sign the root only: a count of records would tell the model team
    how many events (files an earlier job opened) the log gained, a channel out of the site;
    a hash tells nothing to whoever does not hold the log.
    """

    seq: int | None = None
    checkpoint_root: str | None = None


@dataclass(frozen=True)
class ReleaseContext:
    """What the release is bound to, supplied by the site agent from the job's run order.

    ``approvals`` names the approving owners (empty for automatic approval);
    ``approval_binding`` is the hash the approval bound (spec, bundle, datasets, policies).
    """

    job_id: str
    spec_sha256: str
    bundle_sha256: str | None
    image_id: str
    datasets: Mapping[str, DatasetVersion]
    policy_versions: Mapping[str, int]
    approval_binding: str
    approvals: tuple[str, ...]
    audit: AuditPosition
    channels: Mapping[str, float] = field(default_factory=dict)
    """The leakage account the run was held to: bits per channel the model team observes,
    and ``budget_bits`` (:mod:`policies.channels`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", MappingProxyType(dict(self.datasets)))
        object.__setattr__(self, "policy_versions", MappingProxyType(dict(self.policy_versions)))
        object.__setattr__(self, "channels", MappingProxyType(dict(self.channels)))


@dataclass(frozen=True)
class Manifest:
    """The signed record. :meth:`to_bytes` is its one canonical encoding."""

    context: ReleaseContext
    site: str
    issued_at: dt.datetime
    gates: tuple[GateRecord, ...]
    artifacts: tuple[ArtifactDigest, ...]
    schema: str = SCHEMA

    def to_json_obj(self) -> dict[str, Any]:
        c = self.context
        return {
            "schema": self.schema,
            "job_id": c.job_id,
            "spec_sha256": c.spec_sha256,
            "bundle_sha256": c.bundle_sha256,
            "image_id": c.image_id,
            "datasets": {
                n: {"version": d.version, "root_hash": d.root_hash} for n, d in c.datasets.items()
            },
            "policy_versions": dict(c.policy_versions),
            "approval_binding": c.approval_binding,
            "approvals": list(c.approvals),
            "audit": {"seq": c.audit.seq, "checkpoint_root": c.audit.checkpoint_root},
            "channels": dict(c.channels),
            "site": self.site,
            "issued_at": self.issued_at.strftime(TIME_FORMAT),
            "gates": [
                {
                    "dataset": g.dataset,
                    "rules_version": g.rules_version,
                    "checks": [
                        {"name": k.name, "passed": k.passed, "figures": dict(k.figures)}
                        for k in g.checks
                    ],
                }
                for g in self.gates
            ],
            "artifacts": [
                {"path": a.path, "sha256": a.sha256, "size": a.size} for a in self.artifacts
            ],
        }

    def to_bytes(self) -> bytes:
        """The canonical encoding; raises ValueError when a field is malformed."""
        _validate(self)
        return json.dumps(
            self.to_json_obj(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        ).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest; raises :class:`IntegrityError` unless it is well formed and in its
        canonical encoding."""
        try:
            raw = json.loads(data.decode("ascii"), parse_constant=_refuse_constant)
            manifest = _from_obj(raw)
            canonical = manifest.to_bytes()
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise IntegrityError(f"{MANIFEST} is malformed: {e}") from None
        if canonical != data:
            raise IntegrityError(f"{MANIFEST} is not in canonical form")
        return manifest


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _obj(obj: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise ValueError(f"{what} must be an object with exactly the keys {sorted(keys)}")
    return obj


def _list(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise ValueError(f"{what} must be a list")
    return x


def _map(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ValueError(f"{what} must be an object")
    return x


def _from_obj(raw: Any) -> Manifest:
    top = _obj(
        raw,
        {
            "schema",
            "job_id",
            "spec_sha256",
            "bundle_sha256",
            "image_id",
            "datasets",
            "policy_versions",
            "approval_binding",
            "approvals",
            "audit",
            "channels",
            "site",
            "issued_at",
            "gates",
            "artifacts",
        },
        "manifest",
    )
    audit = _obj(top["audit"], {"seq", "checkpoint_root"}, "audit")
    if not isinstance(top["issued_at"], str):
        raise ValueError("issued_at must be a string")
    issued = dt.datetime.strptime(top["issued_at"], TIME_FORMAT).replace(tzinfo=dt.UTC)
    gates = []
    for g in _list(top["gates"], "gates"):
        g = _obj(g, {"dataset", "rules_version", "checks"}, "gate")
        checks = []
        for k in _list(g["checks"], "checks"):
            k = _obj(k, {"name", "passed", "figures"}, "check")
            figures = _map(k["figures"], "figures")
            checks.append(CheckRecord(name=k["name"], passed=k["passed"], figures=figures))
        gates.append(
            GateRecord(dataset=g["dataset"], rules_version=g["rules_version"], checks=tuple(checks))
        )
    artifacts = []
    for a in _list(top["artifacts"], "artifacts"):
        a = _obj(a, {"path", "sha256", "size"}, "artifact")
        artifacts.append(ArtifactDigest(path=a["path"], sha256=a["sha256"], size=a["size"]))
    datasets = {}
    for name, d in _map(top["datasets"], "datasets").items():
        d = _obj(d, {"version", "root_hash"}, "dataset")
        datasets[name] = DatasetVersion(version=d["version"], root_hash=d["root_hash"])
    manifest = Manifest(
        schema=top["schema"],
        context=ReleaseContext(
            job_id=top["job_id"],
            spec_sha256=top["spec_sha256"],
            bundle_sha256=top["bundle_sha256"],
            image_id=top["image_id"],
            datasets=datasets,
            policy_versions=_map(top["policy_versions"], "policy_versions"),
            approval_binding=top["approval_binding"],
            approvals=tuple(_list(top["approvals"], "approvals")),
            audit=AuditPosition(seq=audit["seq"], checkpoint_root=audit["checkpoint_root"]),
            channels=_map(top["channels"], "channels"),
        ),
        site=top["site"],
        issued_at=issued,
        gates=tuple(gates),
        artifacts=tuple(artifacts),
    )
    _validate(manifest)
    return manifest


def _text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not TEXT_RE.match(value):
        raise ValueError(f"{what} must be 1-256 printable ASCII characters")


def _int(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")


def _sha(value: Any, what: str) -> None:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ValueError(f"{what} must be 64 lowercase hex digits")


def _validate(m: Manifest) -> None:
    """Raise ValueError unless every field has its declared type and form."""
    c = m.context
    if m.schema != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}")
    for value, what in (
        (c.job_id, "job_id"),
        (c.image_id, "image_id"),
        (c.approval_binding, "approval_binding"),
        (m.site, "site"),
    ):
        _text(value, what)
    _sha(c.spec_sha256, "spec_sha256")
    if c.bundle_sha256 is not None:
        _sha(c.bundle_sha256, "bundle_sha256")
    if not c.datasets:
        raise ValueError("datasets must name at least one dataset")
    for name, d in c.datasets.items():
        _text(name, "dataset name")
        if not isinstance(d, DatasetVersion):
            raise ValueError("dataset versions must be DatasetVersion values")
        _int(d.version, "dataset version")
        _text(d.root_hash, "dataset root hash")
    if set(c.policy_versions) != set(c.datasets):
        raise ValueError("policy_versions must name exactly the released datasets")
    for v in c.policy_versions.values():
        _int(v, "policy version")
    for a in c.approvals:
        _text(a, "approval")
    if c.audit.seq is not None:
        _int(c.audit.seq, "audit.seq")
    if c.audit.seq is None and c.audit.checkpoint_root is None:
        raise ValueError("audit must give a root hash or a sequence number")
    for name, bits in c.channels.items():
        _text(name, "channel name")
        if isinstance(bits, bool) or not isinstance(bits, int | float) or not 0 <= bits < 1e12:
            raise ValueError("channel bits must be non-negative finite numbers")
    if c.audit.checkpoint_root is not None:
        _sha(c.audit.checkpoint_root, "audit.checkpoint_root")
    if m.issued_at.tzinfo is None:
        raise ValueError("issued_at must be timezone-aware")
    if sorted(g.dataset for g in m.gates) != sorted(c.datasets):
        raise ValueError("gates must hold one gate run for each dataset")
    for g in m.gates:
        _text(g.rules_version, "rules_version")
        names = []
        for k in g.checks:
            _text(k.name, "check name")
            names.append(k.name)
            if not isinstance(k.passed, bool):
                raise ValueError("check passed must be a boolean")
            for key, fig in k.figures.items():
                _text(key, "figure name")
                if not isinstance(fig, int | float | str | bool):
                    raise ValueError("figures must be numbers, strings or booleans")
                if isinstance(fig, float) and not math.isfinite(fig):
                    raise ValueError("figures must be finite")
        if len(set(names)) != len(names):
            raise ValueError("a check is recorded twice in one gate run")
    paths = []
    for art in m.artifacts:
        if not isinstance(art.path, str) or not ARTIFACT_PATH_RE.match(art.path):
            raise ValueError("artifact path is not a release artifact's path")
        _sha(art.sha256, "artifact sha256")
        _int(art.size, "artifact size")
        paths.append(art.path)
    if len(set(paths)) != len(paths):
        raise ValueError("an artifact is listed twice")
