"""Signed provenance for releases: a manifest anyone can verify offline with the CA certificate.

A release directory holds the artifacts the gate wrote and three files added here::

    manifest.json   canonical JSON (sorted keys, no whitespace, ASCII) binding every artifact's
                    SHA-256 and size to the job, spec, bundle, image, dataset versions, policy
                    versions, approvals, each dataset's gate run (rules version, checks and
                    figures), audit-log position, site and time
    manifest.sig    Ed25519 signature (64 raw bytes) over SIGNING_CONTEXT + manifest.json
    site.pem        the site's certificate: Ed25519 key, subject OU "site", issued by the
                    deployment CA
    weights/model.safetensors (weights/adapter_model.safetensors for a LoRA adapter), metrics.json,
    and for a LoRA adapter or a classifier the config the site wrote beside the weights
    (weights/adapter_config.json, weights/config.json): listed and hashed like the rest

:func:`sign_release` signs the directory of passed :class:`~enclave.gate.GateResult` runs (one
per dataset the job read) with the site key. :func:`verify_release` needs only the directory
and the CA certificate: the site certificate must chain to the CA, carry the ``site`` role and
have been valid when the release was signed; the signature must verify; every listed artifact
must match its hash and size, and no file may be missing or extra. It raises
:class:`SignatureError` for certificate and signature faults and :class:`IntegrityError` for
content faults, each with expected vs actual.

Certificate validity is checked at the manifest's signing time (and that time must not lie in
the future), so a release stays verifiable after its site certificate is renewed. Revocation
of a compromised site key is not handled here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from enclave.gate import GateResult
from policies.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidInput,
    ReleaseRefused,
    SignatureError,
)
from policies.identity import Role
from policies.release import MANDATORY_CHECKS, Figure

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
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


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
            "issued_at": self.issued_at.strftime(_TIME_FORMAT),
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
    issued = dt.datetime.strptime(top["issued_at"], _TIME_FORMAT).replace(tzinfo=dt.UTC)
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


# --- files -----------------------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise IntegrityError(f"{path.name}: not a regular file")
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _list_release(directory: Path) -> set[str]:
    """Relative paths of every file in the release; links and special files are refused."""
    found: set[str] = set()
    stack = [(directory, "")]
    while stack:
        here, prefix = stack.pop()
        with os.scandir(here) as it:
            for entry in it:
                rel = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if prefix or entry.name != "weights":
                        raise IntegrityError(f"unexpected directory {rel!r} in the release")
                    stack.append((Path(entry.path), rel + "/"))
                elif stat.S_ISREG(st.st_mode):
                    found.add(rel)
                else:
                    raise IntegrityError(f"{rel!r} in the release is not a regular file")
                if len(found) > MAX_RELEASE_FILES:
                    raise IntegrityError(f"more than {MAX_RELEASE_FILES} files in the release")
    return found


def _write_new(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as e:
        raise AlreadyExists(f"{path} already exists: the release is already signed") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --- certificates ----------------------------------------------------------------------------


def _single(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def _site_identity(cert: x509.Certificate) -> tuple[str, ed25519.Ed25519PublicKey]:
    """The site name and key of a site certificate; raises SignatureError for anything else."""
    role = _single(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if role != Role.SITE.value:
        raise SignatureError(f"certificate role: expected OU {Role.SITE.value!r}, found {role!r}")
    name = _single(cert, NameOID.COMMON_NAME)
    if not name:
        raise SignatureError("the site certificate must carry exactly one CN (the site name)")
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"site key: expected Ed25519, found {type(key).__name__.lstrip('_')}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise SignatureError("the site certificate is a CA certificate")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise SignatureError("the site certificate's key usage does not allow signing")
    return name, key


def _load_ca(ca_cert_pem: bytes) -> x509.Certificate:
    try:
        ca = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        raise InvalidInput(f"the CA certificate does not parse: {e}") from e
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InvalidInput("the given CA certificate is not a CA (basicConstraints ca=false)")
    return ca


def _check_chain(site: x509.Certificate, ca: x509.Certificate) -> None:
    try:
        site.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise SignatureError(
            f"the site certificate was not issued by the given CA: issuer "
            f"{site.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r}"
            + (" (signature does not verify)" if isinstance(e, InvalidSignature) else "")
        ) from e


def _check_validity(cert: x509.Certificate, at: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise SignatureError(
            f"{what} was not valid at {at.strftime(_TIME_FORMAT)}: valid from "
            f"{cert.not_valid_before_utc.strftime(_TIME_FORMAT)} to "
            f"{cert.not_valid_after_utc.strftime(_TIME_FORMAT)}"
        )


# --- signing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSigner:
    """A site's release-signing identity: its Ed25519 key and the CA-issued certificate."""

    key: ed25519.Ed25519PrivateKey
    cert_pem: bytes
    site: str

    @classmethod
    def from_pem(cls, *, cert_pem: bytes, key_pem: bytes) -> SiteSigner:
        """Raises :class:`InvalidInput` unless the certificate is a site certificate for the key."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            site, public = _site_identity(cert)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, SignatureError) as e:
            raise InvalidInput(f"site signer: {e}") from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise InvalidInput("site signer: the key is not an Ed25519 private key")
        raw, fmt = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        if key.public_key().public_bytes(raw, fmt) != public.public_bytes(raw, fmt):
            raise InvalidInput("site signer: the key is not the key of the site certificate")
        return cls(key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM), site=site)

    @classmethod
    def from_files(cls, *, cert: Path, key: Path) -> SiteSigner:
        return cls.from_pem(cert_pem=cert.read_bytes(), key_pem=key.read_bytes())


@dataclass(frozen=True)
class SignedRelease:
    directory: Path
    manifest: Manifest
    manifest_sha256: str


def sign_release(
    gates: Mapping[str, GateResult],
    *,
    context: ReleaseContext,
    signer: SiteSigner,
    now: dt.datetime | None = None,
) -> SignedRelease:
    """Sign a release: ``gates`` maps each of the job's datasets to its gate run.

    Every dataset in ``context`` must have a passed gate run, and the runs must have produced
    identical artifacts (their policies agree on the release form); the release is signed in the
    first run's directory (by dataset name): ``manifest.json``, ``manifest.sig``, ``site.pem``.

    Raises :class:`ReleaseRefused` when a gate did not pass or the runs disagree;
    :class:`InvalidInput` when the context is malformed or does not name the gated datasets;
    :class:`IntegrityError` when the directory no longer holds exactly what the gate wrote;
    :class:`AlreadyExists` when it is signed already.
    """
    if not gates:
        raise ReleaseRefused("no gate results: nothing may be released unchecked")
    if set(gates) != set(context.datasets):
        raise InvalidInput(
            f"gate runs for {sorted(gates)}, the job used datasets {sorted(context.datasets)}"
        )
    for dataset, gate in gates.items():
        try:
            gate.require_passed()
        except ReleaseRefused as e:
            raise ReleaseRefused(f"dataset {dataset!r}: {e}") from None
        if gate.release_dir is None or not gate.artifacts:
            raise ReleaseRefused(f"dataset {dataset!r}: the gate result holds no release")
        if not {c.name for c in gate.checks} >= MANDATORY_CHECKS:
            raise ReleaseRefused(f"dataset {dataset!r}: the gate result lacks a mandatory check")
    first = gates[min(gates)]
    for dataset, gate in gates.items():
        if gate.artifacts != first.artifacts:
            raise ReleaseRefused(
                f"dataset {dataset!r}: its policy produced different release artifacts "
                "(release dtype or metric precision differ between the datasets' policies)"
            )
    directory = first.release_dir
    assert directory is not None
    present = _list_release(directory)
    recorded = {a.path: a for a in first.artifacts}
    if present != set(recorded):
        raise IntegrityError(
            f"release directory: expected files {sorted(recorded)}, found {sorted(present)}"
        )
    artifacts = []
    for path in sorted(recorded):
        sha, size = _hash_file(directory / path)
        want = recorded[path]
        if (sha, size) != (want.sha256, want.size):
            raise IntegrityError(
                f"{path}: changed since the gate wrote it (expected sha256 {want.sha256} "
                f"size {want.size}, found sha256 {sha} size {size})"
            )
        artifacts.append(ArtifactDigest(path=path, sha256=sha, size=size))
    cert = x509.load_pem_x509_certificate(signer.cert_pem)
    issued = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    try:
        _check_validity(cert, issued, "the site certificate")
    except SignatureError as e:
        raise InvalidInput(f"site signer: {e}") from e
    manifest = Manifest(
        context=context,
        site=signer.site,
        issued_at=issued,
        gates=tuple(
            GateRecord(
                dataset=d,
                rules_version=gates[d].rules_version,
                checks=tuple(
                    CheckRecord(name=str(c.name), passed=c.passed, figures=c.figures)
                    for c in gates[d].checks
                ),
            )
            for d in sorted(gates)
        ),
        artifacts=tuple(artifacts),
    )
    try:
        body = manifest.to_bytes()
    except ValueError as e:
        raise InvalidInput(f"release context: {e}") from e
    signature = signer.key.sign(SIGNING_CONTEXT + body)
    _write_new(directory / SITE_CERT, signer.cert_pem)
    _write_new(directory / MANIFEST, body)
    _write_new(directory / SIGNATURE, signature)
    return SignedRelease(
        directory=directory, manifest=manifest, manifest_sha256=hashlib.sha256(body).hexdigest()
    )


# --- verifying -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose signature, certificate chain and contents all verified."""

    manifest: Manifest
    site: str
    site_cert_sha256: str
    directory: Path


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"{what} is missing") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise IntegrityError(f"{what} exceeds {cap} bytes")
    return data


