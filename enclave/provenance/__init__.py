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

The package splits by concern: :mod:`._manifest` is the signed record, its one canonical
encoding and its validation; :mod:`._sign` signs a gated release at the site;
:mod:`.verify` is the offline verifier a model team runs with the CA certificate alone. The
verifier imports neither the gate nor torch.
"""

from enclave.provenance._manifest import (
    ARTIFACT_PATH_RE,
    CLOCK_SKEW,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_RELEASE_FILES,
    SCHEMA,
    SHA256_RE,
    SIGNATURE,
    SIGNED_FILES,
    SIGNING_CONTEXT,
    SITE_CERT,
    TEXT_RE,
    ArtifactDigest,
    AuditPosition,
    CheckRecord,
    DatasetVersion,
    GateRecord,
    Manifest,
    ReleaseContext,
)
from enclave.provenance._sign import SignedRelease, SiteSigner, sign_release
from enclave.provenance.verify import VerifiedRelease, verify_release

__all__ = [
    "ARTIFACT_PATH_RE",
    "CLOCK_SKEW",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "MAX_RELEASE_FILES",
    "SCHEMA",
    "SHA256_RE",
    "SIGNATURE",
    "SIGNED_FILES",
    "SIGNING_CONTEXT",
    "SITE_CERT",
    "TEXT_RE",
    "ArtifactDigest",
    "AuditPosition",
    "CheckRecord",
    "DatasetVersion",
    "GateRecord",
    "Manifest",
    "ReleaseContext",
    "SignedRelease",
    "SiteSigner",
    "VerifiedRelease",
    "sign_release",
    "verify_release",
]
