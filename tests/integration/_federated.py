"""Three sites of one deployment, each with its own home and vault (in this process, on the real
Docker engine), each holding one owner's dataset (text, or labelled examples); a federated
job's signed order over the three (LoRA, a full fine-tune or a classifier); the sites' parts in
its rounds. Shared by the federated tests."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from enclave.agent import SiteAgent, signer_dir
from enclave.contract import RunOrder
from enclave.federated import Participant
from enclave.identity import IdentityFiles
from enclave.runtime import DockerRuntime
from enclave.signatures import sign
from gateway.identity import CertificateAuthority
from policies import document
from policies.approval import ApprovalBinding
from policies.identity import Role
from policies.signing import approval_message, policy_message
from policies.spec import JobSpec, parse_spec
from tests.integration._deployment import policy
from trainers.basemodel import create_base_model
from trainers.synthetic import corpus, write_corpus, write_labelled

OWNERS = {
    "site-a": ("olivia", "books-a"),
    "site-b": ("otto", "books-b"),
    "site-c": ("oscar", "books-c"),
}

HYPERPARAMETERS = {
    "causal-lm-lora": "lora_r: 4, batch_size: 4, block_size: 32, learning_rate: 0.02, seed: 3",
    "causal-lm": "batch_size: 4, block_size: 32, learning_rate: 0.002, seed: 3",
    "classification": (
        "batch_size: 8, labels: 'weather,speech,errand', learning_rate: 0.005, seed: 3"
    ),
}
SPEC = """\
name: fed
datasets: [books-a, books-b, books-c]
base_model: tiny-lm
trainer: {trainer}
purpose: testing
hyperparameters: {{{hp}{dp}}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
federation:
  rounds: {rounds}
  local_steps: {local_steps}
  min_sites: 2
"""


@dataclass
class Federation:
    ca: CertificateAuthority
    owners: dict[str, IdentityFiles]
    agents: dict[str, SiteAgent]
    signers: dict[str, IdentityFiles]
    base_model: Path
    policies: dict[str, str]

    def participants(self) -> dict[str, Participant]:
        return {
            name: Participant(
                name=name,
                train=agent.train_round,
                layout=agent.round_layout,
                finish=agent.countersign,
                rounds=agent.rounds,
                identity=self.signers[name],
            )
            for name, agent in self.agents.items()
        }

    def order(
        self,
        job_id: str,
        *,
        rounds: int = 3,
        local_steps: int = 4,
        dp_epsilon: float = 0.0,
        trainer: str = "causal-lm-lora",
    ) -> RunOrder:
        """The order an honest gateway sends: every owner's signed policy and approval."""
        dp = f", dp_epsilon: {dp_epsilon}" if dp_epsilon else ""
        spec: JobSpec = parse_spec(
            SPEC.format(
                trainer=trainer,
                hp=HYPERPARAMETERS[trainer],
                rounds=rounds,
                local_steps=local_steps,
                dp=dp,
            )
        )
        datasets = tuple((ds, 1) for _, ds in OWNERS.values())
        owner_of = {ds: owner for owner, ds in OWNERS.values()}
        order = RunOrder(
            job_id=job_id,
            spec=spec,
            spec_sha256=spec.digest(),
            bundle=None,
            bundle_sha256="",
            datasets=datasets,
            policy_versions={ds: 1 for ds, _ in datasets},
            policy_documents=dict(self.policies),
            approval_binding="",
            approvals=tuple(owner_of[ds] for ds, _ in datasets),
            audit_root="0" * 64,
            dataset_owners=owner_of,
            policy_signatures={
                ds: self._sign(owner_of[ds], policy_message(ds, 1, self.policies[ds]))
                for ds, _ in datasets
            },
        )
        binding = ApprovalBinding.create(
            job_id=job_id,
            spec_digest=order.spec_sha256,
            bundle_digest=None,
            dataset_versions=dict(datasets),
            policies=[
                document.parse_policy(self.policies[ds], version=1).ref() for ds, _ in datasets
            ],
        ).digest()
        return dataclasses.replace(
            order,
            approval_binding=binding,
            approval_signatures={
                owner: self._sign(owner, approval_message(binding, "approve"))
                for owner in owner_of.values()
            },
        )

    def _sign(self, owner: str, message: bytes) -> tuple[str, str]:
        ids = self.owners[owner]
        return ids.cert.read_text(), sign(ids.key.read_bytes(), message)


def _tar(source: Path) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name)
    buf.seek(0)
    return buf


@contextmanager
def federation(
    root: Path, *, policies: dict[str, str] | None = None, labelled: bool = False
) -> Iterator[Federation]:
    """Three sites, each with its owner's dataset (a different generated corpus, or labelled
    examples) registered."""
    ca = CertificateAuthority.init(root / "ca")
    owners = {
        owner: ca.issue(owner, role=Role.DATA_OWNER, out_dir=root / "people")
        for owner, _ in OWNERS.values()
    }
    base = create_base_model(root / "tiny-lm", texts=corpus(documents=20, seed=1000), seed=0)
    texts = policies or {ds: policy(ds, memorization=False) for _, ds in OWNERS.values()}
    agents: dict[str, SiteAgent] = {}
    signers: dict[str, IdentityFiles] = {}
    try:
        for i, (site, (_, ds)) in enumerate(sorted(OWNERS.items())):
            home = root / site
            signers[site] = ca.site_signer(site, out_dir=signer_dir(home))
            agent = SiteAgent.open(home, name=site, signer=signers[site], runtime=DockerRuntime())
            agents[site] = agent
            agent.models.register("tiny-lm", base)
            source = root / f"{ds}-source"
            if labelled:
                write_labelled(source, count=80, seed=40 + i)
            else:
                write_corpus(source, documents=10, seed=40 + i)
            agent.store_dataset(ds, archive=_tar(source))
        yield Federation(ca, owners, agents, signers, base, texts)
    finally:
        for agent in agents.values():
            agent.close()
