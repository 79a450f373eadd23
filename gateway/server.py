"""Running the gateway: one process with the gateway and one local enclave site (the default),
serving remote sites too (``sealroom site join``: they dial in over the site link).

Layout of ``$SEALROOM_HOME`` (default ``~/.sealroom``)::

    ca/                 ca.pem, ca.key (0600)              -- ``sealroom ca init``
                        crl.pem (revoked certificates)     -- ``sealroom ca revoke``
    identities/         NAME.pem, NAME.key                 -- ``sealroom ca issue``
    gateway/            server identity, audit signing key, state.db, audit.db, bundles/, releases/,
                        links/ (leases.db: remote sites' leases; releases they pushed, until the
                        dispatcher takes them)
    site/               the local site: vault, model store, runs, logs, release-signing identity

The server speaks only TLS with client certificates required and verified against the
deployment CA; :mod:`gateway._auth` wraps every handler.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sealroom.v1 import gateway_pb2_grpc, site_pb2_grpc

from enclave.audit import AuditEvent, AuditLog
from enclave.contract import Site, StoredDataset
from enclave.federated import RoundSite
from enclave.identity import IdentityFiles
from enclave.secretfile import ensure_secret, write_secret
from gateway._auth import AuthInterceptor
from gateway._federation import Sites
from gateway._linkservicer import SiteLinkServicer
from gateway._roundlink import RoundMailbox
from gateway._servicer import GatewayServicer
from gateway._siteaudit import SiteAudits
from gateway._sitelink import HEARTBEAT_S, LEASE_S, SiteLinks
from gateway.core import Gateway
from gateway.identity import CRL_FILE, PUBLIC_MODE, CertificateAuthority, RevocationList
from gateway.store import Store
from policies.identity import Principal, Role

DEFAULT_ADDRESS = "localhost:7443"
MAX_MESSAGE = 8 * 1024 * 1024
SERVER_THREADS = 128


def default_home() -> Path:
    return Path(os.environ.get("SEALROOM_HOME", Path.home() / ".sealroom"))


def _new_signing_key() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The audit log's signing key (created once, mode 0600), its public half beside it."""
    loaded = serialization.load_pem_private_key(
        ensure_secret(path, _new_signing_key), password=None
    )
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 key")
    public = path.with_suffix(".pub")
    if not public.exists():  # first start, or a crash between the two writes
        write_secret(
            public,
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            mode=PUBLIC_MODE,
        )
    return loaded


@dataclass
class Running:
    gateway: Gateway
    server: grpc.Server
    port: int
    ca_cert: Path
    site: Site | None
    """The gateway's own local site (None when it serves remote sites only)."""
    links: SiteLinks
    site_audits: SiteAudits
    """The gateway's copy of each remote site's audit log."""

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        self.gateway.stop()
        self.site_audits.close()
        self.gateway.store.close()
        self.gateway.audit.close()


def server_identity(home: Path) -> IdentityFiles:
    ca = CertificateAuthority.load(home / "ca")
    gw = home / "gateway"
    cert, key = gw / "gateway.pem", gw / "gateway.key"
    if not cert.exists():
        return ca.issue(
            "gateway", role=Role.OPERATOR, out_dir=gw, server_names=("localhost", "127.0.0.1")
        )
    return IdentityFiles(cert=cert, key=key, ca_cert=ca.cert_path)


