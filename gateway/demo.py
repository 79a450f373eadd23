"""``sealroom demo``: the whole story, end to end, on the embedded default deployment.

Three people and an operator, each with their own certificate, talk to a real gateway over
mTLS on a loopback port; the job trains in a real container next to the encrypted data:

1. the operator creates the CA, issues identities and registers a tiny base model (its
   tokenizer trained on a *public* generated corpus, not on the protected data);
2. the data owner registers a generated books corpus and writes its policy;
3. the model team submits a causal-LM fine-tune; the data owner approves it;
4. the job trains in the enclave; the team watches its progress;
5. the release gate passes; the team downloads the release and verifies it offline;
6. the compliance officer exports the audit log and verifies it offline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from enclave.audit import VerifyResult, verify_export
from enclave.identity import IdentityFiles
from enclave.models import ModelStore
from enclave.provenance import verify_release
from gateway.client import Client
from gateway.identity import CertificateAuthority
from gateway.server import build
from policies.identity import Role
from trainers.basemodel import create_base_model
from trainers.synthetic import corpus, write_corpus

SPEC = """\
name: books-finetune
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: style adaptation research
hyperparameters:
  max_steps: {steps}
  learning_rate: 0.003
  batch_size: 8
  block_size: 64
  seed: 0
resources: {{cpus: 2, memory_mb: 4096, timeout_s: 900}}
"""


def policy_text() -> str:
    """The example policy for the books corpus (policies/examples/books.yaml)."""
    from importlib.resources import files

    return (files("policies") / "examples" / "books.yaml").read_text()


def export_and_verify(compliance: Client, home: Path, dest: Path) -> VerifyResult:
    """The compliance officer's step: export the gateway's audit log and verify it offline
    with the gateway's public key alone."""
    from cryptography.hazmat.primitives import serialization

    compliance.audit_export(dest)
    pub = serialization.load_pem_public_key((home / "gateway" / "audit-signing.pub").read_bytes())
    return verify_export(dest, public_key=pub)  # type: ignore[arg-type]


def run_demo(*, workdir: Path | None, keep: bool, as_json: bool, steps: int = 40) -> int:
    """Run the demo; returns a process exit code (0: every step held)."""
    console = Console(stderr=as_json, highlight=False)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sealroom-demo-")) if workdir is None else workdir
    home = tmp / "home"
    summary: dict[str, Any] = {}

    def step(n: int, who: str, what: str) -> None:
        console.print(f"[bold cyan]{n}.[/] [bold]{who}[/]: {what}")

    try:
        step(1, "operator", "creates the deployment CA and issues identities")
        ca = CertificateAuthority.init(home / "ca")
        ids = home / "identities"
        people = {
            "olivia": (Role.DATA_OWNER, "library"),
            "theo": (Role.MODEL_TEAM, "model-team"),
            "carol": (Role.COMPLIANCE, "audit"),
        }
        files: dict[str, IdentityFiles] = {}
        for name, (role, team_name) in people.items():
            files[name] = ca.issue(name, role=role, team=team_name, out_dir=ids)
            console.print(f"   {name}: {role.value} (team {team_name})")

        step(1, "operator", "creates a tiny base model locally and registers it in the site")
        public = corpus(documents=40, seed=1000)
        with tempfile.TemporaryDirectory() as mtmp:
            model_dir = create_base_model(Path(mtmp) / "tiny-lm", texts=public, seed=0)
            base = ModelStore(home / "site" / "models").register("tiny-lm", model_dir)
        console.print(f"   tiny-lm: {len(base.layout)} tensors, sha256 {base.sha256[:16]}")

        running = build(home, address="localhost:0")
        address = f"localhost:{running.port}"
        console.print(f"   gateway + local site up on {address} (mTLS, client certs required)")
        try:
            owner = Client(address, files["olivia"])
            team = Client(address, files["theo"])
            compliance = Client(address, files["carol"])

            step(2, "data owner", "registers a generated books corpus (encrypted at rest)")
            data_dir = tmp / "books"
            write_corpus(data_dir, documents=24, seed=7)
            ds = owner.register_dataset("books", data_dir, description="generated novels")
            console.print(
                f"   books v{ds.version}: {len(ds.files)} files, {ds.size} bytes, "
                f"root {ds.root_hash[:16]}"
            )
            pol = owner.put_policy("books", policy_text())
            console.print(f"   policy v{pol.version} ({pol.sha256[:16]})")

            step(3, "model team", "submits a causal-LM fine-tune")
            job = team.submit(SPEC.format(steps=steps))
            console.print(f"   {job.id}: {job.state}")
            step(3, "data owner", "reviews and approves the job")
            job = owner.decide(job.id, approve=True, reason="research use, within policy")
            console.print(f"   {job.id}: {job.state} (binding {job.approvals[0].binding[:16]})")

            step(4, "model team", "watches the job train in the enclave")
            last_state = ""
            for event in team.watch(job.id, timeout=1800):
                if event.progress is not None:
                    at, total, loss = event.progress
                    if at == total or at % 10 == 0:
                        console.print(f"   step {at}/{total} loss {loss:.3f}")
                elif event.state != last_state:
                    last_state = event.state
                    console.print(
                        f"   {event.state}" + (f": {event.reason}" if event.reason else "")
                    )
            job = team.job(job.id)
            summary["job"] = {
                "id": job.id,
                "state": job.state,
                "metrics": dict(job.metrics),
                "image_id": job.image_id,
            }
            if job.state != "RELEASED":
                console.print(f"[bold red]job ended {job.state}[/]: {'; '.join(job.reasons)}")
                return 1
            console.print(f"   released metrics: {dict(job.metrics)}")

            step(5, "model team", "downloads the release and verifies it offline")
            release = tmp / "release"
            team.download_release(job.id, release)
            verify_release(release, ca_cert_pem=ca.cert_pem)
            manifest = json.loads((release / "manifest.json").read_text())
            artifacts = sorted(a["path"] for a in manifest["artifacts"])
            console.print(f"   signature and hashes verify: {artifacts}")
            summary["release"] = {"dir": str(release), "artifacts": artifacts}

            step(6, "compliance", "exports the audit log and verifies it offline")
            verified = export_and_verify(compliance, home, tmp / "audit.jsonl")
            reads = compliance.audit_query(job_id=job.id, action="data.read")
            console.print(
                f"   {verified.size} records verify; the job read "
                f"{len({r.event.file for r in reads})} files of books"
            )
            summary["audit"] = {"records": verified.size, "files_read": len(reads)}
            for c in (owner, team, compliance):
                c.close()
        finally:
            running.stop()
        elapsed = time.monotonic() - started
        summary["seconds"] = round(elapsed, 1)
        console.print(f"[bold green]demo complete[/] in {elapsed:.0f} s")
        if as_json:
            print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    finally:
        if not keep and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
