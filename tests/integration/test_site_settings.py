"""The local site's settings reach the engine, and a site keeps to its own containers.

A site set to a runtime the engine does not have must not quietly fall back to runc: the job
ends in ERROR (the system's fault) with the engine's refusal, and no container ever started.
Sites sharing an engine each clean up only what they started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._deployment import Deployment, deploy, policy
from trainers.synthetic import write_corpus

pytestmark = pytest.mark.docker

SPEC = """\
name: runtime
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters: {max_steps: 1, batch_size: 2, block_size: 32, seed: 0}
resources: {cpus: 1, memory_mb: 1024, timeout_s: 120}
"""


@pytest.fixture
def dep(tmp_path: Path, runtime_image: str) -> Iterator[Deployment]:
    d = deploy(tmp_path, container_runtime="sealroom-no-such-runtime")
    with d.client("olivia") as owner:
        write_corpus(tmp_path / "books", documents=4, seed=7)
        owner.register_dataset("books", tmp_path / "books")
        owner.put_policy("books", policy("books", memorization=False))
    try:
        yield d
    finally:
        d.stop()


def test_a_runtime_the_engine_lacks_is_an_error_not_a_fallback(dep: Deployment) -> None:
    with (
        dep.client("theo") as team,
        dep.client("olivia") as owner,
        dep.client("carol") as compliance,
    ):
        job = team.submit(SPEC)
        owner.decide(job.id, approve=True, reason="test")
        for _ in team.watch(job.id, timeout=300):
            pass
        done = team.job(job.id)
        assert done.state == "ERROR", done
        # The team gets the fixed reason; the owners get the engine's refusal, naming it.
        assert list(done.reasons) == ["error: the site could not complete the run"]
        assert "sealroom-no-such-runtime" not in str(done)
        assert "sealroom-no-such-runtime" in " ".join(owner.job(job.id).details)
        actions = [r.event.action for r in compliance.audit_query(job_id=job.id)]
        assert "container.start" not in actions
        # The data was staged for it and destroyed again: nothing is left behind.
        assert "data.destroyed" in actions


def test_a_site_starting_leaves_another_sites_running_jobs_alone(
    tmp_path: Path, runtime_image: str, docker_client: Any
) -> None:
    """Two sites on one engine, with the same name: the second's start-up clean-up (which ends
    what a crashed agent of *its own* left running) must not end the first one's jobs; the first
    one's own restart does."""
    from enclave.agent import SiteAgent, signer_dir
    from enclave.runtime import ContainerSpec, DockerRuntime, RunState
    from gateway.identity import CertificateAuthority
    from tests.conftest import TEST_RUN_ID, TEST_RUN_LABEL

    ca = CertificateAuthority.init(tmp_path / "ca")

    def open_site(root: Path) -> SiteAgent:
        return SiteAgent.open(root, signer=ca.site_signer("local-site", out_dir=signer_dir(root)))

    first = open_site(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    rt = DockerRuntime(docker_client)
    handle = rt.prepare(
        ContainerSpec(
            image=runtime_image,
            job_id="job-a1",
            output_dir=out,
            memory_bytes=256 << 20,
            cpus=0.5,
            pids=64,
            tmp_bytes=16 << 20,
            timeout_s=120,
            command=("sleep", "120"),
            labels={**first.labels, TEST_RUN_LABEL: TEST_RUN_ID},
        )
    )
    rt.start(handle)
    try:
        assert rt.status(handle).state is RunState.RUNNING
        other = open_site(tmp_path / "b")  # same name, another site
        assert other.instance != first.instance
        assert rt.status(handle).state is RunState.RUNNING
        open_site(tmp_path / "a")  # the first site's agent, restarted
        assert rt.status(handle).state is RunState.REMOVED
    finally:
        rt.cleanup(handle)
