"""The Slurm test cluster the Slurm runtime's tests run on (``enclave/image/ensure-slurm.sh``,
issue 18): one controller and two nodes on this host, node-b in a network of its own as a
second machine would be; munge authentication. Jobs route by node name and by feature, two run
on two nodes at once, and one is cancelled both pending and running. These show the cluster;
the Slurm runtime's own tests build on it."""

from __future__ import annotations

import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

NODES = ("node-a", "node-b")


def _run(*argv: str, timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (argv, done.stderr)
    return done.stdout.strip()


def _state(job: str) -> str:
    out = _run("scontrol", "show", "job", job, "-o")
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))


def _until(job: str, states: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (state := _state(job)) not in states:
        assert time.monotonic() < deadline, (job, state)
        time.sleep(0.2)
    return state


@pytest.mark.parametrize("node", NODES)
def test_a_job_runs_on_the_node_named_and_on_the_node_of_a_feature(
    slurm_cluster: str, node: str
) -> None:
    where = "echo $SLURMD_NODENAME"
    assert _run("srun", "-p", slurm_cluster, "-w", node, "sh", "-c", where) == node
    assert _run("srun", "-p", slurm_cluster, "-C", node, "sh", "-c", where) == node


def test_node_b_is_on_a_network_of_its_own(slurm_cluster: str) -> None:
    addrs = {
        node: _run("srun", "-p", slurm_cluster, "-w", node, "ip", "-4", "-o", "addr", "show")
        for node in NODES
    }
    assert "10.213.0.1/" in addrs["node-a"] and "10.213.0.2/" not in addrs["node-a"]
    assert "10.213.0.2/" in addrs["node-b"] and "10.213.0.1/" not in addrs["node-b"]


def test_two_jobs_run_on_two_nodes_at_once_and_cancel_pending_or_running(
    slurm_cluster: str,
) -> None:
    jobs = [
        _run("sbatch", "--parsable", "-o", "/dev/null", "-p", slurm_cluster, "-w", n, "--exclusive",
             "--wrap", "sleep 30")
        for n in NODES
    ]  # fmt: skip
    try:
        for job in jobs:
            assert _until(job, {"RUNNING"}) == "RUNNING"
        nodes = {_run("squeue", "-h", "-j", j, "-o", "%N") for j in jobs}
        assert nodes == set(NODES)
        # A third, exclusive on a busy node, waits; cancelled while pending it never runs.
        pending = _run("sbatch", "--parsable", "-o", "/dev/null", "-p", slurm_cluster,
                       "-w", "node-a", "--exclusive", "--wrap", "true")  # fmt: skip
        assert _state(pending) == "PENDING"
        _run("scancel", pending)
        assert _until(pending, {"CANCELLED"}) == "CANCELLED"
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], check=False)
    for job in jobs:  # cancelled while running
        assert _until(job, {"CANCELLED"}) == "CANCELLED"
