"""A site reached over the real site link, in one process: the gateway's SiteLink service on a
gRPC server over mTLS (with the gateway's authorisation and audit interceptor) and a
:class:`enclave.link.SiteLink` client serving a backing site on a thread.

:class:`LinkedSite` presents the site contract the way a gateway meets a remote site: runs and
cancellations go through the link; datasets are stored at the site (their bytes never travel
the link), and logs and keys stay there.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from sealroom.v1 import site_pb2_grpc

from enclave.audit import AuditEvent, AuditLog
from enclave.contract import Report, RunOrder, Site, StoredDataset
from enclave.identity import IdentityFiles
from enclave.link import PushedDataset, SiteLink, open_site_audit
from gateway._auth import AuthInterceptor
from gateway._linkservicer import SiteLinkServicer
from gateway._siteaudit import SiteAudits
from gateway._sitelink import SiteLinks
from gateway.identity import CertificateAuthority
from policies.identity import Role


class LinkedSite:
    """Site ``name`` behind the link; ``audit`` collects the interceptor's records, ``pushed``
    the datasets the site pushed."""

    def __init__(
        self,
        root: Path,
        backing: Site,
        *,
        ca: CertificateAuthority,
        name: str = "site-a",
        lease_s: float = 3.0,
        heartbeat_s: float = 0.3,
        owner: str = "olivia",
    ) -> None:
        self.root = root
        self.ca = ca
        self.name = name
        self.backing = backing
        self.owner = owner
        self.audit: list[tuple[str, str, str]] = []
        self.pushed: list[tuple[str, str, StoredDataset]] = []
        self.stored: list[StoredDataset] = []
        self.links = SiteLinks(root / "links", lease_s=lease_s, heartbeat_s=heartbeat_s)
        server_id = ca.issue(
            "gateway", role=Role.OPERATOR, out_dir=root / "gw", server_names=("localhost",)
        )
        self.identity = ca.issue(name, role=Role.SITE, out_dir=root / "site-id")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            interceptors=[AuthInterceptor(self._record)],
        )
        cert, key, ca_pem = server_id.read()
        self.ca_pem = ca_pem
        # The gateway's own log, where site checkpoints are recorded, and the site's own log.
        self.gateway_log = AuditLog(
            root / "gateway-audit.db", signing_key=ed25519.Ed25519PrivateKey.generate()
        )
        self.site_audits = SiteAudits(
            root / "gateway-sites", record=self._record_event, ca_cert_pem=ca_pem
        )
        self.signer = ca.site_signer(name, out_dir=root / "site-signer")
        self.site_log, self.site_log_cert = open_site_audit(root / "site-audit.db", self.signer)
        site_pb2_grpc.add_SiteLinkServicer_to_server(
            SiteLinkServicer(
                self.links,
                ca_cert_pem=ca_pem,
                max_release_bytes=1 << 30,
                push_dataset=lambda s, o, d, _: self.pushed.append((s, o, d)),
                site_audits=self.site_audits,
            ),
            self.server,
        )
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca_pem, require_client_auth=True
        )
        self.port = self.server.add_secure_port("localhost:0", creds)
        self.server.start()
        self.link = self.client(self.identity)
        self._thread = threading.Thread(target=self.link.serve, daemon=True)
        self._thread.start()
        if not self.link.connected.wait(30):
            raise RuntimeError("the site did not connect")

    def client(self, identity: IdentityFiles) -> SiteLink:
        return SiteLink(
            self.backing,
            address=f"localhost:{self.port}",
            identity=identity,
            state=identity.cert.parent / "state",
            slots=4,
            datasets=lambda: [PushedDataset(d, self.owner) for d in self.stored],
            audit=self.site_log,
            audit_cert=self.site_log_cert,
        )

    def _record_event(self, principal: Any, action: str, **kw: Any) -> int:
        """The gateway's domain record (as Gateway.record): into its own log."""
        event = AuditEvent(principal.name, principal.role.value, action, "ok", **kw)
        return self.gateway_log.append(event).seq

    def _record(self, principal: Any, action: str, **kw: Any) -> int:
        self.audit.append((principal.name, action, kw.get("outcome", "")))
        return len(self.audit)

    # -- the site contract, as the gateway meets a remote site ---------------------------------

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        stored = self.backing.store_dataset(name, archive=archive)
        self.stored.append(stored)
        return stored

    def run(self, order: RunOrder, report: Report) -> None:
        self.links.run(self.name, order, report)

    def cancel(self, job_id: str) -> None:
        self.links.cancel(job_id)

    def logs(self, job_id: str) -> bytes:
        return self.backing.logs(job_id)

    def image_id(self) -> str:
        return self.backing.image_id()

    def rotate_key(self) -> tuple[str, int]:
        return self.backing.rotate_key()

    def close(self) -> None:
        self.link.stop()
        self.links.close()
        self._thread.join(timeout=30)
        self.server.stop(0).wait()
        self.backing.close()
        self.site_log.close()
        self.site_audits.close()
        self.gateway_log.close()
