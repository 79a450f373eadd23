"""A federated LoRA job across three sites, each with its own home, vault and owner, on the real
Docker engine: every round trains in each site's container from the global adapter, each update
passes its site's gate, and only the securely summed mean reaches the coordinator. The job
converges (the last round's mean loss below the first's, measured), its model loads with
``PeftModel.from_pretrained``, and nothing of any dataset reaches the coordinator."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from enclave.contract import SiteReport
from gateway._rounds import FederatedJob
from tests.integration._federated import OWNERS, federation

pytestmark = pytest.mark.docker


def _gateway_bytes(home: Path, reports: list[SiteReport]) -> bytes:
    files = b"".join(p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file())
    return files + repr(reports).encode()


def test_a_federated_lora_job_converges_and_its_model_loads(
    tmp_path: Path, runtime_image: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reports: list[SiteReport] = []
    with federation(tmp_path / "fed") as fed:
        order = fed.order("fed-1", rounds=3, local_steps=6)
        job = FederatedJob(order, reports.append, sites=fed.participants(), home=tmp_path / "gw")
        final = job.run()
        books = {
            ds: b"".join(
                p.read_bytes() for p in sorted((tmp_path / "fed" / f"{ds}-source").iterdir())
            )
            for _, ds in OWNERS.values()
        }
        for name, agent in fed.agents.items():
            rec = agent.rounds.job("fed-1")
            assert rec is not None and rec.trained == (0, 1, 2) and rec.masked == (0, 1, 2), name

    assert [h.sites for h in job.history] == [3, 3, 3]
    losses = [h.loss for h in job.history]
    assert losses[-1] < losses[0], losses
    # The team's view: one point per round, the loss coarse; no site named in it.
    team = [r.progress for r in reports if r.progress is not None]
    assert [p[:2] for p in team] == [(1, 3), (2, 3), (3, 3)]
    assert not any(r.site for r in reports if r.progress is not None)

    # Custody: no document of any dataset (nor any 64-byte run of one) at the coordinator.
    seen = _gateway_bytes(tmp_path / "gw", reports)
    for ds, text in books.items():
        for i in range(0, len(text) - 64, 997):
            assert text[i : i + 64] not in seen, ds

    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(final, release / "adapter_model.safetensors")
    (release / "adapter_config.json").write_bytes(job.adapter_config)
    assert json.loads(job.adapter_config)["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(fed.base_model)
    with warnings.catch_warnings():  # peft asking transformers for a deprecated name: not ours
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, release)
    tokenizer = AutoTokenizer.from_pretrained(fed.base_model)
    ids = tokenizer("The", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
