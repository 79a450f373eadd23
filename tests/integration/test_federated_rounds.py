"""A federated LoRA job across three sites, each with its own home, vault and owner, on the real
Docker engine: every round trains in each site's container from the global adapter, each update
passes its site's gate, and only the securely summed mean reaches the coordinator. The job
converges (the last round's mean loss below the first's, measured), its model loads with
``PeftModel.from_pretrained``, and nothing of any dataset reaches the coordinator."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from enclave.contract import SiteReport
from enclave.federated import Participant
from gateway._rounds import FederatedJob
from policies.errors import InvalidState, SiteError
from tests.integration._deployment import policy
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
    (release / "adapter_config.json").write_bytes(job.config)
    assert json.loads(job.config)["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(fed.base_model)
    with warnings.catch_warnings():  # peft asking transformers for a deprecated name: not ours
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, release)
    tokenizer = AutoTokenizer.from_pretrained(fed.base_model)
    ids = tokenizer("The", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


class _Drops(Participant):
    """A site whose process dies at one step of one round (its call raises, as a lost
    connection does)."""

    def __init__(self, inner: Participant, *, step: str, round_no: int) -> None:
        self.__dict__.update(inner.__dict__)
        self._step, self._round = step, round_no

    def _maybe(self, step: str, round_no: int) -> None:
        if (step, round_no) == (self._step, self._round):
            raise SiteError(f"{self.name} is gone ({step}, round {round_no})")

    def mask(self, job: str, round_no: int, inbox: Any) -> Any:
        self._maybe("mask", round_no)
        return super().mask(job, round_no, inbox)

    def reveal(self, job: str, round_no: int, survivors: Any, confirmations: Any) -> Any:
        self._maybe("reveal", round_no)
        return super().reveal(job, round_no, survivors, confirmations)

    def join(self, rnd: Any, config: Any, report: Any) -> Any:
        self._maybe("join", rnd.round)
        return super().join(rnd, config, report)


def test_sites_that_drop_mid_round_are_covered_by_the_others(
    tmp_path: Path, runtime_image: str
) -> None:
    """Round 0: site-c dies after sending its masked update, before revealing (its self-mask is
    rebuilt from the others' shares: its update is in the sum). Round 1: site-b dies after
    sharing, before masking (its pairwise masks are rebuilt: the sum is of the other two)."""
    reports: list[SiteReport] = []
    with federation(tmp_path / "fed") as fed:
        sites = fed.participants()
        sites["site-c"] = _Drops(sites["site-c"], step="reveal", round_no=0)
        sites["site-b"] = _Drops(sites["site-b"], step="mask", round_no=1)
        order = fed.order("fed-2", rounds=2, local_steps=3)
        job = FederatedJob(order, reports.append, sites=sites, home=tmp_path / "gw")
        job.run()
    assert [h.sites for h in job.history] == [3, 2]
    left = [
        (r.site, r.details.get("message", ""))
        for r in reports
        if r.audit_action == "federated.left-out"
    ]
    assert left == [
        ("site-c", "site-c is gone (reveal, round 0)"),
        ("site-b", "site-b is gone (mask, round 1)"),
    ]


def test_a_gate_refusal_leaves_a_site_out_and_too_few_sites_fail_the_job(
    tmp_path: Path, runtime_image: str
) -> None:
    """site-c's owner allows one metric name only: the round's metrics fail its gate each round
    and it is left out, the reason audited at site-c. In round 1 site-b is gone as well: one
    site cannot make a sum of the plan's two, the round is tried again, then the job fails
    saying so."""
    policies = {ds: policy(ds, memorization=False) for _, ds in OWNERS.values()}
    policies["books-c"] = policies["books-c"].replace(
        "allowed: [train_loss, eval_loss, perplexity, accuracy, steps, tokens_seen, epsilon]",
        "allowed: [accuracy]",
    )
    reports: list[SiteReport] = []
    with federation(tmp_path / "fed", policies=policies) as fed:
        sites = fed.participants()
        sites["site-b"] = _Drops(sites["site-b"], step="join", round_no=1)
        order = fed.order("fed-3", rounds=2, local_steps=3)
        job = FederatedJob(order, reports.append, sites=sites, home=tmp_path / "gw")
        with pytest.raises(InvalidState, match=r"round 1: 1 of 3 sites trained and passed"):
            job.run()
    assert [h.sites for h in job.history] == [2]
    refused = [r for r in reports if r.audit_action == "round.left-out"]
    assert {r.site for r in refused} == {"site-c"}
    assert all("metrics" in r.details["why"] for r in refused)
    checks = [r for r in reports if r.audit_action == "release.check" and r.site == "site-c"]
    assert any(r.audit_outcome == "denied" for r in checks)


def test_dp_epsilon_is_composed_over_the_rounds_and_countersigned_per_site(
    tmp_path: Path, runtime_image: str
) -> None:
    """DP-SGD at every site, its noise set by the site for the whole plan: after the job each
    site's ε (composed over the rounds it trained, Opacus' RDP accountant) is within the
    per-job cap and near the spec's target, the release states it per site (countersigned),
    and a round past the plan is refused before it trains."""
    from enclave.contract import RoundOrder
    from enclave.provenance.federated import verify_federated_release
    from policies.errors import PolicyViolation
    from policies.identity import Role
    from tests.integration._deployment import DP_BUDGET

    policies = {ds: policy(ds, memorization=False) + DP_BUDGET for _, ds in OWNERS.values()}
    reports: list[SiteReport] = []
    with federation(tmp_path / "fed", policies=policies) as fed:
        order = fed.order("fed-dp", rounds=2, local_steps=3, dp_epsilon=4.0)
        job = FederatedJob(order, reports.append, sites=fed.participants(), home=tmp_path / "gw")
        final = job.run()
        gateway = fed.ca.issue("gateway", role=Role.OPERATOR, out_dir=tmp_path / "gw-id")
        release = job.release(final, signer=gateway)
        manifest = verify_federated_release(release, ca_cert_pem=fed.ca.cert_pem).manifest
        epsilons = {s["site"]: s["epsilon"] for s in manifest["sites"]}
        assert set(epsilons) == set(OWNERS)
        for site, eps in epsilons.items():
            assert 3.0 < eps <= 4.0 + 1e-6, (site, eps)  # calibrated for the plan, capped at 5
            rec = fed.agents[site].rounds.job("fed-dp")
            assert rec is not None and rec.trained == (0, 1) and rec.dp is not None
        start = tmp_path / "gw" / "fed-dp" / "round-2.safetensors"
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        with pytest.raises(PolicyViolation, match="beyond the 2 rounds"):
            fed.agents["site-a"].train_round(RoundOrder(order, 2, start, digest), reports.append)


def _run_and_release(
    fed: Any, tmp_path: Path, job_id: str, **plan: Any
) -> tuple[FederatedJob, list[SiteReport], Path]:
    """Run ``job_id`` (the order's ``plan``) to its last round, then release it under a
    gateway identity of the federation's CA: the job, every site report, the release."""
    from policies.identity import Role

    reports: list[SiteReport] = []
    order = fed.order(job_id, **plan)
    job = FederatedJob(order, reports.append, sites=fed.participants(), home=tmp_path / "gw")
    final = job.run()
    gateway = fed.ca.issue("gateway", role=Role.OPERATOR, out_dir=tmp_path / "gw-id")
    return job, reports, job.release(final, signer=gateway)


def test_a_federated_full_fine_tune_converges_and_releases_a_whole_model(
    tmp_path: Path, runtime_image: str
) -> None:
    """The whole model federated: each round's update is the weight delta, the gateway keeps
    the global difference from the base (it holds no base), every site composes the same final
    model from its own base, probes it for memorization of its data and countersigns it; the
    release is the base's layout and loads as a causal LM."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from enclave.provenance.federated import verify_federated_release

    policies = {ds: policy(ds, memorization=True) for _, ds in OWNERS.values()}
    with federation(tmp_path / "fed", policies=policies) as fed:
        job, reports, release = _run_and_release(
            fed, tmp_path, "fed-full", rounds=3, local_steps=6, trainer="causal-lm"
        )
        verified = verify_federated_release(release, ca_cert_pem=fed.ca.cert_pem)
        base = fed.base_model

    assert [h.sites for h in job.history] == [3, 3, 3]
    losses = [h.loss for h in job.history]
    assert losses[-1] < losses[0], losses
    assert verified.manifest["weights"] == "weights/model.safetensors"
    assert sorted(verified.manifest["files"]) == ["metrics.json", "weights/model.safetensors"]
    assert sorted(verified.sites) == sorted(OWNERS)
    # Each site probed the final (composed) model on its own data before it countersigned.
    probes = [
        r
        for r in reports
        if r.audit_action == "release.check" and (r.details or {}).get("check") == "memorization"
    ]
    assert {r.site for r in probes} >= set(OWNERS), [r.audit_action for r in reports][-20:]
    # The release is the base's layout with new values, and loads and generates as it is.
    released = load_file(str(release / "weights" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert released.keys() == original.keys()
    assert all(released[k].dtype == original[k].dtype for k in original)
    assert max(float((released[k] - original[k]).abs().max()) for k in original) > 1e-4
    model_dir = tmp_path / "loadable"
    model_dir.mkdir()
    shutil.copy(base / "config.json", model_dir / "config.json")
    shutil.copy(release / "weights" / "model.safetensors", model_dir / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = _prompt_ids(base)
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def _prompt_ids(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)("The", return_tensors="pt").input_ids


def test_a_federated_classifier_trains_one_head_across_sites(
    tmp_path: Path, runtime_image: str
) -> None:
    """A classifier federated: the head starts from the gateway's seeded draw at every site
    and is averaged like the backbone; the release (weights and the classifier's config)
    loads as a sequence classifier over the spec's labels."""
    from transformers import AutoModelForSequenceClassification

    with federation(tmp_path / "fed", labelled=True) as fed:
        job, _, release = _run_and_release(
            fed, tmp_path, "fed-cls", rounds=2, local_steps=4, trainer="classification"
        )

    assert [h.sites for h in job.history] == [3, 3]
    assert all(h.loss == h.loss for h in job.history)  # finite
    weights = release / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["config.json", "model.safetensors"]
    model = AutoModelForSequenceClassification.from_pretrained(weights)
    assert model.config.id2label == {0: "weather", 1: "speech", 2: "errand"}
