"""``sealroom demo --sites N``: the federated story, on one machine.

A gateway with no data of its own, and N remote sites, each with its own home, its own data
owner and its own corpus, connected the way a remote site connects (``sealroom site join``:
mTLS, dialling out, leases; here each site's link runs on a thread of the demo's process):

1. the operator creates the CA, issues the people's identities and each site's two identities;
2. each site's owner registers a corpus *at the site* (only its metadata reaches the gateway)
   and writes its policy through the gateway, signed in their own client;
3. the model team submits one fine-tune per dataset; each owner approves theirs (signed);
4. each job runs at the site that keeps its data, which checks the owners' signatures first;
5. the team downloads each release and verifies it offline: each is signed by its own site;
6. the compliance officer sees each site's work in one audit log and verifies it offline; each
   site keeps its own log too, whose signed checkpoints the gateway's log records.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from enclave.agent import SiteAgent
from enclave.audit import AuditLog
from enclave.link import SiteLink, open_site_audit
from enclave.models import ModelStore
from enclave.owners import OwnerRecord, SiteDatasets
from enclave.provenance import verify_release
from gateway.client import Client
from gateway.demo import SPEC, export_and_verify, policy_text
from gateway.identity import CertificateAuthority
from gateway.server import build
from policies.identity import Role
from trainers.basemodel import create_base_model
from trainers.synthetic import corpus, write_corpus

OWNERS = ("olivia", "otto", "ophelia", "oren")
SITES = ("library", "hospital", "archive", "press")


def run_federated_demo(
    *, sites: int, workdir: Path | None, keep: bool, as_json: bool, steps: int = 20
) -> int:
    """Run the federated demo with ``sites`` sites (2 to 4); returns an exit code."""
    if not 2 <= sites <= len(SITES):
        raise ValueError(f"--sites: 2 to {len(SITES)}")
    console = Console(stderr=as_json, highlight=False)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sealroom-fed-")) if workdir is None else workdir
    home = tmp / "gateway-home"
    summary: dict[str, Any] = {"sites": {}}

    def step(n: int, who: str, what: str) -> None:
        console.print(f"[bold cyan]{n}.[/] [bold]{who}[/]: {what}")

    links: list[tuple[SiteLink, threading.Thread, SiteAgent]] = []
    logs: list[AuditLog] = []  # each site's own audit log
    running = None
    try:
        step(1, "operator", f"creates the CA, the people's identities and {sites} sites'")
        ca = CertificateAuthority.init(home / "ca")
        ids = home / "identities"
        people = {
            name: ca.issue(name, role=Role.DATA_OWNER, out_dir=ids) for name in OWNERS[:sites]
        }
        team_id = ca.issue("theo", role=Role.MODEL_TEAM, team="model-team", out_dir=ids)
        carol_id = ca.issue("carol", role=Role.COMPLIANCE, out_dir=ids)
        with tempfile.TemporaryDirectory() as mtmp:
            model_dir = create_base_model(
                Path(mtmp) / "tiny-lm", texts=corpus(documents=40, seed=1000), seed=0
            )
            running = build(home, address="localhost:0", local_site=False)
            address = f"localhost:{running.port}"
            console.print(f"   gateway up on {address}, no data of its own")
            for i, (owner, site) in enumerate(zip(OWNERS[:sites], SITES, strict=False)):
                site_home = tmp / f"{site}-home"
                tls = ca.issue(site, role=Role.SITE, out_dir=site_home / "identities")
                signer = ca.site_signer(site, out_dir=site_home / "identities")
                ModelStore(site_home / "site" / "models").register("tiny-lm", model_dir)
                step(2, f"{owner} at {site}", "registers a corpus in the site's own vault")
                record = OwnerRecord()
                agent = SiteAgent.open(
                    site_home / "site", name=site, signer=signer, owners=record.owner
                )
                datasets = record.datasets = SiteDatasets(site_home / "site", agent.vault)
                data = tmp / f"corpus-{site}"
                write_corpus(data, documents=12, seed=7 + i)
                name = f"{site}-texts"
                version = agent.vault.register(name, data, max_bytes=1 << 30, max_files=10_000)
                datasets.record(name, owner, f"generated texts kept at {site}")
                console.print(f"   {version.ref}: {len(version.files)} files, stays at {site}")
                site_log, site_log_cert = open_site_audit(site_home / "audit" / "audit.db", signer)
                logs.append(site_log)
                link = SiteLink(
                    agent,
                    address=address,
                    identity=tls,
                    state=site_home / "link",
                    image_id=agent.image_id(),
                    datasets=datasets.pushed,
                    audit=site_log,
                    audit_cert=site_log_cert,
                )
                thread = threading.Thread(target=link.serve, name=f"site-{site}", daemon=True)
                thread.start()
                links.append((link, thread, agent))
                if not link.connected.wait(60):
                    raise RuntimeError(f"site {site} did not connect")
        jobs: dict[str, str] = {}
        with Client(address, team_id) as team, Client(address, carol_id) as carol:
            for owner, site in zip(OWNERS[:sites], SITES, strict=False):
                name = f"{site}-texts"
                with Client(address, people[owner]) as c:
                    _wait_for(c, name)
                    c.put_policy(name, policy_text().replace("dataset: books", f"dataset: {name}"))
                    console.print(f"   {owner} signs the policy of {name}")
                step(3, "model team", f"submits a fine-tune on {name}")
                spec = SPEC.format(steps=steps).replace("[books]", f"[{name}]")
                job = team.submit(spec.replace("books-finetune", f"{site}-finetune"))
                with Client(address, people[owner]) as c:
                    c.decide(job.id, approve=True, reason="within policy")
                console.print(f"   {job.id}: approved by {owner} (signed in their client)")
                jobs[site] = job.id
            step(4, "sites", "each runs its job next to its own data")
            for site, job_id in jobs.items():
                for _ in team.watch(job_id, timeout=1800):
                    pass
                job = team.job(job_id)
                console.print(f"   {site}: {job_id} {job.state}")
                if job.state != "RELEASED":
                    console.print(f"[bold red]{job.state}[/]: {'; '.join(job.reasons)}")
                    return 1
                step(5, "model team", f"downloads the release from {site} and verifies it")
                release = team.download_release(job_id, tmp / f"release-{site}")
                verified = verify_release(release, ca_cert_pem=ca.cert_pem)
                if verified.site != site:
                    raise RuntimeError(f"the release of {job_id} is signed by {verified.site}")
                console.print(f"   signed by site {verified.site}; hashes verify")
                summary["sites"][site] = {"job": job_id, "state": job.state}
            step(6, "compliance", "one audit log of every site's work, verified offline")
            report = export_and_verify(carol, home, tmp / "audit.jsonl")
            by_site = {
                site: len(carol.audit_query(principal=site, action="container.start"))
                for site in jobs
            }
            checkpoints = {
                site: len(carol.audit_query(principal=site, action="site.checkpoint"))
                for site in jobs
            }
            console.print(f"   {report.size} records verify; containers started: {by_site}")
            console.print(f"   each site's own log, checkpointed into the gateway's: {checkpoints}")
            summary["audit"] = {
                "records": report.size,
                "container_starts": by_site,
                "site_checkpoints": checkpoints,
            }
        elapsed = time.monotonic() - started
        summary["seconds"] = round(elapsed, 1)
        console.print(f"[bold green]federated demo complete[/] in {elapsed:.0f} s")
        if as_json:
            print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    finally:
        for link, _, _ in links:
            link.stop()
        for _, thread, agent in links:
            thread.join(timeout=60)
            agent.close()
        for log in logs:
            log.close()
        if running is not None:
            running.stop()
        if not keep and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(client: Client, dataset: str) -> None:
    deadline = time.monotonic() + 60
    while not any(d.name == dataset for d in client.datasets()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway never heard of {dataset}")
        time.sleep(0.2)
