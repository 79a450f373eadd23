"""``sealroom site``: a remote site on its own machine, and the local site's keys.

On the site's machine, ``$SEALROOM_HOME`` is the site's own home: ``ca/ca.pem`` (the deployment
CA's certificate, copied from the operator: never its key), ``identities/NAME.pem|.key`` and
``NAME-signer.pem|.key`` (from ``sealroom ca issue NAME --role site`` at the operator),
``site/`` (the vault, models, runs: :class:`enclave.agent.SiteAgent`), ``audit/`` (the site's
own audit log, its checkpoints signed with the site's release-signing key and pushed to the
gateway) and ``link/`` (leases on record). ``site join`` dials out to the gateway and serves
until SIGTERM; ``site dataset register`` stores a dataset in this site's vault for one of the
deployment's data owners and, when the site can reach the gateway, tells it the version's
metadata (never its bytes); ``site policy pin`` records, for the owner, the oldest policy version
the site may run a dataset under; ``site audit-export`` exports the site's own log.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from enclave.identity import IdentityFiles
from gateway.cli._common import STATE, JsonOpt, emit, errors
from policies.errors import NotFound

if TYPE_CHECKING:
    from enclave.owners import SiteDatasets

site_app = typer.Typer(
    help="A remote site on its own machine; the local site's keys.", no_args_is_help=True
)
dataset_app = typer.Typer(help="Datasets kept at this site (data owner, at the site).")
site_app.add_typer(dataset_app, name="dataset")
policy_app = typer.Typer(help="The policy versions this site runs under (data owner, at the site).")
site_app.add_typer(policy_app, name="policy")


def _identity(name: str) -> tuple[IdentityFiles, IdentityFiles]:
    """The site's TLS identity and its release-signing identity, under this home."""
    ids, ca = STATE.home / "identities", STATE.home / "ca" / "ca.pem"
    tls = IdentityFiles(cert=ids / f"{name}.pem", key=ids / f"{name}.key", ca_cert=ca)
    signer = IdentityFiles(
        cert=ids / f"{name}-signer.pem", key=ids / f"{name}-signer.key", ca_cert=ca
    )
    for f in (tls.cert, tls.key, signer.cert, signer.key, ca):
        if not f.exists():
            raise NotFound(
                f"{f} is missing: issue the site's identity with `sealroom ca issue {name} "
                "--role site` and copy it, with the CA certificate (ca/ca.pem), to this home"
            )
    return tls, signer