def build(
    home: Path,
    *,
    site: Site | None = None,
    address: str = DEFAULT_ADDRESS,
    workers: int = 1,
    max_queued: int = 100,
    gpus: int = 0,
    container_runtime: str = "runc",
    warm_containers: int = 0,
    local_site: bool = True,
    lease_s: float = LEASE_S,
    heartbeat_s: float = HEARTBEAT_S,
    max_release_bytes: int = 8 << 30,
) -> Running:
    """Build and start the gateway (and, unless given one, the local site) on ``address``.
    ``gpus``, ``container_runtime`` and ``warm_containers`` configure the local site: the GPUs
    it may grant a job, the OCI runtime its containers run under (runc; runsc or kata where
    installed) and the containers it keeps started ahead of jobs (:mod:`enclave._warm`)."""
    gw_dir = home / "gateway"
    gw_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = server_identity(home)
    audit = AuditLog(gw_dir / "audit.db", signing_key=_signing_key(gw_dir / "audit-signing.key"))
    store = Store(gw_dir / "state.db")
    if site is None and local_site:
        # Not for a cycle: enclave.agent pulls in torch (~1.5 s), which a gateway built around
        # another site (the tests, a remote site) must not pay for.
        from enclave.agent import DEFAULT_LIMITS, SiteAgent, signer_dir

        limits = dataclasses.replace(
            DEFAULT_LIMITS,
            gpus=gpus,
            runtime=container_runtime,
            warm_containers=warm_containers,
        )
        ca = CertificateAuthority.load(home / "ca")
        site_root = home / "site"
        name = "local-site"
        signer = ca.site_signer(name, out_dir=signer_dir(site_root))
        site = SiteAgent.open(site_root, name=name, signer=signer, limits=limits)
    links = SiteLinks(gw_dir / "links", lease_s=lease_s, heartbeat_s=heartbeat_s)
    rounds = RoundMailbox()
    sites = Sites(
        site,
        links,
        locate=lambda name, version: store.dataset(name, version).site,
        rounds=rounds,
        local_rounds=_local_rounds(site),
        federated_home=gw_dir / "federated",
        signer=identity,
    )
    gateway = Gateway(
        home=gw_dir,
        store=store,
        audit=audit,
        site=sites,
        workers=workers,
        max_queued=max_queued,
        ca_cert_pem=identity.ca_cert.read_bytes(),
    )

    def audit_fn(principal: Principal, action: str, **kw: object) -> int:
        return gateway.record(principal, action, **kw)  # type: ignore[arg-type]

    cert, key, ca_pem = identity.read()
    # Read now (a list that does not verify stops the start), and again whenever it changes.
    revoked = RevocationList(home / "ca" / CRL_FILE, ca_cert_pem=ca_pem)
    # Each remote site holds a thread for its long poll (PullWork): room for them beside the
    # clients' calls.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_THREADS),
        interceptors=[AuthInterceptor(audit_fn, revoked=revoked)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    site_audits = SiteAudits(gw_dir / "sites", record=gateway.record, ca_cert_pem=ca_pem)
    gateway_pb2_grpc.add_GatewayServicer_to_server(
        GatewayServicer(gateway, links=links, site_audits=site_audits), server
    )
    ca = CertificateAuthority.load(home / "ca")

    def push_dataset(site_name: str, owner: str, stored: StoredDataset, description: str) -> None:
        gateway.push_dataset(
            site=Principal(site_name, Role.SITE),
            owner=owner,
            stored=stored,
            description=description,
            is_owner=lambda name: ca.has_issued(name, Role.DATA_OWNER),
        )

    site_pb2_grpc.add_SiteLinkServicer_to_server(
        SiteLinkServicer(
            links,
            ca_cert_pem=ca_pem,
            max_release_bytes=max_release_bytes,
            push_dataset=push_dataset,
            site_audits=site_audits,
            rounds=rounds,
        ),
        server,
    )
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca_pem, require_client_auth=True
    )
    port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    gateway.start()
    server.start()
    audit.append(
        AuditEvent(
            principal="gateway",
            role=Role.OPERATOR.value,
            action="gateway.start",
            outcome="ok",
            details={"address": address, "port": port},
        )
    )
    _audit_issuance(audit, CertificateAuthority.load(home / "ca"))
    return Running(
        gateway=gateway,
        server=server,
        port=port,
        ca_cert=identity.ca_cert,
        site=site,
        links=links,
        site_audits=site_audits,
    )


def _local_rounds(site: Site | None) -> RoundSite | None:
    """The local site's part in federated rounds (a :class:`SiteAgent` has one)."""
    train = getattr(site, "train_round", None)
    if site is None or train is None:
        return None
    from enclave.federated import Participant

    return Participant(
        name=site.name,
        train=train,
        layout=site.round_layout,  # type: ignore[attr-defined]
        finish=site.countersign,  # type: ignore[attr-defined]
        rounds=site.rounds,  # type: ignore[attr-defined]
        identity=site.signer,  # type: ignore[attr-defined]
    )


def _audit_issuance(audit: AuditLog, ca: CertificateAuthority) -> None:
    """Record every identity the CA issued that the log does not hold yet (``sealroom ca
    issue`` runs offline, beside the CA key; the gateway audits it when it next starts)."""
    recorded = {
        r.event.details.get("serial") for r in audit.query(action="identity.issue", limit=10**9)
    }
    for rec in ca.issued():
        if rec["serial"] not in recorded:
            audit.append(
                AuditEvent(
                    principal="ca",
                    role=Role.OPERATOR.value,
                    action="identity.issue",
                    outcome="ok",
                    details=rec,
                )
            )
