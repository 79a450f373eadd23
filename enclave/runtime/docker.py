"""The Docker backend of :class:`~enclave.runtime.Runtime`, through the docker SDK.

:func:`container_options` turns a :class:`ContainerSpec` into the engine's create arguments (pure,
unit-tested); :class:`DockerRuntime` drives the container's life and maps the SDK's errors to
:class:`~policies.errors.RuntimeBackendError` at the edge. What the engine reports is read back
on every ``status``: the backend remembers only what the engine cannot know (that *it* killed
the container, and why).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import requests

from enclave import _mounts
from enclave.runtime._base import (
    IMAGE_ID_RE,
    JOB_LABEL,
    MANAGED_LABEL,
    ContainerSpec,
    ContainerStatus,
    Handle,
    RunState,
    TailBuffer,
    check_mount_sources,
)
from policies.errors import InvalidInput, InvalidState, NotFound, RuntimeBackendError
from trainers.contract import JOB_USER

BACKEND = "docker"
_KILL_GRACE_S = 30.0
_TIMEOUT_EXCEPTIONS = (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout)


def container_options(
    spec: ContainerSpec, *, mounts: tuple[tuple[Any, str], ...]
) -> dict[str, Any]:
    """The keyword arguments of ``client.containers.create`` that keep the isolation promises.

    ``mounts`` are the checked sources from :func:`check_mount_sources`, the last one
    ``/output``.
    """
    from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

    *read_only, (output_src, output_target) = mounts
    opts: dict[str, Any] = {
        "image": spec.image,
        "name": f"sealroom-{spec.job_id}-{secrets.token_hex(4)}",
        "hostname": "sealroom-job",
        "user": JOB_USER,
        "environment": dict(spec.env),
        "labels": {**spec.labels, JOB_LABEL: spec.job_id, MANAGED_LABEL: "true"},
        # Network: a namespace of its own with only `lo`. The resolver is pointed at the
        # container's own loopback, where nothing answers, so no lookup targets any server.
        "network_mode": "none",
        "dns": ["127.0.0.1"],
        "read_only": True,
        "mounts": [
            *(Mount(target, str(src), type="bind", read_only=True) for src, target in read_only),
            Mount(output_target, str(output_src), type="bind", read_only=False),
        ],
        # The container's own /tmp, in its memory cgroup; not the host's /tmp.
        "tmpfs": {
            "/tmp": f"rw,noexec,nosuid,nodev,size={spec.tmp_bytes},mode=1777",  # noqa: S108
            # The engine mounts a writable POSIX message-queue filesystem here by default; jobs
            # need none, and every writable place is one more to account for.
            "/dev/mqueue": "ro,noexec,nosuid,nodev,size=4k,mode=0555",
        },
        "ipc_mode": "private",
        "shm_size": spec.shm_bytes,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "pids_limit": spec.pids,
        "mem_limit": spec.memory_bytes,
        # Equal to the memory limit: no swap, so the limit is real and nothing is paged to disk.
        "memswap_limit": spec.memory_bytes,
        "nano_cpus": int(spec.cpus * 1e9),
        # A crashing job must not dump its memory (the data) through the host's core_pattern.
        "ulimits": [Ulimit(name="core", soft=0, hard=0)],
        # The host's OOM killer takes the job before the agent.
        "oom_score_adj": 1000,
        "cgroupns": "private",
        "runtime": spec.runtime,
        # Stdout and stderr can carry data: the engine keeps at most log_bytes of them, on the
        # site's disk, and nothing more however much the job prints.
        "log_config": LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": str(spec.log_bytes), "max-file": "1"},
        ),
        "stdin_open": False,
        "tty": False,
    }
    if spec.command is not None:
        opts["entrypoint"] = [spec.command[0]]
        opts["command"] = list(spec.command[1:])
    if spec.gpus > 0:
        opts["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
    return opts


@dataclass(frozen=True)
class _Record:
    spec: ContainerSpec
    container_id: str
    started_mono: float | None = None
    killed: RunState | None = None
    """STOPPED or KILLED_TIMEOUT when this backend killed the container, else None."""
    kill_note: str = ""
    """What the job was doing when it was killed (at its process limit), for the reason."""
    removed: ContainerStatus | None = None


def _parse_time(text: str | None) -> datetime | None:
    if not text or text.startswith("0001-01-01"):
        return None
    # The engine writes nanoseconds; datetime keeps microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    except ValueError:
        return None


class DockerRuntime:
    """:class:`~enclave.runtime.Runtime` on a Docker engine (``docker.from_env()`` by default)."""

    def __init__(self, client: Any | None = None, *, kill_grace_s: float = _KILL_GRACE_S) -> None:
        self._client_arg = client
        self._client_obj: Any | None = client
        self._kill_grace_s = kill_grace_s
        self._records: dict[str, _Record] = {}
        self._by_job: dict[str, Handle] = {}
        self._lock = threading.RLock()

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            import docker

            with _edge("connect to the Docker engine"):
                self._client_obj = docker.from_env()
        return self._client_obj

    # -- images -----------------------------------------------------------------------------

    def resolve_image(self, reference: str) -> str:
        import docker

        try:
            image_id = str(self._client.images.get(reference).id)
        except docker.errors.ImageNotFound as e:
            raise NotFound(f"image {reference!r} is not on this site's engine") from e
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(f"cannot look up image {reference!r}: {e}") from e
        if not IMAGE_ID_RE.match(image_id):
            raise RuntimeBackendError(f"the engine gave image {reference!r} a malformed ID")
        return image_id

    # -- lifecycle --------------------------------------------------------------------------

    def prepare(self, spec: ContainerSpec) -> Handle:
        import docker

        with self._lock:
            known = self._by_job.get(spec.job_id)
            if known is not None:
                if self._records[known.id].spec != spec:
                    raise InvalidState(
                        f"job {spec.job_id} was already prepared with a different spec"
                    )
                return known
            mounts = check_mount_sources(spec)
            for src, target in mounts[:-1]:
                # Docker before 25 makes only the top of a bind read-only: a mount nested below
                # a read-only source would be writable in the container. Refuse the spec.
                if _mounts.mounts_under(src):
                    raise InvalidInput(f"mount source for {target} has a mount point below it")
            try:
                self._client.images.get(spec.image)
            except docker.errors.ImageNotFound as e:
                raise NotFound(f"image {spec.image} is not on this site's engine") from e
            except docker.errors.DockerException as e:
                raise RuntimeBackendError(f"cannot look up image {spec.image}: {e}") from e
            with _edge(f"create the container of job {spec.job_id}"):
                container = self._client.containers.create(**container_options(spec, mounts=mounts))
            handle = Handle(backend=BACKEND, id=str(container.id), job_id=spec.job_id)
            self._records[handle.id] = _Record(spec=spec, container_id=str(container.id))
            self._by_job[spec.job_id] = handle
            return handle

    def start(self, handle: Handle) -> None:
        with self._lock:
            rec = self._record(handle)
            if rec.removed is not None:
                raise InvalidState(f"the container of job {handle.job_id} was cleaned up")
            if rec.started_mono is not None or rec.killed is not None:
                return  # started once already, or stopped before it ran: never run twice
            with _edge(f"start the container of job {handle.job_id}"):
                self._container(rec).start()
            self._records[handle.id] = replace(rec, started_mono=time.monotonic())

    def status(self, handle: Handle) -> ContainerStatus:
        with self._lock:
            rec = self._record(handle)
        if rec.removed is not None:
            return rec.removed
        st = self._read(rec)
        if st.state is RunState.RUNNING and self._past_deadline(rec):
            self._kill(handle, RunState.KILLED_TIMEOUT, note=self._pids_note(rec))
            return self._settle(handle)
        return st

    def wait(self, handle: Handle, *, timeout_s: float) -> ContainerStatus:
        if not timeout_s > 0:
            raise InvalidInput(f"timeout_s: must be positive, got {timeout_s!r}")
        call_end = time.monotonic() + timeout_s
        while True:
            st = self.status(handle)
            if st.state is not RunState.RUNNING:
                return st
            with self._lock:
                rec = self._record(handle)
            assert rec.started_mono is not None
            deadline = rec.started_mono + rec.spec.timeout_s
            now = time.monotonic()
            if now >= call_end:
                return st
            budget = max(0.05, min(deadline, call_end) - now)
            try:
                self._container(rec).wait(timeout=budget)
            except _TIMEOUT_EXCEPTIONS:
                pass  # the budget ran out; the loop reads the state and enforces the deadline
            except Exception as e:
                _raise_backend(f"wait for the container of job {handle.job_id}", e)

    def stop(self, handle: Handle) -> None:
        with self._lock:
            rec = self._record(handle)
        if rec.removed is not None or rec.killed is not None:
            return
        st = self._read(rec)
        if st.state.final:
            return
        self._kill(handle, RunState.STOPPED)
        self._settle(handle)

    def logs(self, handle: Handle, *, max_bytes: int) -> bytes:
        buf = TailBuffer(max_bytes)
        with self._lock:
            rec = self._record(handle)
        if rec.removed is not None:
            raise InvalidState(f"the container of job {handle.job_id} was cleaned up; no logs")
        # Streamed so that the agent holds at most twice max_bytes, however much was printed.
        with _edge(f"read the logs of job {handle.job_id}"):
            stream = self._container(rec).logs(stdout=True, stderr=True, stream=True, follow=False)
            try:
                for chunk in stream:
                    buf.feed(chunk)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        return buf.value()

    def cleanup(self, handle: Handle) -> None:
        import docker

        with self._lock:
            rec = self._record(handle)
        if rec.removed is not None:
            return
        try:
            last = self.status(handle)
        except RuntimeBackendError:
            last = ContainerStatus(RunState.REMOVED, reason="the engine could not report it")
        if last.state is RunState.RUNNING or last.state is RunState.PREPARED:
            self.stop(handle)
            last = self.status(handle)
        try:
            self._client.api.remove_container(rec.container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass  # gone already (removed by someone else, or stale after a crash)
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"cannot remove the container of job {handle.job_id}: {e}"
            ) from e
        removed = replace(
            last,
            state=RunState.REMOVED,
            reason=f"removed after: {last.state.value}"
            + (f" ({last.reason})" if last.reason else ""),
        )
        with self._lock:
            self._records[handle.id] = replace(self._records[handle.id], removed=removed)

    def remove_stale(self, *, labels: Mapping[str, str]) -> int:
        """Kill and remove every managed container carrying all of ``labels`` (after a crash).
        Returns how many were removed. ``labels`` must not be empty: a site names its own."""
        import docker

        if not labels:
            raise InvalidInput("labels: name the site's containers; refusing to remove all")
        filters = [f"{MANAGED_LABEL}=true", *(f"{k}={v}" for k, v in labels.items())]
        with _edge("list stale containers"):
            found = self._client.containers.list(all=True, filters={"label": filters})
        for c in found:
            try:
                c.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as e:
                raise RuntimeBackendError(f"cannot remove stale container {c.id}: {e}") from e
            with self._lock:
                for hid, rec in self._records.items():
                    if rec.container_id == c.id and rec.removed is None:
                        self._records[hid] = replace(
                            rec,
                            removed=ContainerStatus(
                                RunState.REMOVED, reason="removed as stale after a crash"
                            ),
                        )
        return len(found)

    # -- internals --------------------------------------------------------------------------

    def _record(self, handle: Handle) -> _Record:
        rec = self._records.get(handle.id) if handle.backend == BACKEND else None
        if rec is None:
            raise NotFound(f"no container of this backend for job {handle.job_id}")
        return rec

    def _container(self, rec: _Record) -> Any:
        import docker

        try:
            return self._client.containers.get(rec.container_id)
        except docker.errors.NotFound as e:
            raise RuntimeBackendError(
                f"the container of job {rec.spec.job_id} is gone from the engine"
            ) from e
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"cannot reach the container of job {rec.spec.job_id}: {e}"
            ) from e

    def _past_deadline(self, rec: _Record) -> bool:
        return (
            rec.started_mono is not None
            and time.monotonic() >= rec.started_mono + rec.spec.timeout_s
        )

    def _read(self, rec: _Record) -> ContainerStatus:
        """The container's state as the engine reports it, with what only this backend knows."""
        import docker

        try:
            attrs = self._client.api.inspect_container(rec.container_id)
        except docker.errors.NotFound:
            return ContainerStatus(RunState.REMOVED, reason="the container is gone from the engine")
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"cannot inspect the container of job {rec.spec.job_id}: {e}"
            ) from e
        s = attrs.get("State") or {}
        started = _parse_time(s.get("StartedAt"))
        finished = _parse_time(s.get("FinishedAt"))
        oom = bool(s.get("OOMKilled"))
        status = s.get("Status")
        if status == "created":
            if rec.killed is RunState.STOPPED:
                return ContainerStatus(RunState.STOPPED, reason="stopped before it started")
            return ContainerStatus(RunState.PREPARED)
        if status in ("running", "paused", "restarting"):
            return ContainerStatus(RunState.RUNNING, started_at=started)
        code = s.get("ExitCode")
        code = int(code) if isinstance(code, int) else None
        if rec.killed is RunState.KILLED_TIMEOUT:
            return ContainerStatus(
                RunState.KILLED_TIMEOUT,
                code,
                f"ran past its timeout of {rec.spec.timeout_s:g} s and was killed{rec.kill_note}",
                oom,
                started,
                finished,
            )
        if rec.killed is RunState.STOPPED:
            return ContainerStatus(
                RunState.STOPPED, code, "stopped on request", oom, started, finished
            )
        if oom:
            # Fail closed: a job that hit its memory limit is reported so even if it then exited.
            return ContainerStatus(
                RunState.KILLED_OOM,
                code,
                f"hit its memory limit of {rec.spec.memory_bytes} bytes and was killed",
                True,
                started,
                finished,
            )
        reason = "" if code == 0 else f"exited with code {code}"
        if s.get("Error"):
            reason = f"{reason}; engine: {s['Error']}".lstrip("; ")
        return ContainerStatus(RunState.EXITED, code, reason, False, started, finished)

    def _pids_note(self, rec: _Record) -> str:
        """``"; it had reached its limit of N processes ..."`` when the kernel refused the job
        forks (a fork bomb), else ``""``. Best effort: from the host's cgroup files, if visible."""
        try:
            pid = int(self._client.api.inspect_container(rec.container_id)["State"]["Pid"])
        except Exception:  # a note only: never let it stand in the way of the kill
            return ""
        refused = _pids_refused(pid) if pid > 0 else None
        if not refused:
            return ""
        return f"; it had reached its limit of {rec.spec.pids} processes ({refused} forks refused)"

    def _kill(self, handle: Handle, why: RunState, *, note: str = "") -> None:
        import docker

        with self._lock:
            rec = self._record(handle)
            if rec.killed is not None:
                return
            self._records[handle.id] = replace(rec, killed=why, kill_note=note)
        try:
            self._container(rec).kill()
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise RuntimeBackendError(
                    f"cannot kill the container of job {handle.job_id}: {e}"
                ) from e
            # Not running: never started (the stop stands, so start stays a no-op) or it ended
            # by itself just now (its own ending is the truth, not ours).
            with self._lock:
                cur = self._records[handle.id]
                if cur.started_mono is not None:
                    self._records[handle.id] = replace(cur, killed=None, kill_note="")
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"cannot kill the container of job {handle.job_id}: {e}"
            ) from e

    def _settle(self, handle: Handle) -> ContainerStatus:
        """Wait (briefly) for a killed container to be reported as no longer running."""
        with self._lock:
            rec = self._record(handle)
        end = time.monotonic() + self._kill_grace_s
        while True:
            st = self._read(rec)
            if st.state is not RunState.RUNNING:
                return st
            if time.monotonic() >= end:
                raise RuntimeBackendError(
                    f"the container of job {handle.job_id} did not stop after being killed"
                )
            try:
                self._container(rec).wait(timeout=1)
            except _TIMEOUT_EXCEPTIONS:
                pass
            except Exception as e:
                _raise_backend(f"wait for the container of job {handle.job_id}", e)


def _pids_refused(pid: int) -> int | None:
    """How many forks the PIDs cgroup of host process ``pid`` has refused (``pids.events``
    ``max``), or None where that cannot be read (cgroup v1 or v2)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "pids" in controllers.split(","):
            v1 = f"/sys/fs/cgroup/pids{path}/pids.events"
        elif controllers == "":
            v2 = f"/sys/fs/cgroup{path}/pids.events"
    for events in (v1, v2):
        if events is None:
            continue
        try:
            with open(events, encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


@contextmanager
def _edge(what: str) -> Iterator[None]:
    """Map the SDK's (and its HTTP library's) errors to :class:`RuntimeBackendError`."""
    try:
        yield
    except Exception as e:
        _raise_backend(what, e)


def _raise_backend(what: str, e: Exception) -> None:
    import docker

    if isinstance(e, docker.errors.DockerException | requests.exceptions.RequestException):
        raise RuntimeBackendError(f"cannot {what}: {e}") from e
    raise e