def _site_datasets(root: Path) -> SiteDatasets:
    from enclave.owners import SiteDatasets
    from enclave.vault import Vault

    (root / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
    return SiteDatasets(root, Vault(root / "vault", site_key_path=root / "keys" / "site.key"))


@site_app.command("join")
def join(
    gateway_address: str = typer.Argument(..., help="the gateway's host:port"),
    name: str = typer.Option(..., help="this site's name (its certificate's)"),
    slots: int = typer.Option(1, min=1, help="runs this site takes at once"),
    runtime: str = typer.Option("runc", help="OCI runtime for job containers"),
    warm: int = typer.Option(0, min=0, help="containers kept started ahead of built-in jobs"),
    as_json: bool = JsonOpt,
) -> None:
    """Run this site: dial out to the gateway over mTLS, take leased jobs, run them here."""
    import dataclasses

    from enclave.agent import DEFAULT_LIMITS, SiteAgent
    from enclave.federated import Participant
    from enclave.link import SiteLink, open_site_audit
    from enclave.owners import OwnerRecord, SiteDatasets

    with errors(as_json):
        tls, signer = _identity(name)
        root = STATE.home / "site"
        limits = dataclasses.replace(DEFAULT_LIMITS, runtime=runtime, warm_containers=warm)
        record = OwnerRecord()  # the site's own record of owners, once the site is open
        site = SiteAgent.open(root, name=name, signer=signer, limits=limits, owners=record.owner)
        datasets = record.datasets = SiteDatasets(root, site.vault)
        audit, audit_cert = open_site_audit(STATE.home / "audit" / "audit.db", signer)
        link = SiteLink(
            site,
            address=gateway_address,
            identity=tls,
            state=STATE.home / "link",
            slots=slots,
            image_id=site.image_id(),
            datasets=datasets.pushed,
            audit=audit,
            audit_cert=audit_cert,
            rounds=Participant(
                name=name,
                train=site.train_round,
                layout=site.round_layout,
                finish=site.countersign,
                rounds=site.rounds,
                identity=signer,
            ),
        )
        serving = threading.Thread(target=link.serve, name="site-link")
        serving.start()
        emit(
            as_json,
            {"site": name, "gateway": gateway_address, "home": str(STATE.home)},
            f"site {name} serving gateway {gateway_address} (home {STATE.home})",
        )
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        with contextlib.suppress(KeyboardInterrupt):
            while serving.is_alive() and not done.wait(0.5):
                pass
        link.stop()
        serving.join()
        site.close()
        audit.close()


@dataset_app.command("register")
def dataset_register(
    name: str,
    directory: Path,
    owner: str = typer.Option(..., help="the data owner it belongs to (their issued name)"),
    description: str = typer.Option("", help="what it is"),
    gateway_address: str = typer.Option(
        None, "--gateway", help="tell this gateway now (else: when the site next joins)"
    ),
    site_name: str = typer.Option(None, "--name", help="this site's name (with --gateway)"),
    as_json: bool = JsonOpt,
) -> None:
    """Store DIRECTORY in this site's vault as the next version of NAME, for OWNER."""
    from enclave.agent import DEFAULT_LIMITS

    with errors(as_json):
        datasets = _site_datasets(STATE.home / "site")
        datasets.check_owner(name, owner)
        version = datasets.vault.register(
            name,
            directory,
            max_bytes=DEFAULT_LIMITS.dataset_bytes,
            max_files=DEFAULT_LIMITS.dataset_files,
        )
        datasets.record(name, owner, description)
        pushed = False
        if gateway_address:
            pushed = _push_now(gateway_address, site_name, datasets)
        emit(
            as_json,
            {
                "name": version.name,
                "version": version.version,
                "root_hash": version.root_hash,
                "files": len(version.files),
                "owner": owner,
                "pushed": pushed,
            },
            f"stored {version.ref} for {owner} ({len(version.files)} files, root "
            f"{version.root_hash[:16]})" + (", the gateway told" if pushed else ""),
        )


def _push_now(address: str, site_name: str | None, datasets: SiteDatasets) -> bool:
    from sealroom.v1 import site_pb2_grpc

    from enclave.link import channel, push_datasets

    if not site_name:
        raise NotFound("--gateway needs --name, the site's name, to call as the site")
    tls, _ = _identity(site_name)
    with channel(address, tls) as ch:
        push_datasets(site_pb2_grpc.SiteLinkStub(ch), datasets.pushed())
    return True


@policy_app.command("pin")
def policy_pin(
    dataset: str,
    version: int,
    owner: str = typer.Option(..., help="the data owner the dataset belongs to"),
    as_json: bool = JsonOpt,
) -> None:
    """Tell this site to run DATASET under policy VERSION or a later one, whatever orders the
    gateway sends: a gateway cannot then hold back a newer policy you wrote."""
    from enclave.sovereignty import PolicyBook

    with errors(as_json):
        root = STATE.home / "site"
        datasets = _site_datasets(root)
        if dataset not in datasets.owners():
            raise NotFound(f"no dataset {dataset} is kept at this site")
        datasets.check_owner(dataset, owner)
        held = PolicyBook.of_site(root).pin(dataset, version)
        emit(
            as_json,
            {"dataset": dataset, "version": held},
            f"this site runs {dataset} under policy version {held} or a later one",
        )


@site_app.command("audit-export")
def site_audit_export(
    dest: Path,
    name: str = typer.Option(..., help="this site's name (its certificate's)"),
    as_json: bool = JsonOpt,
) -> None:
    """Export this site's own audit log (up to its last signed checkpoint; the site may be
    running) and, beside it (DEST.signer.pem), the certificate of the key that signs it: check
    it against the gateway's with `audit verify DEST --site-cert DEST.signer.pem
    --gateway-export GATEWAY_EXPORT`."""
    import shutil

    from enclave.audit import AuditLog
    from enclave.provenance.verify import site_identity

    with errors(as_json):
        _, signer = _identity(name)
        _, key = site_identity(_load_cert(signer.cert))
        log = AuditLog.open_readonly(STATE.home / "audit" / "audit.db", public_key=key)
        try:
            cp = log.export(dest)
        finally:
            log.close()
        cert = dest.with_name(dest.name + ".signer.pem")
        shutil.copyfile(signer.cert, cert)
        emit(
            as_json,
            {"export": str(dest), "site": name, "size": cp.size, "signer_cert": str(cert)},
            f"exported site {name}'s log ({cp.size} records) to {dest}, its signing "
            f"certificate to {cert}",
        )


def _load_cert(path: Path) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


@site_app.command("list")
def site_list(as_json: bool = JsonOpt) -> None:
    """The remote sites the gateway has heard from (operator, compliance): version, runtime
    image, slots, when last heard from, and the jobs each holds."""
    from rich.table import Table

    from gateway.cli._common import client, console, to_json

    with errors(as_json), client() as c:
        sites = c.sites()
        if as_json:
            emit(True, [to_json(s) for s in sites], "")
            return
        table = Table("site", "connected", "last seen", "version", "slots", "running")
        for s in sites:
            table.add_row(
                s.name,
                "yes" if s.connected else "no",
                s.last_seen,
                s.version,
                str(s.slots),
                ", ".join(s.leases) or "-",
            )
        console.print(table)


@site_app.command("rotate-key")
def site_rotate_key(as_json: bool = JsonOpt) -> None:
    """Re-wrap every data key of the gateway's local site under a new site key (no data is
    re-encrypted; audited)."""
    from gateway.cli._common import client, to_json

    with errors(as_json), client() as c:
        r = c.rotate_site_key()
        emit(
            as_json,
            to_json(r),
            f"site {r.site}: new key {r.key_id}, {r.dataset_versions} data keys re-wrapped",
        )
