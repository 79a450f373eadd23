"""A federated LoRA job as the issue asks for it: a real gateway (``sealroom up``) and three
real site processes (``sealroom site join``), each with its own home, vault and owner, over
mTLS, on the real Docker engine. The team submits; every owner approves; each round trains at
every site from the global adapter, each update passes its site's gate, and the gateway sees
only the securely summed mean. The job converges, its release (signed by the gateway,
countersigned by every site after the memorization probe of the final model on its data)
verifies offline and loads with ``PeftModel.from_pretrained``; no byte of any corpus reaches
the gateway. A gateway killed mid-job (SIGKILL) and started again on its home and port goes on
from the last completed round, and no site trains a round twice."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave.provenance.federated import verify_federated_release
from tests.integration._federated_procs import CANARY, SITES, Federation

pytestmark = pytest.mark.docker


@pytest.fixture
def fed(tmp_path: Path, runtime_image: str) -> Iterator[Federation]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    f = Federation(tmp_path)
    try:
        yield f
    finally:
        f.close()


def test_a_federated_job_across_three_site_processes_releases_a_verified_model(
    fed: Federation, tmp_path: Path
) -> None:
    fed.start_gateway()
    fed.start_sites()
    job_id = fed.submit(rounds=2, local_steps=6)
    with fed.client("theo") as team:
        events = list(team.watch(job_id, timeout=900))
        final = team.job(job_id)
        assert final.state == "RELEASED", ([e.state for e in events], final.reasons)
        points = [e.progress for e in events if e.progress is not None]
        assert [p[:2] for p in points] == [(1, 2), (2, 2)]
        dest = team.download_release(job_id, tmp_path / "release")

    verified = verify_federated_release(dest, ca_cert_pem=fed.ca.cert_path.read_bytes())
    assert verified.sites == ("site-a", "site-b", "site-c") and verified.rounds == 2
    # Every round summed all three sites (the gateway's journal: the owners', not the team's).
    rounds = fed.journal(job_id)["rounds"]
    assert [r["sites"] for r in rounds] == [3, 3]  # type: ignore[index]
    # It converges: the second round's mean training loss (secure-summed) below the first's.
    losses = [r["loss"] for r in rounds]  # type: ignore[index]
    assert losses[1] < losses[0], losses
    assert [sorted(r) for r in verified.manifest["rounds"]] == [["round"], ["round"]]
    with fed.client("carol") as carol:  # each dataset's takedown report lists the release
        for _, ds in SITES.values():
            assert job_id in {r.job_id for r in carol.audit_report(ds).releases}, ds
    for canary in (CANARY.format(s).encode() for s in SITES):
        found = [p for p in fed.gw_home.rglob("*") if p.is_file() and canary in p.read_bytes()]
        assert found == []

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "site-a" / "tiny-lm")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, dest / "weights")
    assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) > 0


def test_a_gateway_killed_mid_job_goes_on_from_the_last_completed_round(
    fed: Federation, tmp_path: Path
) -> None:
    fed.start_gateway()
    fed.start_sites()
    job_id = fed.submit(rounds=3)
    deadline = time.monotonic() + 600
    while not fed.journal(job_id)["rounds"]:
        assert time.monotonic() < deadline, "round 0 never completed"
        time.sleep(0.1)
    before = fed.journal(job_id)["rounds"]
    assert fed.gateway is not None
    fed.gateway.kill()  # SIGKILL, as round 1 starts
    fed.start_gateway()  # the same home, the same port
    ended = fed.wait_state(job_id)
    assert ended.state == "RELEASED", getattr(ended, "details", ())
    after = fed.journal(job_id)["rounds"]
    assert len(after) == 3 and after[0] == before[0]  # round 0 kept, not run again
    for site in SITES:
        assert fed.trained(site, job_id) == [0, 1, 2], site  # no round trained twice
    with fed.client("theo") as team:
        dest = team.download_release(job_id, tmp_path / "release")
    assert verify_federated_release(dest, ca_cert_pem=fed.ca.cert_path.read_bytes()).rounds == 3
