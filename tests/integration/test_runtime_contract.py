"""The :class:`~enclave.runtime.Runtime` contract, one test class run against every backend.

:class:`DockerRuntime` runs on the real engine (marked ``docker``); :class:`FakeRuntime` runs the
same jobs in-process. A job is described once, by its ``BEHAVIOUR`` variable: the Docker backend
runs :data:`JOB_SCRIPT` in the runtime image, the fake backend's handler does the same thing in a
thread. Either way the job appends a line to ``/output/runs`` when it starts, so a test can count
how often it ran.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from enclave.runtime import (
    MANAGED_LABEL,
    ContainerSpec,
    DockerRuntime,
    FakeJob,
    FakeRuntime,
    Handle,
    RunState,
    Runtime,
)
from enclave.runtime._base import IMAGE_ID_RE
from policies.errors import InvalidInput, InvalidState, NotFound

MiB = 1024**2
FAKE_IMAGE = "sha256:" + "f" * 64
UNKNOWN_IMAGE = "sha256:" + "0" * 64
SITE_LABEL = "org.sealroom.site"

JOB_SCRIPT = """
import os, sys, time
kind, _, arg = os.environ["BEHAVIOUR"].partition(":")
with open("/output/runs", "a") as f:
    f.write("run\\n")
if kind == "exit":
    print("bye", flush=True)
    sys.exit(int(arg))
if kind == "sleep":
    print("sleeping", flush=True)
    time.sleep(3600)
