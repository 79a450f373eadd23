"""A federated LoRA job as the issue asks for it: a real gateway (``sealroom up``) and three
real site processes (``sealroom site join``), each with its own home, vault and owner, over
mTLS, on the real Docker engine. The team submits; every owner approves; each round trains at
every site from the global adapter, each update passes its site's gate, and the gateway sees
only the securely summed mean. The job converges, its release (signed by the gateway,
countersigned by every site after the memorization probe of the final model on its data)
verifies offline and loads with ``PeftModel.from_pretrained``; no byte of any corpus reaches
the gateway."""

from __future__ import annotations

import os
import subprocess
import warnings
from contextlib import ExitStack
from pathlib import Path

import pytest

from enclave.identity import IdentityFiles
from enclave.provenance.federated import verify_federated_release
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.identity import Role
from tests.integration._deployment import policy
from tests.integration._remote import sealroom, serving, wait_for_dataset
from tests.integration._remote import site_home as make_site_home
from trainers.synthetic import write_corpus

pytestmark = pytest.mark.docker

SITES = {
    "site-a": ("olivia", "books-a"),
    "site-b": ("otto", "books-b"),
    "site-c": ("ophelia", "books-c"),
}
CANARY = "zq-canary-{}-federated-never-at-the-gateway"
SPEC = """\
name: fed-remote
datasets: [books-a, books-b, books-c]
base_model: tiny-lm
trainer: causal-lm-lora
purpose: testing
hyperparameters: {lora_r: 4, batch_size: 4, block_size: 32, learning_rate: 0.02, seed: 3}
resources: {cpus: 1, memory_mb: 2048, timeout_s: 300}
federation: {rounds: 2, local_steps: 4, min_sites: 2}
"""


def test_a_federated_job_across_three_site_processes_releases_a_verified_model(
    tmp_path: Path, runtime_image: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    gw_home = tmp_path / "gateway-home"
    ca = CertificateAuthority.init(gw_home / "ca")
    people: dict[str, IdentityFiles] = {
        name: ca.issue(name, role=role, team=team, out_dir=gw_home / "identities")
        for name, (role, team) in {
            "olivia": (Role.DATA_OWNER, "library"),
            "otto": (Role.DATA_OWNER, "hospital"),
            "ophelia": (Role.DATA_OWNER, "archive"),
            "theo": (Role.MODEL_TEAM, "model-team"),
        }.items()
    }
    homes = {}
    for i, (site, (owner, ds)) in enumerate(sorted(SITES.items())):
        homes[site] = make_site_home(tmp_path / site, ca, site)
        books = tmp_path / f"{ds}-source"
        write_corpus(books, documents=8, seed=60 + i)
        (books / "book-canary.txt").write_text(CANARY.format(site) * 8 + "\n")
        done = subprocess.run(
            sealroom(
                homes[site],
                "site",
                "dataset",
                "register",
                ds,
                str(books),
                "--owner",
                owner,
                "--json",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    with ExitStack() as stack:
        _, up = stack.enter_context(
            serving(
                sealroom(gw_home, "up", "--address", "localhost:0", "--json"), tmp_path / "gw.log"
            )
        )
        address = f"localhost:{up['port']}"
        for site in SITES:
            stack.enter_context(
                serving(
                    sealroom(homes[site], "site", "join", address, "--name", site, "--json"),
                    tmp_path / f"{site}.log",
                )
            )
        owners = {o: stack.enter_context(Client(address, people[o])) for o, _ in SITES.values()}
        team = stack.enter_context(Client(address, people["theo"]))
        for owner, ds in SITES.values():
            wait_for_dataset(owners[owner], ds)
            owners[owner].put_policy(ds, policy(ds))  # the memorization probe included
        job = team.submit(SPEC)
        assert job.state == "PENDING_APPROVAL", job.reasons
        for owner in owners.values():
            owner.decide(job.id, approve=True, reason="test")
        events = list(team.watch(job.id, timeout=900))
        final = team.job(job.id)
        assert final.state == "RELEASED", ([e.state for e in events], final.reasons)
        points = [e.progress for e in events if e.progress is not None]
        assert [p[:2] for p in points] == [(1, 2), (2, 2)]
        dest = team.download_release(job.id, tmp_path / "release")

    verified = verify_federated_release(dest, ca_cert_pem=ca.cert_path.read_bytes())
    assert verified.sites == ("site-a", "site-b", "site-c") and verified.rounds == 2
    assert all(r["sites"] == 3 for r in verified.manifest["rounds"])
    for canary in (CANARY.format(s).encode() for s in SITES):
        found = [p for p in gw_home.rglob("*") if p.is_file() and canary in p.read_bytes()]
        assert found == []

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "site-a" / "tiny-lm")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, dest / "weights")
    assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) > 0
