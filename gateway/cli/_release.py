"""Release verbs: download and offline verification; an owner's review of a held release."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from gateway.cli._common import STATE, JsonOpt, client, console, emit, errors, to_json

release_app = typer.Typer(help="Released models.", no_args_is_help=True)


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
    from enclave.provenance.federated import is_federated, verify_federated_release

    with errors(as_json):
        ca_pem = (ca or STATE.home / "ca" / "ca.pem").read_bytes()
        manifest = json.loads((directory / "manifest.json").read_text())
        if is_federated(directory):
            fed = verify_federated_release(directory, ca_cert_pem=ca_pem)
            emit(
                as_json,
                {"valid": True, "manifest": manifest},
                f"federated release verifies: job {fed.job_id}, {fed.rounds} rounds, signed by "
                f"the gateway and countersigned by {', '.join(fed.sites)}",
            )
            return
        v = verify_release(directory, ca_cert_pem=ca_pem)
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
