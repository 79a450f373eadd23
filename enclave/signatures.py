"""Signing a statement with a person's or a site's CA-issued key, and checking one: ECDSA P-256
over SHA-256 (people's keys), or Ed25519 (a site's release-signing key), both the
``cryptography`` package's, base64 in transit. What is signed is
:mod:`policies.signing`'s; who signed is the certificate's, which must chain to the deployment
CA, carry the expected role and name, and have been valid when checked.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from enclave.provenance.verify import check_chain, check_validity, load_ca
from policies.errors import SignatureError
from policies.identity import Role


def sign(key_pem: bytes, message: bytes) -> str:
    """The base64 signature of ``message`` by the ECDSA or Ed25519 private key in ``key_pem``."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return base64.b64encode(key.sign(message)).decode()
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("the signing key is neither an ECDSA nor an Ed25519 key")
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def verify(
    *,
    cert_pem: str,
    signature: str,
    message: bytes,
    ca_cert_pem: bytes,
    name: str,
    role: Role,
    what: str,
) -> None:
    """Raise :class:`SignatureError` naming ``what`` unless ``signature`` is a signature of
    ``message`` by the key of ``cert_pem``, a certificate of the CA for ``name`` with ``role``,
    valid now."""
    if not signature or not cert_pem:
        raise SignatureError(f"{what}: not signed")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error) as e:
        raise SignatureError(f"{what}: the signature or its certificate does not parse") from e
    try:
        check_chain(cert, load_ca(ca_cert_pem))
    except SignatureError as e:
        raise SignatureError(
            f"{what}: the signer's certificate was not issued by the deployment CA"
        ) from e
    check_validity(cert, dt.datetime.now(dt.UTC), f"{what}: the signer's certificate")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    signer = str(cns[0].value) if len(cns) == 1 else "?"
    signer_role = str(ous[0].value) if len(ous) == 1 else "?"
    if signer != name or signer_role != role.value:
        raise SignatureError(
            f"{what}: signed by {signer} ({signer_role}), not by {name} ({role.value})"
        )
    public = cert.public_key()
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(raw, message)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(raw, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise SignatureError(f"{what}: the signer's key is neither ECDSA nor Ed25519")
    except InvalidSignature:
        raise SignatureError(f"{what}: the signature does not verify") from None
