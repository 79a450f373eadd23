"""Offline verification of a signed release, with the deployment CA's certificate alone.

:func:`verify_release` is what a model team runs on a downloaded release: the site certificate
must chain to the CA, carry the ``site`` role and have been valid when the release was signed;
the signature must verify over the manifest; every listed artifact must match its hash and size,
and no file may be missing or extra. One path, top to bottom; the manifest's form is checked by
:meth:`~enclave.provenance._manifest.Manifest.from_bytes`. The certificate and file checks here
are also the ones signing applies (:mod:`enclave.provenance._sign`), so the site never signs
what this would refuse.

Raises :class:`SignatureError` for certificate and signature faults, :class:`IntegrityError` for
content faults, each with expected vs actual; :class:`InvalidInput` for an unusable CA
certificate. Imports nothing of the site beyond the manifest (no gate, no torch).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from enclave.provenance._manifest import (
    CLOCK_SKEW,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_RELEASE_FILES,
    SIGNATURE,
    SIGNED_FILES,
    SIGNING_CONTEXT,
    SITE_CERT,
    TIME_FORMAT,
    Manifest,
)
from policies.errors import IntegrityError, InvalidInput, SignatureError
from policies.identity import Role
from policies.release import MANDATORY_CHECKS

__all__ = ["VerifiedRelease", "verify_release"]


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
    digests: Mapping[str, tuple[str, int]] | None = None,
) -> VerifiedRelease:
    """Verify a release directory offline against the deployment CA's certificate.

    ``digests`` (path -> (sha256, size)) are the files' hashes taken by the caller as it wrote
    them (the gateway hashes a pushed release as it arrives): then the files are not read
    again. Every artifact must have one.

    Raises :class:`SignatureError` when the site certificate does not chain to the CA, lacks
    the site role, was not valid at signing time, or the signature does not verify;
    :class:`IntegrityError` when the manifest is malformed, records a refused check, or an
    artifact is missing, extra or differs from its recorded hash or size;
    :class:`InvalidInput` when the CA certificate itself is unusable.
    """
    directory = Path(directory)
    ca = load_ca(ca_cert_pem)
    present = list_release(directory)
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
    check_chain(cert, ca)
    site, public = site_identity(cert)

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
            f"the manifest claims to be signed at {at.strftime(TIME_FORMAT)}, in the future"
        )
    check_validity(cert, at, "the site certificate")
    check_validity(ca, at, "the CA certificate")

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
        if digests is None:
            sha, size = hash_file(directory / a.path)
        elif a.path in digests:
            sha, size = digests[a.path]
        else:
            raise IntegrityError(f"{a.path}: no digest was taken of it as it was written")
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


# --- certificates ----------------------------------------------------------------------------


def _single(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def site_identity(cert: x509.Certificate) -> tuple[str, ed25519.Ed25519PublicKey]:
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


def load_ca(ca_cert_pem: bytes) -> x509.Certificate:
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


def check_chain(site: x509.Certificate, ca: x509.Certificate) -> None:
    try:
        site.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise SignatureError(
            f"the site certificate was not issued by the given CA: issuer "
            f"{site.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r}"
            + (" (signature does not verify)" if isinstance(e, InvalidSignature) else "")
        ) from e


def check_validity(cert: x509.Certificate, at: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise SignatureError(
            f"{what} was not valid at {at.strftime(TIME_FORMAT)}: valid from "
            f"{cert.not_valid_before_utc.strftime(TIME_FORMAT)} to "
            f"{cert.not_valid_after_utc.strftime(TIME_FORMAT)}"
        )


# --- files -----------------------------------------------------------------------------------


def hash_file(path: Path) -> tuple[str, int]:
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


def list_release(directory: Path) -> set[str]:
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
