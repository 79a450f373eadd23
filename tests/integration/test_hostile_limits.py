"""A job at its limits ends as the job's failure, not the site's: a fork bomb, ten times.

The attack (issue 13, item 5): a fork bomb held at the process limit until the timeout. The
reviewers' engine then failed to kill it ("tried to kill container, but did not receive an exit
event"): the job ended in ERROR well past its timeout, with the engine's URL and the container's
ID in the team's reason, and no logs kept. Here the bomb runs ten times in a row on the real
engine. Every other run, the engine's kill is made to fail exactly that way (the call is
answered with that error, the container left running), so the backend has to kill the bomb
itself through its cgroup; the other runs take the engine's own kill. Each must end as the
job's failure (KILLED_TIMEOUT, a fixed reason for the team) within the timeout and a bounded
grace, with its logs, and leave no container behind.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from enclave.agent import _failure
from enclave.runtime import MANAGED_LABEL, DockerRuntime, RunState
from tests.integration.test_hostile_jobs import ENDLESS_FORK_BOMB, attack, make_site

pytestmark = pytest.mark.docker

RUNS = 10
TIMEOUT_S = 5.0
KILL_GRACE_S = 2.0
BOUND_S = TIMEOUT_S + 3 * KILL_GRACE_S + 5.0
"""The timeout, the three kill steps and room for the engine's start and the log read."""
VOCABULARY = {
    "failed: non-zero exit",
    "failed: resource limit",
    "failed: timeout",
    "failed: out of memory",
    "failed: stopped",
}


class KillThatFails:
    """The engine's kill as the reviewers' engine answered it: it waits, then fails with 500,
    having killed nothing. Installed on a client of its own, so whatever calls the kill (the
    backend, or the SDK's container objects) gets it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, container: Any, signal: Any = None) -> None:
        import docker

        self.calls += 1
        container_id = getattr(container, "id", container)
        time.sleep(0.5)
        response = requests.Response()
        response.status_code = 500
        response.reason = "Internal Server Error"
        response.url = f"http+docker://localhost/v1.41/containers/{container_id}/kill"
        raise docker.errors.APIError(
            "",
            response,
            f"Cannot kill container: {container_id}: tried to kill container, but did not "
            "receive an exit event",
        )


def test_fork_bomb_at_the_pids_limit_ten_times_ends_failed_with_logs_and_nothing_left(
    docker_client: Any, runtime_image: str, tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import docker

    broken = docker.from_env()
    failing_kill = KillThatFails()
    broken.api.kill = failing_kill
    runtimes = {
        True: DockerRuntime(broken, kill_grace_s=KILL_GRACE_S),
        False: DockerRuntime(docker_client, kill_grace_s=KILL_GRACE_S),
    }
    took: list[float] = []
    for i in range(RUNS):
        hard = i % 2 == 0
        site = make_site(tmp_path / f"run-{i}")
        t0 = time.monotonic()
        with attack(
            runtimes[hard],
            runtime_image,
            site,
            test_labels,
            ENDLESS_FORK_BOMB,
            pids=32,
            timeout_s=TIMEOUT_S,
        ) as ran:
            status, logs, container_id = ran.status, ran.logs, ran.container_id
        took.append(time.monotonic() - t0)
        assert status.state is RunState.KILLED_TIMEOUT, (i, status)
        assert status.at_pids_limit, (i, status)
        assert "limit of 32 processes" in status.reason  # the owners' detail, for the audit
        # Ended by the cgroup kill, never left for forced removal.
        assert "removed by force" not in status.reason, (i, status)
        assert b"bombing" in logs, i  # the owner keeps them
        assert took[-1] < BOUND_S, (i, took)
        reason = _failure(status)
        assert reason in VOCABULARY and reason.startswith("failed:")
        assert "unix://" not in reason and "http" not in reason
        assert container_id not in reason and container_id[:12] not in reason
        assert not re.search(r"[0-9a-f]{12,}|\d", reason)
        left = docker_client.containers.list(
            all=True,
            filters={"label": [f"{MANAGED_LABEL}=true", f"org.sealroom.job={ran.handle.job_id}"]},
        )
        assert left == [], i
    broken.close()
    assert failing_kill.calls == RUNS // 2  # every other run met an engine that cannot kill
    print(f"fork bomb x{RUNS}: seconds from start to removal {[round(t, 1) for t in took]}")
