"""ε comes from the site, end to end: the real gateway, its site and Docker (issue 13, item 6).

A dataset whose policy requires differential privacy. An honest DP-SGD job is released and
charged the ε the site's accountant computed from the parameters the site set (recorded in the
signed manifest, the figure the gateway sums); the container trained with those parameters (the
ε it reports for itself agrees). A built-in job that asks for no DP-SGD is refused at the gate
(ε = +inf) and charges nothing, so a later honest job still runs. A reviewed custom job on a
dataset without DP that reports ``epsilon: -1000`` (the reviewers' attack: every later
submission on the dataset failed with InvalidInput) releases no ε of its own and moves no
budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._deployment import DP_BUDGET, Dataset, Deployment, bundle, policy, running

pytestmark = pytest.mark.docker

DP_SPEC = """\
name: {name}
datasets: [private-books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters:
  {{max_steps: 4, learning_rate: 0.003, batch_size: 4, block_size: 32, seed: 0{dp}}}
resources: {{cpus: 2, memory_mb: 3072, timeout_s: 300}}
"""
TARGET = 4.0


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, runtime_image: str) -> Iterator[Deployment]:
    datasets = [
        Dataset(
            "private-books",
            policy("private-books", memorization=False) + DP_BUDGET,
            documents=8,
            description="generated novels",
        ),
        Dataset(
            "scratch",
            policy("scratch", custom_code=True, memorization=False),
            documents=2,
            seed=8,
            description="custom code allowed, no DP",
        ),
    ]
    with running(tmp_path_factory.mktemp("deployment"), datasets) as d:
        yield d


def _run(dep: Deployment, spec: str, *, bundle_path: Path | None = None) -> object:
    with dep.client("theo") as team, dep.client("olivia") as owner:
        job = team.submit(spec, bundle=bundle_path)
        assert job.state == "PENDING_APPROVAL", job
        owner.decide(job.id, approve=True, reason="test")
        for event in team.watch(job.id, timeout=600):
            if event.state == "AWAITING_REVIEW":  # custom code: the owner reviews the release
                owner.review_release(job.id)
                owner.decide_release(job.id, approve=True, reason="test")
        return team.job(job.id)


def _charged(dep: Deployment) -> float:
    return dep.running.gateway._epsilon_spent(["private-books"])["private-books"]


def test_a_job_without_dp_is_refused_and_an_honest_dp_job_is_charged_the_sites_epsilon(
    dep: Deployment, tmp_path: Path
) -> None:
    liar = _run(dep, DP_SPEC.format(name="no-dp", dp=""))
    assert liar.state == "REJECTED", liar  # type: ignore[attr-defined]
    assert _charged(dep) == 0.0  # refused: nothing released, nothing charged

    honest = _run(dep, DP_SPEC.format(name="dp", dp=f", dp_epsilon: {TARGET}"))
    assert honest.state == "RELEASED", honest  # type: ignore[attr-defined]
    with dep.client("theo") as team:
        dest = team.download_release(honest.id, tmp_path / "release")  # type: ignore[attr-defined]
    manifest = json.loads((dest / "manifest.json").read_text())
    (gate,) = [g for g in manifest["gates"] if g["dataset"] == "private-books"]
    (dp,) = [c for c in gate["checks"] if c["name"] == "dp"]
    site_epsilon = dp["figures"]["epsilon"]
    assert 0.9 * TARGET < site_epsilon <= TARGET * (1 + 1e-5)
    assert _charged(dep) == site_epsilon
    released = json.loads((dest / "metrics.json").read_text())
    assert released["epsilon"] == pytest.approx(site_epsilon, rel=1e-3)  # the site's, rounded


NEGATIVE_EPSILON = """
from pathlib import Path

import torch
from pytorch_lightning import LightningModule
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, AutoTokenizer


class Module(LightningModule):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.model = AutoModelForCausalLM.from_pretrained(
            ctx.model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        self.tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir, local_files_only=True)

    def train_dataloader(self):
        ids = []
        for d in self.ctx.dataset_dirs:
            for f in sorted(Path(d).rglob("*.txt")):
                ids += self.tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]
        n = len(ids) // 32
        return DataLoader(TensorDataset(torch.tensor(ids[: n * 32]).view(n, 32)), batch_size=4)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.model(input_ids=x, labels=x).loss
        self.log("train_loss", loss)
        self.log("epsilon", -1000.0)  # "I spent less than nothing": a budget for everyone else
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)
"""

CUSTOM_SPEC = """\
name: {name}
datasets: [scratch]
base_model: tiny-lm
trainer: custom
entrypoint: "claim:Module"
purpose: testing
hyperparameters: {{max_steps: 2}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
"""


def test_a_released_negative_epsilon_moves_no_budget_and_blocks_no_later_submission(
    dep: Deployment, tmp_path: Path
) -> None:
    code = bundle(tmp_path / "claim.tar.gz", {"claim.py": NEGATIVE_EPSILON})
    job = _run(dep, CUSTOM_SPEC.format(name="claim"), bundle_path=code)
    assert job.state == "RELEASED", job  # type: ignore[attr-defined]
    assert "epsilon" not in dict(job.metrics)  # type: ignore[attr-defined]
    spent = dep.running.gateway._epsilon_spent(["scratch"])["scratch"]
    assert spent == 0.0
    with dep.client("theo") as team:  # before: InvalidInput for every later submission
        later = team.submit(CUSTOM_SPEC.format(name="later"), bundle=code)
        assert later.state == "PENDING_APPROVAL", later
