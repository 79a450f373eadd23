"""Compliance verbs: the audit log, the gateway's own and its copy of each remote site's.

``--site NAME`` reads a remote site's log as the gateway holds it (:mod:`gateway._siteaudit`):
signed by the site's key, whose certificate comes from the gateway and is checked here against
the deployment CA. ``audit verify EXPORT --site-cert CERT --gateway-export GW`` checks offline
that a site's log and the gateway's tell one story (:func:`enclave.audit.cross_check`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from gateway.cli._common import STATE, JsonOpt, client, console, emit, errors, to_json
from policies.errors import InvalidInput, SignatureError

if TYPE_CHECKING:
    from enclave.audit import SignedCheckpoint

audit_app = typer.Typer(help="The audit log (compliance).", no_args_is_help=True)

SiteOpt = typer.Option("", "--site", help="a remote site's log, as the gateway holds it")
KeyOpt = typer.Option(None, help="the gateway's audit public key (PEM)")
CaOpt = typer.Option(None, help="the deployment CA certificate (PEM), for a site's key")


@audit_app.command("query")
def audit_query(
    job: str = typer.Option("", help="job id"),
    dataset: str = typer.Option("", help="dataset (name or name@vN)"),
    file: str = typer.Option("", help="a file of the dataset"),
    principal: str = typer.Option("", help="who"),
    role: str = typer.Option("", help="their role"),
    action: str = typer.Option("", help="e.g. rpc.SubmitJob, data.read, job.state"),
    outcome: str = typer.Option("", help="allowed, denied, ok, error"),
    since: str = typer.Option("", help="RFC 3339 time"),
    until: str = typer.Option("", help="RFC 3339 time"),
    limit: int = typer.Option(1000, help="at most this many records"),
    site: str = SiteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Filter the audit log (the gateway's, or with --site a remote site's)."""
    with errors(as_json), client() as c:
        records = c.audit_query(
            site=site,
            job_id=job,
            dataset=dataset,
            file=file,
            principal=principal,
            role=role,
            action=action,
            outcome=outcome,
            since=since,
            until=until,
            limit=limit,
        )

        def text() -> None:
            t = Table("seq", "time", "principal", "action", "outcome", "job", "dataset", "file")
            for r in records:
                e = r.event
                t.add_row(
                    str(r.seq),
                    r.time,
                    f"{e.principal} ({e.role})",
                    e.action,
                    e.outcome,
                    e.job_id or "",
                    e.dataset or "",
                    e.file or "",
                )
            console.print(t)

        emit(as_json, to_json(records), text)


@audit_app.command("export")
def audit_export(dest: Path, site: str = SiteOpt, as_json: bool = JsonOpt) -> None:
    """Export the log (JSON lines with a signed checkpoint) for offline verification. With
    --site, a remote site's log and, beside it (DEST.signer.pem), the certificate of the key
    that signs it: `audit verify DEST --site-cert DEST.signer.pem`."""
    with errors(as_json), client() as c:
        c.audit_export(dest, site=site)
        if not site:
            emit(as_json, {"export": str(dest)}, f"exported to {dest}")
            return
        cert = dest.with_name(dest.name + ".signer.pem")
        cert.write_text(c.site_checkpoint(site)[1])
        emit(
            as_json,
            {"export": str(dest), "site": site, "signer_cert": str(cert)},
            f"exported site {site}'s log to {dest}, its signing certificate to {cert}",
        )


