"""The deployment CA: roles travel in certificates; keys are private; nothing is overwritten."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from gateway.identity import CertificateAuthority, principal_from_certificate
from policies.errors import AlreadyExists, InvalidInput, PermissionDenied
from policies.identity import Principal, Role


def test_issue_carries_role_and_team(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue("alice", role=Role.DATA_OWNER, team="hospital", out_dir=tmp_path / "ids")
    assert principal_from_certificate(files.cert.read_bytes()) == Principal(
        "alice", Role.DATA_OWNER, "hospital"
    )
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)


def test_nothing_is_overwritten(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(AlreadyExists):
        CertificateAuthority.init(tmp_path / "ca")
    ca.issue("bob", role=Role.MODEL_TEAM, out_dir=tmp_path)
    with pytest.raises(AlreadyExists):
        ca.issue("bob", role=Role.COMPLIANCE, out_dir=tmp_path)


@pytest.mark.parametrize("name", ["Bob", "../x", "", "a b", "x" * 80])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(InvalidInput, match="identity name"):
        ca.issue(name, role=Role.MODEL_TEAM, out_dir=tmp_path)


def test_unknown_role_in_a_certificate_is_refused(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "eve"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    with pytest.raises(PermissionDenied, match="unknown role 'root'"):
        principal_from_certificate(cert.public_bytes(Encoding.PEM))


def test_no_certificate_carries_the_unauthenticated_role(tmp_path: Path) -> None:
    """The audit's word for a caller without a valid role can never be granted by the CA."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue("eve", role=Role.UNAUTHENTICATED, out_dir=tmp_path / "ids")
    with pytest.raises(PermissionDenied, match="unknown role 'unauthenticated'"):
        principal_from_certificate(files.cert.read_bytes())


def test_site_signer_is_ed25519_with_site_role(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue_site_signer("site-a", out_dir=tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert principal_from_certificate(files.cert.read_bytes()).role is Role.SITE


def test_every_issuance_is_in_the_cas_register(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("olivia", role=Role.DATA_OWNER, team="library", out_dir=tmp_path / "ids")
    ca.issue_site_signer("site", out_dir=tmp_path / "ids")
    reg = ca.issued()
    assert [(r["name"], r["role"]) for r in reg] == [("olivia", "data-owner"), ("site", "site")]
    assert all(len(r["fingerprint"]) == 64 and r["serial"] for r in reg)
