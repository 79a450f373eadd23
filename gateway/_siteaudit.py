"""Two logs, one story: the gateway's record of each remote site's own audit log.

A remote site keeps its own Merkle audit log (:class:`enclave.audit.AuditLog`, signed with its
release-signing key) of what happens there: leases taken, key releases and staging, file reads,
containers, gate results. It pushes each new signed checkpoint with the consistency proof from
the last one the gateway holds. :class:`SiteCheckpoints` checks the signature (the site's
CA-issued key, for the site that calls), the proof (the site's log only grew), and appends a
``site.checkpoint`` event to the gateway's own log. So the site cannot rewrite or drop a record
it has checkpointed without its next proof failing here, and the gateway cannot drop a site's
checkpoint without breaking its own log's chain; an export of the gateway's log carries every
site checkpoint for an offline check against the site's own export.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable

from cryptography import x509

from enclave.audit import (
    AuditLog,
    CheckpointError,
    ProofError,
    SignedCheckpoint,
    verify_consistency,
)
from enclave.provenance.verify import check_chain, load_ca, site_identity
from policies.errors import IntegrityError, InvalidInput, SignatureError
from policies.identity import Principal, Role

ACTION = "site.checkpoint"

Record = Callable[..., int]
"""The gateway's audit append (``Gateway.record``)."""


class SiteCheckpoints:
    """The last checkpoint the gateway holds for each site, from its own audit log."""

    def __init__(self, audit: AuditLog, *, record: Record, ca_cert_pem: bytes) -> None:
        self._audit = audit
        self._record = record
        self._ca = load_ca(ca_cert_pem)
        self._lock = threading.Lock()
        self._last: dict[str, tuple[int, bytes]] = {}

    def _held(self, site: str) -> tuple[int, bytes]:
        """The last checkpoint recorded for ``site``: read from the log the first time the
        site is asked about (not at the gateway's start), then kept. Under the lock."""
        if site not in self._last:
            found = self._audit.query(action=ACTION, principal=site, limit=10**9)
            if found:
                d = found[-1].event.details
                self._last[site] = (int(str(d["size"])), bytes.fromhex(str(d["root"])))
            else:
                self._last[site] = (0, b"")
        return self._last[site]

    def size(self, site: str) -> int:
        with self._lock:
            return self._held(site)[0]

    def push(
        self,
        site: str,
        checkpoint: SignedCheckpoint,
        *,
        signer_cert: str,
        from_size: int,
        proof: list[bytes],
    ) -> int:
        """Check and record a site's checkpoint; the size now held. Raises SignatureError,
        IntegrityError (the log shrank or was rewritten) or InvalidInput."""
        try:
            cert = x509.load_pem_x509_certificate(signer_cert.encode())
        except ValueError as e:
            raise InvalidInput("the site's signing certificate does not parse") from e
        check_chain(cert, self._ca)
        name, key = site_identity(cert)
        if name != site:
            raise SignatureError(f"the checkpoint is signed by site {name!r}, not {site!r}")
        try:
            checkpoint.verify(key)
        except CheckpointError as e:
            raise SignatureError(f"site {site}: {e}") from e
        with self._lock:
            size, root = self._held(site)
            if checkpoint.size == size and checkpoint.root == root:
                return size  # again: acknowledged
            if from_size != size:
                raise InvalidInput(f"site {site}: the gateway holds size {size}, not {from_size}")
            if checkpoint.size < size:
                raise IntegrityError(
                    f"site {site}: its log has {checkpoint.size} records, fewer than the "
                    f"{size} it checkpointed before"
                )
            if size:
                try:
                    verify_consistency(
                        old_size=size,
                        new_size=checkpoint.size,
                        old_root=root,
                        new_root=checkpoint.root,
                        proof=proof,
                    )
                except ProofError as e:
                    raise IntegrityError(
                        f"site {site}: its log at {checkpoint.size} records is not the log it "
                        f"checkpointed at {size}: {e}"
                    ) from e
            self._record(
                Principal(site, Role.SITE),
                ACTION,
                details={
                    "size": checkpoint.size,
                    "root": checkpoint.root.hex(),
                    "time": checkpoint.time,
                    "signature": base64.b64encode(checkpoint.signature).decode(),
                },
            )
            self._last[site] = (checkpoint.size, checkpoint.root)
            return checkpoint.size
