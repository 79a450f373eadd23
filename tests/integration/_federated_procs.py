"""A federated deployment as processes: a gateway home with its CA and people, three site homes
each with its own owner's dataset, and ``sealroom up`` / ``sealroom site join`` started (and
the gateway killed and started again on its port). Shared by the federated end-to-end test and
``make bench``'s federated round."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from enclave.identity import IdentityFiles
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.identity import Role
from tests.integration._deployment import policy
from tests.integration._remote import Serving, sealroom, wait_for_dataset
from tests.integration._remote import site_home as make_site_home
from trainers.synthetic import write_corpus

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
hyperparameters: {{lora_r: 4, batch_size: 4, block_size: 32, learning_rate: 0.02, seed: 3}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
federation: {{rounds: {rounds}, local_steps: {local_steps}, min_sites: 2}}
"""


class Federation:
    """A gateway home with its CA and people, three site homes with a dataset each; the
    gateway and the sites started as processes, the gateway again on its port if killed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gw_home = root / "gateway-home"
        self.ca = CertificateAuthority.init(self.gw_home / "ca")
        self.people: dict[str, IdentityFiles] = {
            name: self.ca.issue(name, role=role, team=team, out_dir=self.gw_home / "identities")
            for name, (role, team) in {
                "olivia": (Role.DATA_OWNER, "library"),
                "otto": (Role.DATA_OWNER, "hospital"),
                "ophelia": (Role.DATA_OWNER, "archive"),
                "theo": (Role.MODEL_TEAM, "model-team"),
                "carol": (Role.COMPLIANCE, "audit"),
            }.items()
        }
        self.homes: dict[str, Path] = {}
        for i, (site, (owner, ds)) in enumerate(sorted(SITES.items())):
            self.homes[site] = make_site_home(root / site, self.ca, site)
            books = root / f"{ds}-source"
            write_corpus(books, documents=8, seed=60 + i)
            (books / "book-canary.txt").write_text(CANARY.format(site) * 8 + "\n")
            done = subprocess.run(
                sealroom(self.homes[site], "site", "dataset", "register", ds, str(books),
                         "--owner", owner, "--json"),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        self.port = 0
        self.gateway: Serving | None = None
        self.sites: list[Serving] = []

    def start_gateway(self) -> None:
        self.gateway = Serving(
            sealroom(self.gw_home, "up", "--address", f"localhost:{self.port}", "--json"),
            self.root / "gw.log",
        )
        self.port = int(str(self.gateway.doc["port"]))

    def start_sites(self) -> None:
        for site in SITES:
            self.sites.append(
                Serving(
                    sealroom(
                        self.homes[site],
                        "site",
                        "join",
                        f"localhost:{self.port}",
                        "--name",
                        site,
                        "--json",
                    ),
                    self.root / f"{site}.log",
                )
            )

    def client(self, who: str) -> Client:
        return Client(f"localhost:{self.port}", self.people[who])

    def submit(self, rounds: int, local_steps: int = 4) -> str:
        with self.client("theo") as team:
            for owner, ds in SITES.values():
                with self.client(owner) as c:
                    wait_for_dataset(c, ds)
                    c.put_policy(ds, policy(ds))  # the memorization probe included
            job = team.submit(SPEC.format(rounds=rounds, local_steps=local_steps))
            assert job.state == "PENDING_APPROVAL", job.reasons
            for owner, _ in SITES.values():
                with self.client(owner) as c:
                    c.decide(job.id, approve=True, reason="test")
            return job.id

    def wait_state(self, job_id: str, timeout: float = 900) -> object:
        deadline = time.monotonic() + timeout
        with self.client("theo") as team:
            while True:
                job = team.job(job_id)
                if job.state in {"RELEASED", "ERROR", "FAILED", "REJECTED"}:
                    return job
                assert time.monotonic() < deadline, job.state
                time.sleep(0.5)

    def journal(self, job_id: str) -> dict[str, object]:
        path = self.gw_home / "gateway" / "federated" / job_id / "journal.json"
        return json.loads(path.read_text()) if path.exists() else {"rounds": []}

    def trained(self, site: str, job_id: str) -> list[int]:
        record = json.loads(
            (self.homes[site] / "site" / "keys" / "federated-rounds.json").read_text()
        )
        return list(record[job_id]["trained"])

    def close(self) -> None:
        for s in [*self.sites, self.gateway]:
            if s is not None and s.proc.poll() is None:
                s.kill()
