"""The deployment's certificate authority and the identities it issues.

``sealroom ca init`` creates an ECDSA P-256 CA; ``sealroom ca issue NAME --role ROLE`` issues a
client identity whose role travels in the certificate (subject OU) and whose team is the
subject O. The gateway's server identity carries ``localhost`` and ``127.0.0.1`` as subject
alternative names. A site's release-signing identity is an Ed25519 key certified by the same CA
with role ``site``, so anyone holding the CA certificate can verify a release offline.

Key files are written with mode 0600 (certificates 0644) by :mod:`enclave.secretfile`'s durable,
atomic writer, and never overwritten: issuing a name twice is an error.

``sealroom ca revoke NAME`` revokes every certificate the CA issued to a name: their serials go
into the CA's revocation list (``crl.pem`` beside ``ca.pem``: an X.509 CRL signed by the CA,
written again whole and atomically at each revocation). The gateway checks every caller against
it (:class:`RevocationList`, used by :mod:`gateway._auth`), and reads it again when it changes.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import os
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclave.identity import IdentityFiles
from enclave.secretfile import SECRET_MODE, write_secret
from policies.errors import AlreadyExists, InvalidInput, NotFound, PermissionDenied
from policies.identity import Principal, Role
from policies.spec import NAME_RE

CA_VALIDITY = dt.timedelta(days=3650)
CRL_FILE = "crl.pem"
"""The CA's revocation list, beside its certificate."""
ISSUED_FILE = "issued.jsonl"
"""The CA's register of issued identities, one JSON line each."""
LEAF_VALIDITY = dt.timedelta(days=365)
PUBLIC_MODE = 0o644
"""Certificates are public: readable by anyone who must trust or present them."""


