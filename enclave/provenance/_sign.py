"""Signing a gated release at the site, with the site's Ed25519 identity.

:func:`sign_release` takes the passed gate runs of a job (one per dataset it read), checks that
the release directory still holds exactly what the gate wrote, and adds ``manifest.json``,
``manifest.sig`` (Ed25519 over ``SIGNING_CONTEXT`` + the manifest) and ``site.pem`` beside the
artifacts. The certificate and file checks are the verifier's own
(:mod:`enclave.provenance.verify`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.provenance._manifest import (
    MANIFEST,
    SIGNATURE,
    SIGNING_CONTEXT,
    SITE_CERT,
    ArtifactDigest,
    CheckRecord,
    GateRecord,
    Manifest,
    ReleaseContext,
)
from enclave.provenance.verify import check_validity, hash_file, list_release, site_identity
from policies.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidInput,
    ReleaseRefused,
    SignatureError,
)
from policies.release import MANDATORY_CHECKS

if TYPE_CHECKING:  # the gate imports torch; signing only reads its results
    from enclave.gate import GateResult

__all__ = ["SignedRelease", "SiteSigner", "sign_release"]


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
            site, public = site_identity(cert)
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
    present = list_release(directory)
    recorded = {a.path: a for a in first.artifacts}
    if present != set(recorded):
        raise IntegrityError(
            f"release directory: expected files {sorted(recorded)}, found {sorted(present)}"
        )
    artifacts = []
    for path in sorted(recorded):
        sha, size = hash_file(directory / path)
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
        check_validity(cert, issued, "the site certificate")
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


def _write_new(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as e:
        raise AlreadyExists(f"{path} already exists: the release is already signed") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)