if kind == "print":
    line = b"x" * 1023 + b"\\n"
    for _ in range(int(arg) // 1024):
        sys.stdout.buffer.write(line)
    sys.stdout.buffer.write(b"THE-END\\n")
    sys.stdout.flush()
if kind == "oom":
    hog = []
    while True:
        hog.append(b"\\x01" * (4 << 20))
"""


def fake_handler(job: FakeJob) -> int | None:
    """:data:`JOB_SCRIPT`, in-process."""
    kind, _, arg = job.spec.env["BEHAVIOUR"].partition(":")
    with open(job.output_dir / "runs", "a") as f:
        f.write("run\n")
    if kind == "exit":
        job.log("bye\n")
        return int(arg)
    if kind == "sleep":
        job.log("sleeping\n")
        job.sleep(3600)
        return None
    if kind == "print":
        for _ in range(int(arg) // 1024):
            job.log(b"x" * 1023 + b"\n")
        job.log(b"THE-END\n")
        return None
    if kind == "oom":
        raise MemoryError
    raise AssertionError(kind)


@dataclass
class Backend:
    """One backend under test and what its jobs need; cleans up every job it started."""

    name: str
    runtime: Any
    image: str
    root: Path
    labels: dict[str, str]
    handles: list[Handle] = field(default_factory=list)

    def spec(self, behaviour: str, **overrides: Any) -> ContainerSpec:
        job_id = f"contract-{secrets.token_hex(4)}"
        out = self.root / job_id
        out.mkdir()
        out.chmod(0o777)  # the job runs as uid 10001
        values: dict[str, Any] = {
            "image": self.image,
            "job_id": job_id,
            "output_dir": out,
            "memory_bytes": 128 * MiB,
            "cpus": 1.0,
            "pids": 32,
            "tmp_bytes": 8 * MiB,
            "timeout_s": 60.0,
            "env": {"BEHAVIOUR": behaviour},
            "labels": self.labels,
            "command": ("python3", "-c", JOB_SCRIPT),
            "log_bytes": 1 * MiB,
        }
        values.update(overrides)
        return ContainerSpec(**values)

    def prepare(self, spec: ContainerSpec) -> Handle:
        handle = self.runtime.prepare(spec)
        self.handles.append(handle)
        return handle

    def run(self, behaviour: str, **overrides: Any) -> tuple[ContainerSpec, Handle]:
        spec = self.spec(behaviour, **overrides)
        handle = self.prepare(spec)
        self.runtime.start(handle)
        return spec, handle

    @staticmethod
    def runs(spec: ContainerSpec) -> int:
        path = spec.output_dir / "runs"
        return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "fake"])
def backend(request: Any, tmp_path: Path, test_labels: dict[str, str]) -> Iterator[Backend]:
    if request.param == "docker":
        client = request.getfixturevalue("docker_client")
        image = request.getfixturevalue("runtime_image")
        b = Backend("docker", DockerRuntime(client, kill_grace_s=20), image, tmp_path, test_labels)
    else:
        rt = FakeRuntime(fake_handler, images={"sealroom-runtime:latest": FAKE_IMAGE})
        b = Backend("fake", rt, FAKE_IMAGE, tmp_path, test_labels)
    yield b
    for handle in b.handles:
        b.runtime.cleanup(handle)


class TestRuntimeContract:
    def test_is_a_runtime(self, backend: Backend) -> None:
        assert isinstance(backend.runtime, Runtime)

    def test_a_job_runs_to_its_exit(self, backend: Backend) -> None:
        rt = backend.runtime
        spec = backend.spec("exit:0")
        handle = backend.prepare(spec)
        assert handle.job_id == spec.job_id
        assert rt.status(handle).state is RunState.PREPARED
        assert backend.runs(spec) == 0
        rt.start(handle)
        st = rt.wait(handle, timeout_s=60)
        assert (st.state, st.exit_code, st.reason, st.oom_killed) == (RunState.EXITED, 0, "", False)
        assert st.started_at is not None and st.finished_at is not None
        assert st.finished_at >= st.started_at
        assert rt.status(handle) == st
        assert rt.logs(handle, max_bytes=1024) == b"bye\n"
        assert backend.runs(spec) == 1

    def test_a_failing_job_is_reported_with_its_code(self, backend: Backend) -> None:
        _, handle = backend.run("exit:3")
        st = backend.runtime.wait(handle, timeout_s=60)
        assert (st.state, st.exit_code) == (RunState.EXITED, 3)
        assert st.reason == "exited with code 3"

    def test_prepare_is_idempotent_and_refuses_a_second_spec(self, backend: Backend) -> None:
        spec = backend.spec("exit:0")
        handle = backend.prepare(spec)
        assert backend.runtime.prepare(spec) == handle
        other = backend.spec("exit:1", job_id=spec.job_id, output_dir=spec.output_dir)
        with pytest.raises(InvalidState, match="different spec"):
            backend.runtime.prepare(other)

    def test_start_never_runs_a_job_twice(self, backend: Backend) -> None:
        rt = backend.runtime
        spec, handle = backend.run("exit:0")
        rt.start(handle)
        assert rt.wait(handle, timeout_s=60).state is RunState.EXITED
        rt.start(handle)  # after it ended, too
        time.sleep(0.5)
        assert rt.status(handle).state is RunState.EXITED
        assert backend.runs(spec) == 1

    def test_wait_returns_while_the_job_still_runs(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("sleep")
        t0 = time.monotonic()
        st = rt.wait(handle, timeout_s=0.5)
        assert st.state is RunState.RUNNING and st.exit_code is None
        assert time.monotonic() - t0 < 10
        assert rt.status(handle).state is RunState.RUNNING

    def test_stop_ends_a_running_job_and_is_idempotent(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("sleep")
        rt.stop(handle)
        st = rt.status(handle)
        assert (st.state, st.reason, st.exit_code) == (RunState.STOPPED, "stopped on request", 137)
        rt.stop(handle)
        assert rt.status(handle) == st
        assert rt.wait(handle, timeout_s=5) == st

    def test_stop_before_start_means_it_never_runs(self, backend: Backend) -> None:
        rt = backend.runtime
        spec = backend.spec("exit:0")
        handle = backend.prepare(spec)
        rt.stop(handle)
        assert rt.status(handle).state is RunState.STOPPED
        assert rt.status(handle).reason == "stopped before it started"
        rt.start(handle)
        time.sleep(0.5)
        assert rt.status(handle).state is RunState.STOPPED
        assert backend.runs(spec) == 0

    def test_stop_after_the_end_changes_nothing(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("exit:4")
        st = rt.wait(handle, timeout_s=60)
        assert st.state is RunState.EXITED
        rt.stop(handle)
        assert rt.status(handle) == st

    def test_a_job_past_its_timeout_is_killed(self, backend: Backend) -> None:
        t0 = time.monotonic()  # before the start, from which the timeout counts
        _, handle = backend.run("sleep", timeout_s=1.5)
        st = backend.runtime.wait(handle, timeout_s=60)
        assert st.state is RunState.KILLED_TIMEOUT and st.exit_code == 137
        assert st.reason == "ran past its timeout of 1.5 s and was killed"
        assert 1.5 <= time.monotonic() - t0 < 30

    def test_status_alone_enforces_the_deadline(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("sleep", timeout_s=1)
        assert rt.status(handle).state is RunState.RUNNING
        time.sleep(1.5)
        st = rt.status(handle)
        assert st.state is RunState.KILLED_TIMEOUT and "timeout of 1 s" in st.reason

    def test_a_job_over_its_memory_is_reported_oom_killed(self, backend: Backend) -> None:
        _, handle = backend.run("oom", memory_bytes=64 * MiB)
        st = backend.runtime.wait(handle, timeout_s=60)
        assert (st.state, st.oom_killed, st.exit_code) == (RunState.KILLED_OOM, True, 137)
        assert st.reason == f"hit its memory limit of {64 * MiB} bytes and was killed"

    def test_logs_keep_at_most_the_cap_and_return_the_tail(self, backend: Backend) -> None:
        rt = backend.runtime
        spec, handle = backend.run("print:262144", log_bytes=64 * 1024)
        assert rt.wait(handle, timeout_s=60).state is RunState.EXITED
        kept = rt.logs(handle, max_bytes=10 * MiB)
        assert 0 < len(kept) <= spec.log_bytes and kept.endswith(b"THE-END\n")
        tail = rt.logs(handle, max_bytes=4096)
        assert len(tail) <= 4096 and tail.endswith(kept[-1000:])
        assert tail.startswith(b"[sealroom: ") and b"earlier ones cut" in tail
        with pytest.raises(InvalidInput, match="max_bytes"):
            rt.logs(handle, max_bytes=0)

    def test_cleanup_removes_and_is_idempotent(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("exit:0")
        assert rt.wait(handle, timeout_s=60).state is RunState.EXITED
        rt.cleanup(handle)
        st = rt.status(handle)
        assert (st.state, st.exit_code, st.reason) == (RunState.REMOVED, 0, "removed after: exited")
        rt.cleanup(handle)
        rt.stop(handle)
        assert rt.status(handle) == st
        assert rt.wait(handle, timeout_s=1) == st
        with pytest.raises(InvalidState, match="cleaned up"):
            rt.start(handle)
        with pytest.raises(InvalidState, match="cleaned up"):
            rt.logs(handle, max_bytes=100)

    def test_cleanup_of_a_running_job_stops_it_first(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("sleep")
        rt.cleanup(handle)
        st = rt.status(handle)
        assert st.state is RunState.REMOVED
        assert st.reason == "removed after: stopped (stopped on request)"

    def test_cleanup_of_a_prepared_job(self, backend: Backend) -> None:
        rt = backend.runtime
        spec = backend.spec("exit:0")
        handle = backend.prepare(spec)
        rt.cleanup(handle)
        assert rt.status(handle).state is RunState.REMOVED
        with pytest.raises(InvalidState):
            rt.start(handle)
        assert backend.runs(spec) == 0

    def test_foreign_handles_are_not_found(self, backend: Backend) -> None:
        rt = backend.runtime
        _, mine = backend.run("exit:0")
        foreign = [
            Handle(backend="elsewhere", id=mine.id, job_id=mine.job_id),
            Handle(backend=mine.backend, id="no-such-container", job_id="x"),
        ]
        for handle in foreign:
            with pytest.raises(NotFound):
                rt.status(handle)
            with pytest.raises(NotFound):
                rt.start(handle)
            with pytest.raises(NotFound):
                rt.wait(handle, timeout_s=1)
            with pytest.raises(NotFound):
                rt.stop(handle)
            with pytest.raises(NotFound):
                rt.logs(handle, max_bytes=10)
            with pytest.raises(NotFound):
                rt.cleanup(handle)
        # Another instance of the same backend did not make it either.
        other = type(rt)(rt._client) if backend.name == "docker" else FakeRuntime(fake_handler)
        with pytest.raises(NotFound):
            other.status(mine)

    def test_images_are_pinned_by_id(self, backend: Backend) -> None:
        rt = backend.runtime
        assert IMAGE_ID_RE.match(rt.resolve_image("sealroom-runtime:latest"))
        assert rt.resolve_image(backend.image) == backend.image
        with pytest.raises(NotFound):
            rt.resolve_image(UNKNOWN_IMAGE)
        with pytest.raises(NotFound):
            rt.prepare(backend.spec("exit:0", image=UNKNOWN_IMAGE))

    def test_bad_requests_are_refused_naming_the_problem(self, backend: Backend) -> None:
        rt = backend.runtime
        _, handle = backend.run("exit:0")
        with pytest.raises(InvalidInput, match="timeout_s"):
            rt.wait(handle, timeout_s=0)
        missing = backend.root / "missing"
        with pytest.raises(InvalidInput, match=r"/code: .*missing does not exist"):
            rt.prepare(backend.spec("exit:0", read_only_mounts={missing: "/code"}))
        a_file = backend.root / "file"
        a_file.write_text("x")
        with pytest.raises(InvalidInput, match=r"/data/x: .* is not a directory"):
            rt.prepare(backend.spec("exit:0", read_only_mounts={a_file: "/data/x"}))

    def test_remove_stale_ends_only_the_sites_jobs(self, backend: Backend) -> None:
        rt = backend.runtime
        site = {SITE_LABEL: f"site-{secrets.token_hex(4)}"}
        ours = [backend.run("sleep", labels={**backend.labels, **site})[1] for _ in range(2)]
        _, theirs = backend.run("sleep", labels={**backend.labels, SITE_LABEL: "another"})
        with pytest.raises(InvalidInput, match="labels"):
            rt.remove_stale(labels={})
        assert rt.remove_stale(labels=site) == 2
        for handle in ours:
            st = rt.status(handle)
            assert st.state is RunState.REMOVED and "stale" in st.reason
        assert rt.status(theirs).state is RunState.RUNNING
        assert rt.remove_stale(labels=site) == 0


@pytest.mark.docker
class TestDockerOnly:
    """What only a real engine can show: what the engine holds, and a backend that restarts."""

    @pytest.fixture
    def backend(
        self, docker_client: Any, runtime_image: str, tmp_path: Path, test_labels: dict[str, str]
    ) -> Iterator[Backend]:
        b = Backend("docker", DockerRuntime(docker_client), runtime_image, tmp_path, test_labels)
        yield b
        for handle in b.handles:
            b.runtime.cleanup(handle)

    def test_cleanup_leaves_nothing_on_the_engine(self, backend: Backend, docker_client) -> None:
        import docker

        _, handle = backend.run("sleep")
        assert docker_client.containers.get(handle.id).labels[MANAGED_LABEL] == "true"
        backend.runtime.cleanup(handle)
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(handle.id)

    def test_a_container_removed_behind_its_back_reads_removed(
        self, backend: Backend, docker_client
    ) -> None:
        _, handle = backend.run("sleep")
        docker_client.containers.get(handle.id).remove(force=True)
        st = backend.runtime.status(handle)
        assert st.state is RunState.REMOVED and "gone from the engine" in st.reason
        backend.runtime.cleanup(handle)  # still fine

    def test_a_restarted_agent_removes_what_the_crashed_one_left(
        self, backend: Backend, docker_client
    ) -> None:
        import docker

        site = {SITE_LABEL: f"site-{secrets.token_hex(4)}"}
        _, handle = backend.run("sleep", labels={**backend.labels, **site})
        fresh = DockerRuntime(docker_client)  # knows nothing of the first one's records
        assert fresh.remove_stale(labels=site) == 1
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(handle.id)
        assert backend.runtime.status(handle).state is RunState.REMOVED
