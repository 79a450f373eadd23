"""A job at its limits ends as the job's failure, not the site's (without an engine).

The attack: a fork bomb held at its process limit until the timeout, on an engine that then
cannot kill it ("tried to kill container, but did not receive an exit event"). Before, the kill's
error went up as the site's: the job ended in ERROR, late, with the engine's URL and the
container's ID in the team's reason, and no logs kept. A fake engine plays that engine here;
``tests/integration/test_hostile_limits.py`` does it with a real fork bomb on Docker.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from enclave.agent import _failure
from enclave.runtime import ContainerSpec, ContainerStatus, DockerRuntime, RunState
from enclave.runtime.docker import _edge
from policies.errors import RuntimeBackendError

IMAGE = "sha256:" + "ab" * 32
CONTAINER_ID = "3b73b5511ce6c3aaeff1a190469f4eaeaddfc954469864f98ecda9bd8cdd6d4a"
ENGINE_URL = f"http+docker://localhost/v1.41/containers/{CONTAINER_ID}/kill"
VOCABULARY = {
    "failed: non-zero exit",
    "failed: resource limit",
    "failed: timeout",
    "failed: out of memory",
    "failed: stopped",
}


def engine_error(status: int, text: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    response.url = ENGINE_URL
    response.reason = "Internal Server Error"
    return docker.errors.APIError("", response, text)


def assert_no_site_detail(text: str) -> None:
    assert "unix://" not in text and "http" not in text
    assert CONTAINER_ID not in text and CONTAINER_ID[:12] not in text
    assert not re.search(r"[0-9a-f]{12,}", text), text


class UnkillableEngine:
    """The parts of the docker SDK the backend uses, for one container that runs until it is
    removed by force: the engine's kill blocks, then fails as Docker does for a fork bomb."""

    def __init__(self) -> None:
        self.running = False
        self.gone = False
        self.kills = 0
        self.forced_removals = 0
        self.api = self
        self.images = self
        self.containers = self

    # images / containers
    def get(self, ref: str) -> Any:
        if self.gone:
            raise docker.errors.NotFound("No such container")
        return self

    @property
    def id(self) -> str:
        return CONTAINER_ID

    def create(self, **opts: Any) -> Any:
        return self

    def start(self) -> None:
        self.running = True

    def wait(self, container: str | None = None, timeout: float | None = None) -> None:
        time.sleep(min(timeout or 0.1, 0.1))
        raise requests.exceptions.ReadTimeout("read timed out")

    # api
    def inspect_container(self, container_id: str) -> dict[str, Any]:
        if self.gone:
            raise docker.errors.NotFound("No such container")
        status = "running" if self.running else "created"
        return {"State": {"Status": status, "Pid": 0, "ExitCode": 0, "OOMKilled": False}}

    def kill(self, container_id: str | None = None) -> None:
        self.kills += 1
        time.sleep(0.2)
        raise engine_error(
            500,
            f"Cannot kill container: {CONTAINER_ID}: tried to kill container, but did not "
            "receive an exit event",
        )

    def logs(self, container_id: str, **kw: Any) -> Any:
        return iter([b"bombing\n"])

    def remove_container(self, container_id: str, *, force: bool, v: bool) -> None:
        if self.gone:
            raise docker.errors.NotFound("No such container")
        self.forced_removals += force
        self.gone = True
        self.running = False


def spec(tmp_path: Path, *, timeout_s: float) -> ContainerSpec:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return ContainerSpec(
        image=IMAGE,
        job_id="bomb-1",
        output_dir=out,
        memory_bytes=1 << 28,
        cpus=1.0,
        pids=32,
        tmp_bytes=1 << 24,
        timeout_s=timeout_s,
    )


def test_fork_bomb_the_engine_cannot_kill_ends_killed_within_the_bound_with_its_logs(
    tmp_path: Path,
) -> None:
    engine = UnkillableEngine()
    grace = 0.3
    runtime = DockerRuntime(engine, kill_grace_s=grace)
    handle = runtime.prepare(spec(tmp_path, timeout_s=0.5))
    t0 = time.monotonic()
    runtime.start(handle)
    status = runtime.wait(handle, timeout_s=30)
    took = time.monotonic() - t0
    assert status.state is RunState.KILLED_TIMEOUT
    assert took < 0.5 + 3 * grace + 1.5, took  # the timeout, three kill steps, some slack
    assert engine.kills == 1 and engine.forced_removals == 1
    assert "removed by force" in status.reason  # the site's account, for its audit
    assert runtime.logs(handle, max_bytes=1024) == b"bombing\n"  # taken before the removal
    assert runtime.status(handle).state is RunState.KILLED_TIMEOUT
    runtime.cleanup(handle)  # nothing left to remove: no error
    assert runtime.status(handle).state is RunState.REMOVED
    reason = _failure(status)
    assert reason == "failed: timeout"
    assert_no_site_detail(reason)


def test_stop_of_a_container_the_engine_cannot_kill_still_ends_it(tmp_path: Path) -> None:
    engine = UnkillableEngine()
    runtime = DockerRuntime(engine, kill_grace_s=0.3)
    handle = runtime.prepare(spec(tmp_path, timeout_s=600))
    runtime.start(handle)
    t0 = time.monotonic()
    runtime.stop(handle)
    assert time.monotonic() - t0 < 3
    assert runtime.status(handle).state is RunState.STOPPED
    assert engine.gone


def test_engine_errors_name_no_engine_url_nor_container_id() -> None:
    with pytest.raises(RuntimeBackendError) as info, _edge("start the container of job bomb-1"):
        raise engine_error(500, f"Cannot start container {CONTAINER_ID}")
    assert_no_site_detail(str(info.value))
    assert ENGINE_URL in str(info.value.__cause__)  # kept for the site, on the cause


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (ContainerStatus(RunState.EXITED, 51, "exited with code 51"), "failed: non-zero exit"),
        (
            ContainerStatus(
                RunState.KILLED_TIMEOUT,
                137,
                "ran past its timeout of 45 s and was killed; it had reached its limit of 512 "
                "processes (25910 forks refused)",
                at_pids_limit=True,
            ),
            "failed: resource limit",
        ),
        (ContainerStatus(RunState.KILLED_TIMEOUT, 137, "ran past"), "failed: timeout"),
        (
            ContainerStatus(RunState.KILLED_OOM, 137, "hit its memory limit", True),
            "failed: out of memory",
        ),
        (ContainerStatus(RunState.REMOVED, None, "gone from the engine"), "failed: stopped"),
    ],
)
def test_failure_reasons_are_fixed_phrases_without_numbers(
    status: ContainerStatus, expected: str
) -> None:
    reason = _failure(status)
    assert reason == expected and reason in VOCABULARY
    assert not re.search(r"\d", reason)
