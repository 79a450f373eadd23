"""Compliance verbs (the audit log) and release verbs (download and offline verification; an
owner's review of a held release)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from gateway.cli._common import STATE, JsonOpt, client, console, emit, errors, to_json

if TYPE_CHECKING:
    from enclave.audit import SignedCheckpoint

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
        records = c.audit_query(
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
def audit_export(dest: Path, as_json: bool = JsonOpt) -> None:
    """Export the log (JSON lines with a signed checkpoint) for offline verification."""
    with errors(as_json), client() as c:
        c.audit_export(dest)
        emit(as_json, {"export": str(dest)}, f"exported to {dest}")


@audit_app.command("verify")
def audit_verify(
    export: Path | None = typer.Argument(None, help="an export; default: the local log"),
    public_key: Path | None = typer.Option(None, help="the gateway's audit public key (PEM)"),
    previous: Path | None = typer.Option(
        None,
        help="a checkpoint seen earlier (JSON from `audit checkpoint --json`, or a "
        "checkpoint line of an older export): check that this log extends it",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Recompute the log: names the first bad record if one was edited, removed or reordered;
    with --previous, proves the log still extends an earlier checkpoint."""
    from cryptography.hazmat.primitives import serialization

    from enclave.audit import AuditLog, verify_export

    with errors(as_json):
        key_path = public_key or STATE.home / "gateway" / "audit-signing.pub"
        key = serialization.load_pem_public_key(key_path.read_bytes())
        earlier = _load_checkpoint(previous) if previous is not None else None
        if export is None:
            log = AuditLog.open_readonly(STATE.home / "gateway" / "audit.db", public_key=key)  # type: ignore[arg-type]
            try:
                result = log.verify()
                if earlier is not None:
                    _extends(log, earlier, key)
            finally:
                log.close()
        else:
            result = verify_export(
                export,
                public_key=key,  # type: ignore[arg-type]
                previous=earlier,
            )
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


def _checkpoint(cp: SignedCheckpoint, public_key: Path | None) -> SignedCheckpoint:
    """``cp`` once its signature verifies under the gateway's key (raises CheckpointError)."""
    from cryptography.hazmat.primitives import serialization

    key_path = public_key or STATE.home / "gateway" / "audit-signing.pub"
    cp.verify(serialization.load_pem_public_key(key_path.read_bytes()))  # type: ignore[arg-type]
    return cp


@audit_app.command("checkpoint")
def audit_checkpoint(
    fresh: bool = typer.Option(False, help="publish a new checkpoint now"),
    public_key: Path | None = typer.Option(None, help="the gateway's audit public key (PEM)"),
    as_json: bool = JsonOpt,
) -> None:
    """The latest signed checkpoint (size, root, time), its signature checked."""
    with errors(as_json), client() as c:
        cp = c.audit_checkpoint(fresh=fresh)
        _checkpoint(cp, public_key)
        emit(
            as_json,
            to_json(cp),
            f"checkpoint: {cp.size} records, root {cp.root.hex()}, {cp.time} (signature verifies)",
        )


@audit_app.command("prove")
def audit_prove(
    seq: int = typer.Argument(..., help="the record to prove"),
    public_key: Path | None = typer.Option(None, help="the gateway's audit public key (PEM)"),
    as_json: bool = JsonOpt,
) -> None:
    """Prove that record SEQ is in the log the latest signed checkpoint vouches for."""
    from enclave.audit import verify_inclusion

    with errors(as_json), client() as c:
        cp = c.audit_checkpoint(fresh=True)
        signed = _checkpoint(cp, public_key)
        proof = c.audit_inclusion_proof(seq, cp.size)
        verify_inclusion(
            index=seq,
            size=cp.size,
            leaf=proof.leaf_hash,
            proof=list(proof.hashes),
            expected_root=signed.root,
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
    public_key: Path | None = typer.Option(None, help="the gateway's audit public key (PEM)"),
    as_json: bool = JsonOpt,
) -> None:
    """Prove that the log today extends an earlier checkpoint (nothing rewritten since)."""
    from enclave.audit import verify_consistency

    with errors(as_json), client() as c:
        cp = c.audit_checkpoint(fresh=True)
        signed = _checkpoint(cp, public_key)
        proof = c.audit_consistency_proof(old_size, cp.size)
        verify_consistency(
            old_size=old_size,
            new_size=cp.size,
            old_root=bytes.fromhex(old_root),
            new_root=signed.root,
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


@release_app.command("download")
def release_download(job_id: str, dest: Path, as_json: bool = JsonOpt) -> None:
    """Download a job's release into DEST (then check it with `release verify`)."""
    with errors(as_json), client() as c:
        c.download_release(job_id, dest)
        files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        emit(
            as_json,
            {"job_id": job_id, "dest": str(dest), "files": files},
            f"release of {job_id} in {dest}: " + ", ".join(files),
        )


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
        emit(
            as_json,
            {"valid": True, "manifest": manifest},
            f"release verifies: job {manifest.get('job_id')}, signed by site "
            f"{getattr(v, 'site', '?')}, {len(manifest.get('artifacts', {}))} artifacts",
        )


@release_app.command("review")
def release_review(job_id: str, as_json: bool = JsonOpt) -> None:
    """Show a held release (custom_code: reviewed): what its weights can carry, in bits, and
    the gate's checks (data owner)."""
    with errors(as_json), client() as c:
        r = c.review_release(job_id)

        def text() -> None:
            cap = r.capacity
            console.print(
                f"job {r.job_id}, release {r.release_id[:16]}…: the weights can carry up to "
                f"[bold]{cap.bits:,} bits[/] "
                f"({cap.elements:,} elements x "
                + ", ".join(f"{b} bits ({d})" for d, b in sorted(cap.bits_per_element.items()))
                + f" after the gate's re-quantisation and a scrub of {cap.scrub_bits} bits)"
            )
            table = Table("dataset", "check", "passed", "figures")
            for k in r.checks:
                figures = json.dumps(dict(k.figures), sort_keys=True)
                table.add_row(k.dataset, k.check, "yes" if k.passed else "NO", figures)
            console.print(table)
            console.print(
                f"reviewers: {', '.join(sorted(r.reviewers))}; approved by: "
                f"{', '.join(sorted(r.approved_by)) or 'nobody yet'}"
            )

        emit(as_json, to_json(r), text)


def _decide_release(job_id: str, *, approve: bool, reason: str, as_json: bool) -> None:
    with errors(as_json), client() as c:
        j = c.decide_release(job_id, approve=approve, reason=reason)
        emit(as_json, to_json(j), f"job {j.id}: {j.state}")


@release_app.command("approve")
def release_approve(
    job_id: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt
) -> None:
    """Release a held release after reviewing it (data owner)."""
    _decide_release(job_id, approve=True, reason=reason, as_json=as_json)


@release_app.command("reject")
def release_reject(
    job_id: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt
) -> None:
    """Reject a held release after reviewing it: the job ends REJECTED (data owner)."""
    _decide_release(job_id, approve=False, reason=reason, as_json=as_json)
