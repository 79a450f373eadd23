"""Two logs, one story: the gateway's copy of each remote site's own audit log.

A remote site keeps its own Merkle audit log (:class:`enclave.audit.AuditLog`, signed with its
release-signing key) of what happens there: leases taken, key releases and staging, file reads,
containers, gate results. It pushes each new stretch of records with a signed checkpoint that
vouches for them. :class:`SiteAudits` checks the signature (the CA-issued key of the site that
calls), extends its copy of that site's log (:class:`enclave.audit.AuditMirror`: only when the
root of the copy with the new records is the signed root, so the site's log only grew) and
appends a ``site.checkpoint`` event to the gateway's own log. So the site cannot rewrite or drop
a record it has pushed without its next checkpoint being refused here, and the gateway cannot
drop a site's checkpoint without breaking its own log's chain. A compliance officer reads a
site's copy through the gateway (queries, proofs, an export that verifies offline under the
site's key) and checks it against the gateway's export (:func:`enclave.audit.cross_check`).

Each copy lives under ``sites/NAME/`` in the gateway's home: ``audit.db`` and ``signer.pem``
(the certificate of the key that signed its last checkpoint).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import SITE_CHECKPOINT, AuditMirror, CheckpointError, SignedCheckpoint
from enclave.provenance.verify import check_chain, load_ca, site_identity
from enclave.secretfile import write_secret
from policies.errors import InvalidInput, NotFound, SignatureError
from policies.identity import Principal, Role
from policies.spec import NAME_RE

Record = Callable[..., int]
"""The gateway's audit append (``Gateway.record``)."""


class SiteAudits:
    """The gateway's copy of each remote site's audit log, opened when first asked for."""

    def __init__(self, root: Path, *, record: Record, ca_cert_pem: bytes) -> None:
        self._root = root
        self._record = record
        self._ca = load_ca(ca_cert_pem)
        self._lock = threading.Lock()  # the table of open copies
        self._site_locks: dict[str, threading.Lock] = {}
        self._open: dict[str, tuple[AuditMirror, str]] = {}  # the copy, its signer's PEM

    def _dir(self, site: str) -> Path:
        if not NAME_RE.match(site):
            raise InvalidInput(f"not a site name: {site!r}")
        return self._root / site

    def size(self, site: str) -> int:
        """How many records of ``site``'s log the gateway holds (all vouched for)."""
        if not (self._dir(site) / "signer.pem").exists():
            return 0
        held = self._opened(site)[0].held()
        return held.size if held is not None else 0

    def log(self, site: str) -> AuditMirror:
        """The copy of ``site``'s log. Raises NotFound for a site that never pushed one."""
        return self._opened(site)[0]

    def checkpoint(self, site: str) -> tuple[SignedCheckpoint, str]:
        """The last checkpoint of ``site``'s log the gateway holds, and the PEM certificate of
        the key that signed it. Raises NotFound."""
        mirror, cert = self._opened(site)
        held = mirror.held()
        if held is None:
            raise NotFound(f"the gateway holds no checkpoint of site {site}'s log")
        return held, cert

    def _opened(self, site: str) -> tuple[AuditMirror, str]:
        d = self._dir(site)
        with self._lock:
            if site not in self._open:
                if not (d / "signer.pem").exists():
                    raise NotFound(f"no audit log of a site named {site!r} reached this gateway")
                cert = (d / "signer.pem").read_text()
                self._open[site] = (AuditMirror(d / "audit.db", public_key=self._key(cert)), cert)
            return self._open[site]

    def _key(self, signer_cert: str, site: str | None = None) -> ed25519.Ed25519PublicKey:
        try:
            cert = x509.load_pem_x509_certificate(signer_cert.encode())
        except ValueError as e:
            raise InvalidInput("the site's signing certificate does not parse") from e
        check_chain(cert, self._ca)
        name, key = site_identity(cert)
        if site is not None and name != site:
            raise SignatureError(f"the checkpoint is signed by site {name!r}, not {site!r}")
        return key

    def push(
        self,
        site: str,
        checkpoint: SignedCheckpoint,
        *,
        signer_cert: str,
        from_size: int,
        leaves: Iterable[bytes],
    ) -> int:
        """Check ``site``'s checkpoint, extend the copy with ``leaves`` (its records from
        ``from_size`` on) and record it; the size now held. Raises SignatureError,
        IntegrityError (the log shrank or was rewritten) or InvalidInput; then nothing was
        stored."""
        key = self._key(signer_cert, site)
        try:
            checkpoint.verify(key)
        except CheckpointError as e:
            raise SignatureError(f"site {site}: {e}") from e
        with self._lock:
            lock = self._site_locks.setdefault(site, threading.Lock())
        with lock:
            d = self._dir(site)
            if not (d / "signer.pem").exists():
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_secret(d / "signer.pem", signer_cert.encode(), mode=0o644)
            mirror, held_cert = self._opened(site)
            held = mirror.held()
            size = held.size if held is not None else 0
            if held is not None and (held.size, held.root) == (checkpoint.size, checkpoint.root):
                return size  # again: acknowledged
            if from_size != size:
                raise InvalidInput(f"site {site}: the gateway holds size {size}, not {from_size}")
            if signer_cert != held_cert:
                raise SignatureError(
                    f"site {site}: the checkpoint is signed by another key than the one that "
                    "signed its log so far"
                )
            try:
                new = mirror.extend(checkpoint, leaves)
            except CheckpointError as e:
                raise SignatureError(f"site {site}: {e}") from e
            self._record(Principal(site, Role.SITE), SITE_CHECKPOINT, details=checkpoint.to_dict())
            return new

    def close(self) -> None:
        with self._lock:
            for mirror, _ in self._open.values():
                mirror.close()
            self._open.clear()
