"""``custom_code: private`` end to end: the real gateway, its site and Docker (issue 13, item 3).

A dataset whose policy takes a team's graph (``custom_code: private``) and sets both the
memorization probe and a DP budget. A benign LoRA-style graph, exported with ``torch.export``
and sent as the bundle's ``program.pt2``, is trained by the site's DP-SGD trainer and
released: the weights are exactly the graph's trainable parameters (the layout the site
computed from the bundle, not from the output), the memorization check records that DP bounds
the release instead of the probe, and the ε in the signed manifest and the metrics is the
site's. The attack: the same archive with a weight stored as a pickle that runs a shell
command when unpickled (what ``torch.export.load`` would do). The job ends FAILED, the owner's
logs show the graph was refused, and the command ran neither in the container (its echo is
not in the logs) nor on the site's host (its marker file never appears). A graph whose node
calls a Python function instead of an aten operator fails the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policies.channels import TeamReason
from tests.integration._deployment import DP_BUDGET, Dataset, Deployment, policy, running
from tests.unit._private_graph import (
    TRAINABLE,
    AdapterLM,
    export_graph,
    graph_bundle,
    with_node_target,
    with_pickled_weight,
)
from trainers.weights import tensor_layout

pytestmark = pytest.mark.docker

BLOCK = 16
TARGET = 4.0
SPEC = """\
name: {name}
datasets: [graph-books]
base_model: tiny-lm
trainer: private
purpose: testing
hyperparameters: {{dp_epsilon: 4.0, max_steps: 4, batch_size: 8, block_size: 16}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
"""


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, runtime_image: str) -> Iterator[Deployment]:
    # With the memorization probe: a graph passes it only as DP-bounded.
    graphs = policy("graph-books", custom_code="private") + DP_BUDGET
    datasets = [Dataset("graph-books", graphs, description="graphs under DP only")]
    with running(tmp_path_factory.mktemp("deployment"), datasets) as d:
        yield d


@pytest.fixture(scope="module")
def graph(dep: Deployment) -> AdapterLM:
    """The team's model over the base model's vocabulary (its tokenizer feeds the graph)."""
    config = json.loads((dep.home.parent / "tiny-lm" / "config.json").read_text())
    return AdapterLM(int(config["vocab_size"]))


@pytest.fixture(scope="module")
def program(graph: AdapterLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_graph(graph, BLOCK, tmp_path_factory.mktemp("graph") / "program.pt2")


def _run(dep: Deployment, name: str, code: Path) -> Any:
    with dep.client("theo") as team, dep.client("olivia") as owner:
        job = team.submit(SPEC.format(name=name), bundle=code)
        assert job.state == "PENDING_APPROVAL", job
        owner.decide(job.id, approve=True, reason="test")
        for _ in team.watch(job.id, timeout=300):
            pass
        return team.job(job.id)


def test_a_benign_graph_is_released_as_its_trainable_parameters_with_the_sites_epsilon(
    dep: Deployment, graph: AdapterLM, program: Path, tmp_path: Path
) -> None:
    job = _run(dep, "graph", graph_bundle(tmp_path / "graph.tar.gz", program))
    assert job.state == "RELEASED", job
    with dep.client("theo") as team:
        dest = team.download_release(job.id, tmp_path / "release")
    released = tensor_layout(dest / "weights" / "model.safetensors")
    # Exactly the graph's trainable parameters: nothing of its frozen base, nothing added.
    assert set(released) == TRAINABLE
    assert released == {
        n: ("BF16", tuple(p.shape))  # in the policy's release dtype
        for n, p in graph.named_parameters()
        if p.requires_grad
    }
    manifest = json.loads((dest / "manifest.json").read_text())
    (gate,) = manifest["gates"]
    checks = {c["name"]: c for c in gate["checks"]}
    site_epsilon = checks["dp"]["figures"]["epsilon"]
    assert 0.9 * TARGET < site_epsilon <= TARGET * (1 + 1e-5)
    skipped = checks["memorization"]["figures"]["skipped"]
    assert skipped == f"bounded by DP, epsilon={site_epsilon:.4g}"
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["epsilon"] == pytest.approx(site_epsilon, rel=1e-3)
    assert dep.running.gateway._epsilon_spent(["graph-books"])["graph-books"] == site_epsilon


def test_a_graph_archive_whose_pickle_runs_a_command_fails_and_runs_nothing(
    dep: Deployment, program: Path, tmp_path: Path
) -> None:
    host_marker = tmp_path / "the-site-ran-the-bundle"
    # Run in the container, it would print PWNED (the quotes keep the word out of the archive)
    # and touch /tmp/pwned; run on the site's host, it would leave host_marker.
    command = f"echo PWN''ED; touch /tmp/pwned {host_marker}"
    hostile = with_pickled_weight(program, tmp_path / "program.pt2", command)
    job = _run(dep, "pickle", graph_bundle(tmp_path / "hostile.tar.gz", hostile))
    assert job.state == "FAILED", job
    assert TeamReason.FAILED_EXIT in job.reasons, job.reasons
    with dep.client("olivia") as owner:
        logs = owner.logs(job.id).decode("utf-8", "replace")
    assert "GraphRefused" in logs, logs
    assert "PWNED" not in logs
    assert not host_marker.exists()


def test_a_graph_that_calls_a_python_function_fails_refused_by_the_loader(
    dep: Deployment, program: Path, tmp_path: Path
) -> None:
    """A node whose operator is ``torch.os.system`` (``torch.export.load`` resolves any
    ``torch.*`` attribute as a node's target): refused before the graph is built."""
    hostile = with_node_target(program, tmp_path / "program.pt2", "torch.os.system")
    job = _run(dep, "python-op", graph_bundle(tmp_path / "hostile.tar.gz", hostile))
    assert job.state == "FAILED", job
    with dep.client("olivia") as owner:
        logs = owner.logs(job.id).decode("utf-8", "replace")
    assert "GraphRefused" in logs and "not allowed" in logs, logs