def _write_new(path: Path, data: bytes, *, mode: int = SECRET_MODE) -> None:
    """Create ``path`` once, durably and atomically (:mod:`enclave.secretfile`); nothing here
    is ever overwritten. Raises :class:`AlreadyExists` when something is at ``path``."""
    try:
        write_secret(path, data, mode=mode, exclusive=True)
    except FileExistsError as e:
        raise AlreadyExists(f"{path} already exists: identities are never overwritten") from e


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """A CA kept in a directory: ``ca.pem`` (public) and ``ca.key`` (mode 0600)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        self.key_path = directory / "ca.key"

    @classmethod
    def init(cls, directory: Path, *, name: str = "Sealroom deployment CA") -> CertificateAuthority:
        """Create a new CA. Raises :class:`AlreadyExists` if one is there already."""
        ca = cls(directory)
        if ca.cert_path.exists() or ca.key_path.exists():
            raise AlreadyExists(f"a CA already exists in {directory}")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_new(
            ca.key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_new(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
        return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        ca = cls(directory)
        if not ca.cert_path.exists():
            raise NotFound(f"no CA in {directory}: run `sealroom ca init` first")
        return ca

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def _signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.key_path.exists():
            raise NotFound(f"the CA's private key is not in {self.directory}")
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInput(f"{self.key_path} is not an EC private key")
        return x509.load_pem_x509_certificate(self.cert_pem), key

    def issue(
        self,
        name: str,
        *,
        role: Role,
        team: str = "",
        out_dir: Path,
        server_names: tuple[str, ...] = (),
        validity: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> IdentityFiles:
        """Issue a TLS identity (ECDSA P-256) into ``out_dir/NAME.pem`` and ``NAME.key``.

        ``server_names`` (DNS names or IP addresses) make it a server certificate as well.
        ``validity`` (not before, not after) replaces the usual window (from five minutes ago,
        for :data:`LEAF_VALIDITY`): for tests of certificates that expired or are not valid yet.
        """
        _check_name(name)
        if team and not NAME_RE.match(team):
            raise InvalidInput(f"team {team!r}: use lowercase letters, digits, '.', '_' or '-'")
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        return self._issue(
            name,
            role=role,
            team=team,
            public_key=key.public_key(),
            private_key=key,
            out_dir=out_dir,
            usages=usages,
            server_names=server_names,
            validity=validity,
        )

    def site_signer(self, name: str, *, out_dir: Path) -> IdentityFiles:
        """The release-signing identity of site ``name`` in ``out_dir``: issued on the first
        call (:meth:`issue_site_signer`), the same files on every later one."""
        signer = IdentityFiles(
            cert=out_dir / f"{name}-signer.pem",
            key=out_dir / f"{name}-signer.key",
            ca_cert=self.cert_path,
        )
        if signer.cert.exists():
            return signer
        return self.issue_site_signer(name, out_dir=out_dir)

    def issue_site_signer(self, name: str, *, out_dir: Path) -> IdentityFiles:
        """Issue a site's release-signing identity: an Ed25519 key, role ``site``."""
        _check_name(name)
        key = ed25519.Ed25519PrivateKey.generate()
        return self._issue(
            name,
            role=Role.SITE,
            team="",
            public_key=key.public_key(),
            private_key=key,
            out_dir=out_dir,
            usages=[],
            server_names=(),
            suffix="-signer",
        )

    def _issue(
        self,
        name: str,
        *,
        role: Role,
        team: str,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
        out_dir: Path,
        usages: list[x509.ObjectIdentifier],
        server_names: tuple[str, ...],
        suffix: str = "",
        validity: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> IdentityFiles:
        cert_path = out_dir / f"{name}{suffix}.pem"
        key_path = out_dir / f"{name}{suffix}.key"
        if cert_path.exists() or key_path.exists():
            raise AlreadyExists(f"an identity named {name!r} already exists in {out_dir}")
        ca_cert, ca_key = self._signer()
        attrs = [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        ]
        if team:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, team))
        now = _now()
        not_before, not_after = validity or (now - dt.timedelta(minutes=5), now + LEAF_VALIDITY)
        if not_after <= not_before:
            raise InvalidInput(f"validity: {not_after} is not after {not_before}")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if server_names:
            sans: list[x509.GeneralName] = []
            for s in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(s)))
                except ValueError:
                    sans.append(x509.DNSName(s))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new(
            key_path,
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
        self._record_issue(cert, name=name, role=role, team=team)
        return IdentityFiles(cert=cert_path, key=key_path, ca_cert=self.cert_path)

    @property
    def issued_path(self) -> Path:
        return self.cert_path.parent / ISSUED_FILE

    def _record_issue(self, cert: x509.Certificate, *, name: str, role: Role, team: str) -> None:
        """Append the issuance to the CA's register (the gateway audits it at start-up)."""
        line = {
            "serial": format(cert.serial_number, "x"),
            "name": name,
            "role": role.value,
            "team": team,
            "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "time": _now().isoformat(),
        }
        with self.issued_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def issued(self) -> list[dict[str, str]]:
        """Every identity this CA issued, in order (from its register)."""
        if not self.issued_path.exists():
            return []
        return [json.loads(x) for x in self.issued_path.read_text().splitlines() if x.strip()]

    def has_issued(self, name: str, role: Role) -> bool:
        """Whether this CA issued ``name`` an identity with ``role``."""
        return any(r["name"] == name and r["role"] == role.value for r in self.issued())

    # -- revocation -------------------------------------------------------------------------

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    def revoked(self) -> dict[int, dt.datetime]:
        """The serials on this CA's revocation list, each with its revocation time (empty
        without a list). Raises :class:`InvalidInput` when the list does not verify."""
        return read_crl(self.crl_path, ca_cert=x509.load_pem_x509_certificate(self.cert_pem))

    def revoke(self, name: str) -> list[str]:
        """Revoke every certificate this CA issued to ``name`` (a site's TLS identity and its
        release signer both): the revocation list is signed and written again, whole and
        atomically, with their serials added. Returns the serials (hex) newly revoked (empty:
        all were revoked already). Raises :class:`NotFound` when the CA issued ``name``
        nothing, :class:`InvalidInput` when the list on disk does not verify; nothing is
        written then."""
        _check_name(name)
        serials = {int(r["serial"], 16) for r in self.issued() if r["name"] == name}
        if not serials:
            raise NotFound(f"this CA issued no certificate to {name!r}: nothing to revoke")
        ca_cert, ca_key = self._signer()
        revoked = self.revoked()
        new = sorted(serials - revoked.keys())
        if not new:
            return []
        now = _now()
        revoked.update((s, now) for s in new)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now)
            .next_update(now + CA_VALIDITY)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_secret(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
        return [format(s, "x") for s in new]


def read_crl(path: Path, *, ca_cert: x509.Certificate) -> dict[int, dt.datetime]:
    """The revoked serials of the CRL at ``path`` (empty when there is none), each with its
    revocation time. Raises :class:`InvalidInput` when it is not a CRL this CA signed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise InvalidInput(f"{path} is not a PEM certificate revocation list: {e}") from e
    public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public, ec.EllipticCurvePublicKey):
        raise InvalidInput(f"{path} was not issued by the deployment CA ({crl.issuer})")
    if not crl.is_signature_valid(public):
        raise InvalidInput(f"{path} is not signed by the deployment CA's key")
    return {r.serial_number: r.revocation_date_utc for r in crl}


class RevocationList:
    """The CA's revocation list as the gateway checks callers against it: read at start (a
    list that does not verify stops the start: :class:`InvalidInput`), read again whenever the
    file changes (its inode, size or modification time), verified each time. No file revokes
    nothing; a file that stops verifying refuses everyone until it is fixed (fail closed)."""

    def __init__(self, path: Path, *, ca_cert_pem: bytes) -> None:
        self.path = path
        self._ca = x509.load_pem_x509_certificate(ca_cert_pem)
        self._lock = threading.Lock()
        self._stamp = self._stat()  # before the read: a change in between is read again
        self._revoked: dict[int, dt.datetime] = read_crl(path, ca_cert=self._ca)
        self._broken = ""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                self._revoked, self._broken = read_crl(self.path, ca_cert=self._ca), ""
            except InvalidInput as e:
                self._revoked, self._broken = {}, str(e)
            self._stamp = stamp

    def check(self, cert_pem: bytes) -> None:
        """Raises :class:`PermissionDenied`, with the reason, when the (TLS-verified)
        certificate is revoked, or when the list no longer verifies."""
        self._refresh()
        with self._lock:
            broken, revoked = self._broken, self._revoked
        if broken:
            raise PermissionDenied(
                f"the revocation list cannot be used ({broken}): every certificate is refused "
                "until it is fixed"
            )
        serial, name = _serial_and_name(cert_pem)
        when = revoked.get(serial)
        if when is not None:
            raise PermissionDenied(
                f"the certificate of {name} (serial {serial:x}) was revoked at {when.isoformat()}"
            )


@functools.lru_cache(maxsize=1024)
def _serial_and_name(pem: bytes) -> tuple[int, str]:
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cert.serial_number, str(cns[0].value) if cns else "?"


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"identity name {name!r}: use lowercase letters, digits, '.', '_' or '-' (at most 63)"
        )


def principal_from_certificate(pem: bytes) -> Principal:
    """The principal a (TLS-verified) client certificate names.

    Raises :class:`PermissionDenied` when the certificate carries no known role.
    """
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise PermissionDenied("client certificate must carry exactly one CN and one OU (role)")
    try:
        role = Role(str(ous[0].value))
    except ValueError:
        raise PermissionDenied(
            f"client certificate carries an unknown role {ous[0].value!r}"
        ) from None
    if role is Role.UNAUTHENTICATED:  # only ever the audit's word for a caller without one
        raise PermissionDenied(f"client certificate carries an unknown role {role.value!r}")
    team = str(orgs[0].value) if orgs else ""
    return Principal(name=str(cns[0].value), role=role, team=team)
