"""A whole deployment for integration tests: CA, people, a base model, the gateway and its site.

:func:`deploy` builds what ``sealroom up`` builds, on ``localhost:0``, in a temporary home: the
deployment CA, one certificate per person, a tiny base model created locally and registered in
the site's model store, and the gateway with its embedded site (real Docker unless a runtime is
given). :func:`bundle` packs a code bundle from a mapping of file names to text.
"""

from __future__ import annotations

import io
import tarfile
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave.identity import IdentityFiles
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.identity import Role

PEOPLE: dict[str, tuple[Role, str]] = {
    "olivia": (Role.DATA_OWNER, "library"),
    "otto": (Role.DATA_OWNER, "hospital"),
    "theo": (Role.MODEL_TEAM, "model-team"),
    "mallory": (Role.MODEL_TEAM, "other-team"),
    "carol": (Role.COMPLIANCE, "audit"),
    "oscar": (Role.OPERATOR, "ops"),
}


@dataclass
class Deployment:
    home: Path
    ca: CertificateAuthority
    identities: dict[str, IdentityFiles]
    running: Any
    address: str

    def client(self, name: str, *, timeout_s: float = 60.0) -> Client:
        return Client(self.address, self.identities[name], timeout_s=timeout_s)

    def stop(self) -> None:
        self.running.stop()


def deploy(
    root: Path, *, site: Any | None = None, workers: int = 1, container_runtime: str = "runc"
) -> Deployment:
    from enclave.models import ModelStore
    from gateway.server import build
    from trainers.basemodel import create_base_model
    from trainers.synthetic import corpus

    home = root / "home"
    ca = CertificateAuthority.init(home / "ca")
    identities = {
        name: ca.issue(name, role=role, team=team, out_dir=home / "identities")
        for name, (role, team) in PEOPLE.items()
    }
    model_dir = create_base_model(root / "tiny-lm", texts=corpus(documents=20, seed=1000), seed=0)
    ModelStore(home / "site" / "models").register("tiny-lm", model_dir)
    running = build(
        home, site=site, address="localhost:0", workers=workers, container_runtime=container_runtime
    )
    return Deployment(home, ca, identities, running, f"localhost:{running.port}")


@dataclass(frozen=True)
class Dataset:
    """A generated corpus to register, and the policy text its owner (olivia) puts on it."""

    name: str
    policy: str
    documents: int = 4
    seed: int = 7
    description: str = ""


DP_BUDGET = "  differential_privacy:\n    epsilon_per_job: 5\n    epsilon_budget: 12\n"
"""Lines to append to :func:`policy` (its release section is last) for a DP budget."""


@contextmanager
def running(root: Path, datasets: Sequence[Dataset]) -> Iterator[Deployment]:
    """A deployment in ``root`` with ``datasets`` registered by olivia, stopped on exit."""
    from trainers.synthetic import write_corpus

    d = deploy(root)
    try:
        with d.client("olivia") as owner:
            for ds in datasets:
                source = root / f"{ds.name}-source"
                write_corpus(source, documents=ds.documents, seed=ds.seed)
                owner.register_dataset(ds.name, source, description=ds.description)
                owner.put_policy(ds.name, ds.policy)
        yield d
    finally:
        d.stop()


def bundle(dest: Path, files: Mapping[str, str]) -> Path:
    """A gzipped tar code bundle holding ``files`` (name -> source, dedented)."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, text in files.items():
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


def policy(
    dataset: str,
    *,
    custom_code: bool | str = False,
    mode: str = "manual",
    memorization: bool = True,
    teams: tuple[str, ...] = ("model-team",),
) -> str:
    """A policy for ``dataset``, the example's rules with the given changes. ``custom_code``
    is a bool (true: the legacy spelling of ``reviewed``) or a mode's name (``private``)."""
    code = custom_code if isinstance(custom_code, str) else str(custom_code).lower()
    memo = (
        """
      memorization:
        samples: 8
        prefix_tokens: 16
        suffix_tokens: 16
        threshold: 0.5
        near_verbatim_ratio: 0.1"""
        if memorization
        else ""
    )
    return (
        textwrap.dedent(f"""\
        schema: sealroom.policy/v1
        dataset: {dataset}
        expires: 2099-12-31
        access:
          teams: [{", ".join(teams)}]
          purposes: [testing]
        base_models: [tiny-lm]
        trainers:
          builtin: [causal-lm, causal-lm-lora, classification]
          custom_code: {code}
        resources: {{max_gpus: 0, max_cpus: 2, max_memory_mb: 4096, max_timeout_s: 600}}
        approval: {{mode: {mode}}}
        channels: {{time_quantum_s: 1}}
        release:
          artifacts: [weights, metrics]
          dtype: bfloat16
          metrics:
            allowed: [train_loss, eval_loss, perplexity, accuracy, steps, tokens_seen, epsilon]
            significant_digits: 4
            max_count: 7""")
        + textwrap.indent(textwrap.dedent(memo), "  ")
        + "\n"
    )
