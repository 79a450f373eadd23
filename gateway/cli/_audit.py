"""Compliance verbs (the audit log) and release verbs (download and offline verification)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from gateway.cli._common import STATE, JsonOpt, client, console, emit, errors, to_dict

audit_app = typer.Typer(help="The audit log (compliance).", no_args_is_help=True)
release_app = typer.Typer(help="Released models.", no_args_is_help=True)


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
    as_json: bool = JsonOpt,
) -> None:
    """Filter the audit log."""
    with errors(as_json), client() as c:
        records = c.audit_query(job_id=job, dataset=dataset, file=file, principal=principal,
                                role=role, action=action, outcome=outcome, since=since,
                                until=until, limit=limit)

        def text() -> None:
            t = Table("seq", "time", "principal", "action", "outcome", "job", "dataset", "file")
            for r in records:
                t.add_row(str(r.seq), r.time, f"{r.principal} ({r.role})", r.action, r.outcome,
                          r.job_id, r.dataset, r.file)
            console.print(t)

        emit(as_json, [to_dict(r) for r in records], text)


@audit_app.command("export")
def audit_export(dest: Path, as_json: bool = JsonOpt) -> None:
    """Export the log (JSON lines with a signed checkpoint) for offline verification."""
    with errors(as_json), client() as c:
        c.audit_export(dest)
        emit(as_json, {"export": str(dest)}, f"exported to {dest}")


@audit_app.command("verify")
def audit_verify(
    export: Path | None = typer.Argument(None, help="an export; default: the local log"),
    public_key: Path | None = typer.Option(None, help="the gateway's audit public key (PEM)"),
    as_json: bool = JsonOpt,
) -> None:
    """Recompute the log: names the first bad record if one was edited, removed or reordered."""
    from cryptography.hazmat.primitives import serialization

    from gateway.audit import AuditLog, verify_export

    with errors(as_json):
        key_path = public_key or STATE.home / "gateway" / "audit-signing.pub"
        key = serialization.load_pem_public_key(key_path.read_bytes())
        if export is None:
            log = AuditLog.open_readonly(STATE.home / "gateway" / "audit.db", public_key=key)
            result = log.verify()
            log.close()
        else:
            result = verify_export(export, public_key=key)  # type: ignore[arg-type]
        emit(as_json, {"valid": True, "size": result.size, "root": result.root_hex},
             f"audit log verifies: {result.size} records, root {result.root_hex[:16]}")


@release_app.command("download")
def release_download(job_id: str, dest: Path, as_json: bool = JsonOpt) -> None:
    """Download a job's release into DEST (then check it with `release verify`)."""
    with errors(as_json), client() as c:
        c.download_release(job_id, dest)
        files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        emit(as_json, {"job_id": job_id, "dest": str(dest), "files": files},
             f"release of {job_id} in {dest}: " + ", ".join(files))


@release_app.command("verify")
def release_verify(
    directory: Path,
    ca: Path | None = typer.Option(None, help="the deployment CA certificate (PEM)"),
    as_json: bool = JsonOpt,
) -> None:
    """Verify a release offline: site certificate, signature, every artifact's hash."""
    from enclave.provenance import verify_release

    with errors(as_json):
        ca_pem = (ca or STATE.home / "ca" / "ca.pem").read_bytes()
        v = verify_release(directory, ca_cert_pem=ca_pem)
        manifest = json.loads((directory / "manifest.json").read_text())
        emit(as_json, {"valid": True, "manifest": manifest},
             f"release verifies: job {manifest.get('job_id')}, signed by site "
             f"{getattr(v, 'site', '?')}, {len(manifest.get('artifacts', {}))} artifacts")