@audit_app.command("verify")
def audit_verify(
    export: Path | None = typer.Argument(None, help="an export; default: the local log"),
    public_key: Path | None = KeyOpt,
    previous: Path | None = typer.Option(
        None,
        help="a checkpoint seen earlier (JSON from `audit checkpoint --json`, or a "
        "checkpoint line of an older export): check that this log extends it",
    ),
    site_cert: Path | None = typer.Option(
        None, help="EXPORT is a remote site's log: the certificate of the key that signs it"
    ),
    gateway_export: Path | None = typer.Option(
        None, help="with --site-cert: check the site's log against this export of the gateway's"
    ),
    ca: Path | None = CaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Recompute the log: names the first bad record if one was edited, removed or reordered;
    with --previous, proves the log still extends an earlier checkpoint; with --site-cert and
    --gateway-export, that a site's log holds every checkpoint of it the gateway recorded."""
    from enclave.audit import AuditLog, verify_export

    with errors(as_json):
        earlier = _load_checkpoint(previous) if previous is not None else None
        if site_cert is not None:
            if export is None:
                raise InvalidInput("--site-cert checks an export of a site's log: name it")
            _verify_site(export, site_cert, gateway_export, public_key, ca, earlier, as_json)
            return
        if gateway_export is not None:
            raise InvalidInput("--gateway-export checks a site's export: give its --site-cert")
        key = _gateway_key(public_key)
        if export is None:
            log = AuditLog.open_readonly(STATE.home / "gateway" / "audit.db", public_key=key)
            try:
                result = log.verify()
                if earlier is not None:
                    _extends(log, earlier, key)
            finally:
                log.close()
        else:
            result = verify_export(export, public_key=key, previous=earlier)
        extra = f", extends the checkpoint of {earlier.size}" if earlier is not None else ""
        tail = (
            f"; {result.unvouched} records after the last checkpoint, chain-checked only"
            if result.unvouched
            else ""
        )
        emit(
            as_json,
            {
                "valid": True,
                "size": result.size,
                "root": result.root_hex,
                "unvouched": result.unvouched,
                "checkpoint": result.checkpoint.to_dict() if result.checkpoint else None,
                "extends": earlier.to_dict() if earlier is not None else None,
            },
            f"audit log verifies: {result.size} records, root {result.root_hex[:16]}{extra}{tail}",
        )


def _verify_site(
    export: Path,
    site_cert: Path,
    gateway_export: Path | None,
    public_key: Path | None,
    ca: Path | None,
    earlier: Any,
    as_json: bool,
) -> None:
    """`audit verify` of a site's export, alone or against the gateway's."""
    from enclave.audit import cross_check, verify_export

    site, key = _site_key(site_cert.read_text(), ca)
    if gateway_export is None:
        result = verify_export(export, public_key=key, previous=earlier)
        emit(
            as_json,
            {"valid": True, "site": site, "size": result.size, "root": result.root_hex},
            f"site {site}'s audit log verifies: {result.size} records, root {result.root_hex[:16]}",
        )
        return
    both = cross_check(
        export,
        gateway_export,
        site=site,
        site_key=key,
        gateway_key=_gateway_key(public_key),
        extends=[earlier] if earlier is not None else [],
    )
    emit(
        as_json,
        {
            "valid": True,
            "site": site,
            "size": both.site.size,
            "root": both.site.root_hex,
            "gateway_size": both.gateway.size,
            "recorded": len(both.recorded),
            "latest_recorded": both.latest,
        },
        f"site {site}'s audit log verifies ({both.site.size} records) and the gateway's does "
        f"({both.gateway.size} records); the site's holds every one of the "
        f"{len(both.recorded)} checkpoints of it the gateway recorded (the latest at "
        f"{both.latest} records)",
    )


def _gateway_key(public_key: Path | None) -> Any:
    from cryptography.hazmat.primitives import serialization

    key_path = public_key or STATE.home / "gateway" / "audit-signing.pub"
    return serialization.load_pem_public_key(key_path.read_bytes())


def _site_key(cert_pem: str, ca: Path | None) -> tuple[str, Any]:
    """A site's name and audit key from its signing certificate, once the certificate is
    found to be the deployment CA's. Raises SignatureError or InvalidInput."""
    from cryptography import x509

    from enclave.provenance.verify import check_chain, load_ca, site_identity

    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as e:
        raise InvalidInput(f"not a PEM certificate ({e})") from e
    check_chain(cert, load_ca((ca or STATE.home / "ca" / "ca.pem").read_bytes()))
    return site_identity(cert)


def _load_checkpoint(path: Path) -> Any:
    """A checkpoint from a file: `audit checkpoint --json` output, an export's checkpoint
    line, or the plain form. Raises InvalidInput naming the file."""
    import base64
    import binascii

    from enclave.audit import SignedCheckpoint
    from policies.errors import AuditLogError, InvalidInput

    try:
        obj = json.loads(path.read_text())
        if isinstance(obj, dict) and "checkpoint" in obj:
            obj = obj["checkpoint"]
        if isinstance(obj, dict) and "root_hash" in obj:
            return SignedCheckpoint(
                size=int(obj["size"]),
                root=bytes.fromhex(obj["root_hash"]),
                time=str(obj["time"]),
                signature=base64.b64decode(obj["signature"], validate=True),
            )
        return SignedCheckpoint.from_dict(obj)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error, AuditLogError) as e:
        raise InvalidInput(f"--previous {path}: not a checkpoint ({e})") from e


def _extends(log: Any, earlier: Any, key: Any) -> None:
    """The local log's latest checkpoint extends ``earlier``: signature, then RFC 9162 proof."""
    from enclave.audit import verify_consistency

    earlier.verify(key)
    latest = log.checkpoint()
    if earlier.size > latest.size:
        from enclave.audit import ProofError

        raise ProofError(
            f"the earlier checkpoint vouches for {earlier.size} records; the "
            f"log's latest only for {latest.size}"
        )
    proof = log.consistency_proof(earlier.size, latest.size) if earlier.size else []
    verify_consistency(
        old_size=earlier.size,
        new_size=latest.size,
        old_root=earlier.root,
        new_root=latest.root,
        proof=proof,
    )


