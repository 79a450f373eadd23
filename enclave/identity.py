"""Where an X.509 identity's files live: a plain value the composition root hands over.

The site signs releases with an identity it is given (:meth:`enclave.agent.SiteAgent.open`'s
``signer``); the deployment's CA (:mod:`gateway.identity`) issues it, so the site never needs
the CA. The gateway and its clients name their TLS identities with the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class IdentityFiles:
    """Where an identity's certificate and key live, with the CA certificate to trust."""

    cert: Path
    key: Path
    ca_cert: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate PEM, key PEM, CA certificate PEM)."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca_cert.read_bytes()