def verify_release(
    directory: Path,
    *,
    ca_cert_pem: bytes,
    now: dt.datetime | None = None,
) -> VerifiedRelease:
    """Verify a release directory offline against the deployment CA's certificate.

    Raises :class:`SignatureError` when the site certificate does not chain to the CA, lacks
    the site role, was not valid at signing time, or the signature does not verify;
    :class:`IntegrityError` when the manifest is malformed, records a refused check, or an
    artifact is missing, extra or differs from its recorded hash or size;
    :class:`InvalidInput` when the CA certificate itself is unusable.
    """
    directory = Path(directory)
    ca = _load_ca(ca_cert_pem)
    present = _list_release(directory)
    missing = sorted(SIGNED_FILES - present)
    if missing:
        raise IntegrityError(f"the release lacks {missing}")

    cert_pem = _read_capped(directory / SITE_CERT, 64 * 1024, SITE_CERT)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise SignatureError(f"{SITE_CERT} does not parse: {e}") from e
    if len(certs) != 1:
        raise SignatureError(f"{SITE_CERT}: expected one certificate, found {len(certs)}")
    cert = certs[0]
    _check_chain(cert, ca)
    site, public = _site_identity(cert)

    body = _read_capped(directory / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST)
    signature = _read_capped(directory / SIGNATURE, 1024, SIGNATURE)
    if len(signature) != 64:
        raise SignatureError(f"{SIGNATURE}: expected 64 bytes, found {len(signature)}")
    try:
        public.verify(signature, SIGNING_CONTEXT + body)
    except InvalidSignature:
        raise SignatureError(
            f"{SIGNATURE} does not verify over {MANIFEST} with the key of site {site!r}"
        ) from None

    manifest = Manifest.from_bytes(body)
    if manifest.site != site:
        raise SignatureError(
            f"manifest names site {manifest.site!r}; it was signed by site {site!r}"
        )
    at = manifest.issued_at
    current = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    if at > current + CLOCK_SKEW:
        raise SignatureError(
            f"the manifest claims to be signed at {at.strftime(_TIME_FORMAT)}, in the future"
        )
    _check_validity(cert, at, "the site certificate")
    _check_validity(ca, at, "the CA certificate")

    mandatory = {str(n) for n in MANDATORY_CHECKS}
    for g in manifest.gates:
        names = {k.name for k in g.checks}
        if not names >= mandatory:
            raise IntegrityError(
                f"dataset {g.dataset!r} checks: expected at least {sorted(mandatory)}, "
                f"found {sorted(names)}"
            )
        refused = sorted(k.name for k in g.checks if not k.passed)
        if refused:
            raise IntegrityError(f"dataset {g.dataset!r}: the manifest records refused {refused}")
    if not manifest.artifacts:
        raise IntegrityError("the manifest lists no artifacts")

    listed = {a.path for a in manifest.artifacts}
    extra = sorted(present - listed - SIGNED_FILES)
    if extra:
        raise IntegrityError(f"files not in the manifest: {extra}")
    for a in manifest.artifacts:
        if a.path not in present:
            raise IntegrityError(f"{a.path}: listed in the manifest and missing")
        sha, size = _hash_file(directory / a.path)
        if size != a.size:
            raise IntegrityError(f"{a.path}: expected size {a.size}, found {size}")
        if sha != a.sha256:
            raise IntegrityError(f"{a.path}: expected sha256 {a.sha256}, found {sha}")
    return VerifiedRelease(
        manifest=manifest,
        site=site,
        site_cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        directory=directory,
    )