def _signed(
    c: Any, *, fresh: bool, site: str, public_key: Path | None, ca: Path | None
) -> SignedCheckpoint:
    """The log's latest checkpoint once its signature verifies under the gateway's key, or
    under a site's (raises CheckpointError); ``fresh``: a new one (the gateway's log only)."""
    if not site:
        cp: SignedCheckpoint = c.audit_checkpoint(fresh=fresh)
        cp.verify(_gateway_key(public_key))
        return cp
    cp, cert = c.site_checkpoint(site)  # one call: the checkpoint and its signer
    name, key = _site_key(cert, ca)
    if name != site:
        raise SignatureError(f"the log of site {site} is signed by site {name}'s key")
    cp.verify(key)
    return cp


@audit_app.command("checkpoint")
def audit_checkpoint(
    fresh: bool = typer.Option(False, help="publish a new checkpoint now"),
    public_key: Path | None = KeyOpt,
    site: str = SiteOpt,
    ca: Path | None = CaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """The latest signed checkpoint (size, root, time), its signature checked."""
    with errors(as_json), client() as c:
        cp = _signed(c, fresh=fresh, site=site, public_key=public_key, ca=ca)
        emit(
            as_json,
            to_json(cp),
            f"checkpoint: {cp.size} records, root {cp.root.hex()}, {cp.time} (signature verifies)",
        )


@audit_app.command("prove")
def audit_prove(
    seq: int = typer.Argument(..., help="the record to prove"),
    public_key: Path | None = KeyOpt,
    site: str = SiteOpt,
    ca: Path | None = CaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Prove that record SEQ is in the log the latest signed checkpoint vouches for."""
    from enclave.audit import verify_inclusion

    with errors(as_json), client() as c:
        cp = _signed(c, fresh=True, site=site, public_key=public_key, ca=ca)
        proof = c.audit_inclusion_proof(seq, cp.size, site=site)
        verify_inclusion(
            index=seq,
            size=cp.size,
            leaf=proof.leaf_hash,
            proof=list(proof.hashes),
            expected_root=cp.root,
        )
        emit(
            as_json,
            {
                "seq": seq,
                "tree_size": cp.size,
                "root": cp.root.hex(),
                "proof": [h.hex() for h in proof.hashes],
                "verified": True,
            },
            f"record {seq} is in the log of {cp.size} records (root {cp.root.hex()[:16]}…): "
            f"proof of {len(proof.hashes)} hashes verifies",
        )


@audit_app.command("consistency")
def audit_consistency(
    old_size: int = typer.Argument(..., help="the size of the earlier checkpoint"),
    old_root: str = typer.Argument(..., help="its root (hex)"),
    public_key: Path | None = KeyOpt,
    site: str = SiteOpt,
    ca: Path | None = CaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Prove that the log today extends an earlier checkpoint (nothing rewritten since)."""
    from enclave.audit import verify_consistency

    with errors(as_json), client() as c:
        cp = _signed(c, fresh=True, site=site, public_key=public_key, ca=ca)
        proof = c.audit_consistency_proof(old_size, cp.size, site=site)
        verify_consistency(
            old_size=old_size,
            new_size=cp.size,
            old_root=bytes.fromhex(old_root),
            new_root=cp.root,
            proof=list(proof.hashes),
        )
        emit(
            as_json,
            {"old_size": old_size, "new_size": cp.size, "verified": True},
            f"the log of {cp.size} records extends the one of {old_size}: proof verifies",
        )


@audit_app.command("report")
def audit_report(dataset: str, as_json: bool = JsonOpt) -> None:
    """Who accessed DATASET, which jobs read which files, which releases derive from it."""
    with errors(as_json), client() as c:
        r = c.audit_report(dataset)

        def text() -> None:
            t = Table(
                "principal",
                "role",
                "action",
                "outcome",
                "count",
                "first",
                "last",
                title=f"accesses to {dataset}",
            )
            for a in r.accesses:
                t.add_row(a.principal, a.role, a.action, a.outcome, str(a.count), a.first, a.last)
            console.print(t)
            for job_id, files in r.reads.items():
                console.print(
                    f"{job_id} read {len(files)} files: "
                    + ", ".join(files[:8])
                    + (" …" if len(files) > 8 else "")
                )
            for d in r.releases:
                console.print(
                    f"release of {d.job_id} (manifest {d.manifest_sha256[:16]}…) at "
                    f"{d.time} derives from {dataset}"
                )

        emit(as_json, to_json(r), text)
