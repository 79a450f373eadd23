"""The Docker backend of :class:`~enclave.runtime.Runtime`, through the docker SDK.

:func:`container_options` (:mod:`._docker_options`) turns a :class:`ContainerSpec` into the
engine's create arguments (pure, unit-tested); :class:`DockerRuntime` drives the container's life
and maps the SDK's errors to :class:`~policies.errors.RuntimeBackendError` at the edge, in words
of its own: the SDK's text names the engine's URL and the container's ID, which are the site's
business (they stay on the exception's ``__cause__``, for the site's audit). What the engine
reports is read back on every ``status``: the backend remembers only what the engine cannot know
(that *it* killed the container, and why).

:meth:`DockerRuntime.assign` gives a running warm container (a spec with ``receive_mounts``,
:mod:`enclave._warm`) to one job: its limits set to the job's through the engine's update call
and read back, its deadline counted from then; never to a second job.

Killing is bounded. A container the engine cannot kill (it answers "did not receive an exit
event" for a job holding its process limit) is killed harder: SIGKILL to every process of its
cgroup, from the host, then forced removal, each step given ``kill_grace_s``; its logs are taken
before the removal, so the owner keeps them. The cgroup kill is :mod:`._cgroup`; the engine's
status mapping :mod:`._docker_state`; the error edge and bounded calls :mod:`._docker_engine`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from enclave import _mounts
from enclave.runtime._base import (
    IMAGE_ID_RE,
    MANAGED_LABEL,
    RECEIVE_TARGETS,
    ContainerSpec,
    ContainerStatus,
    Handle,
    RunState,
    TailBuffer,
    cap_tail,
    check_mount_sources,
)
from enclave.runtime._cgroup import kill_cgroup, pids_refused
from enclave.runtime._docker_engine import (
    TIMEOUT_EXCEPTIONS,
    bounded,
    drain,
    edge,
    feed_logs,
    raise_backend,
)
from enclave.runtime._docker_options import container_options
from enclave.runtime._docker_state import Record, engine_status
from policies.errors import InvalidInput, InvalidState, NotFound, RuntimeBackendError
from trainers.contract import CODE_DIR, DATA_DIR, MODEL_DIR

__all__ = ["BACKEND", "DockerRuntime", "container_options"]

_edge = edge  # the name tests and callers used before the split

BACKEND = "docker"
_KILL_GRACE_S = 5.0
"""How long each step of a kill (the engine's kill, the cgroup's SIGKILL, forced removal) may
take before the next, harder one."""


class DockerRuntime:
    """:class:`~enclave.runtime.Runtime` on a Docker engine (``docker.from_env()`` by default)."""

    def __init__(self, client: Any | None = None, *, kill_grace_s: float = _KILL_GRACE_S) -> None:
        self._client_arg = client
        self._client_obj: Any | None = client
        self._kill_grace_s = kill_grace_s
        self._records: dict[str, Record] = {}
        self._by_job: dict[str, Handle] = {}
        self._lock = threading.RLock()

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            import docker

            with edge("connect to the Docker engine"):
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
            raise RuntimeBackendError(
                f"the container engine could not look up {reference!r}"
            ) from e
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
                raise RuntimeBackendError("the container engine could not look up the image") from e
            with edge(f"create the container of job {spec.job_id}"):
                container = self._client.containers.create(**container_options(spec, mounts=mounts))
            handle = Handle(backend=BACKEND, id=str(container.id), job_id=spec.job_id)
            self._records[handle.id] = Record(spec=spec, container_id=str(container.id))
            self._by_job[spec.job_id] = handle
            return handle

    def start(self, handle: Handle) -> None:
        with self._lock:
            rec = self._record(handle)
            if rec.removed is not None:
                raise InvalidState(f"the container of job {handle.job_id} was cleaned up")
            if rec.started_mono is not None or rec.killed is not None:
                return  # started once already, or stopped before it ran: never run twice
            with edge(f"start the container of job {handle.job_id}"):
                self._container(rec).start()
            self._records[handle.id] = replace(rec, started_mono=time.monotonic())

    def assign(self, warm: Handle, spec: ContainerSpec) -> Handle:
        """Give the running warm container ``warm`` (prepared and started from a spec with
        ``receive_mounts``) to the job of ``spec``, and return the job's handle.

        The container's memory (no swap beyond it), CPU and process limits become the spec's,
        read back from the engine before this returns; the job's deadline counts from now. The
        spec must be the one the warm container can keep every promise of: the same image,
        OCI runtime, ``/tmp``, ``/dev/shm`` and log caps, output directory and ``/code``, no
        GPU, the image's own command, and data and model only at ``/data/<name>`` and
        ``/model/base`` (which the site mounts below the warm container's receiving mounts).
        A warm container is given to one job only, ever: ``warm`` is no longer valid after.
        Raises :class:`InvalidInput` for a spec it cannot keep, :class:`InvalidState` for a
        container that is not a running warm one (or was given away), and
        :class:`RuntimeBackendError` when the engine does not take or keep the limits (the
        caller then removes the container: it must never run a job under other limits).
        """
        with self._lock:
            rec = self._record(warm)
            if (
                not rec.spec.receive_mounts
                or rec.spec.job_id != warm.job_id
                or self._by_job.get(warm.job_id) != warm
            ):
                raise InvalidState(f"{warm.job_id} is not a warm container to give a job")
            if rec.removed is not None or rec.killed is not None or rec.started_mono is None:
                raise InvalidState(f"the warm container {warm.job_id} is not running")
            if spec.job_id in self._by_job:
                raise InvalidState(f"job {spec.job_id} already has a container")
            _check_assignable(rec.spec, spec)
            # Taken out of the pool before anything else: whatever happens next, it is never
            # given to a second job.
            self._records[warm.id] = replace(rec, spec=replace(rec.spec, job_id=spec.job_id))
            del self._by_job[warm.job_id]
        st = self._read(rec)
        if st.state is not RunState.RUNNING:
            raise InvalidState(f"the warm container {warm.job_id} is {st.state.value}")
        limits = {
            "Memory": spec.memory_bytes,
            "MemorySwap": spec.memory_bytes,
            "NanoCpus": int(spec.cpus * 1e9),
            "PidsLimit": spec.pids,
        }
        with edge(f"set the limits of job {spec.job_id}"):
            api = self._client.api
            api._raise_for_status(
                api._post_json(api._url("/containers/{0}/update", rec.container_id), data=limits)
            )
            host = api.inspect_container(rec.container_id).get("HostConfig") or {}
        got = {k: host.get(k) for k in limits}
        if got != limits:
            raise RuntimeBackendError(
                f"the engine did not keep the limits of job {spec.job_id}: {got} != {limits}"
            )
        handle = Handle(backend=BACKEND, id=warm.id, job_id=spec.job_id)
        with self._lock:
            self._records[handle.id] = Record(
                spec=spec, container_id=rec.container_id, started_mono=time.monotonic()
            )
            self._by_job[spec.job_id] = handle
        return handle

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
            except TIMEOUT_EXCEPTIONS:
                pass  # the budget ran out; the loop reads the state and enforces the deadline
            except Exception as e:
                raise_backend(f"wait for the container of job {handle.job_id}", e)

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
        if rec.logs is not None:  # taken before a forced removal: the engine has none now
            return cap_tail(rec.logs, max_bytes)
        # Streamed so that the agent holds at most twice max_bytes, however much was printed.
        with edge(f"read the logs of job {handle.job_id}"):
            drain(
                self._container(rec).logs(stdout=True, stderr=True, stream=True, follow=False), buf
            )
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
            if not self._removed_hard(handle.id):  # the engine could not remove it politely
                raise RuntimeBackendError(
                    f"the container engine could not remove the container of job {handle.job_id}"
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
        with edge("list stale containers"):
            found = self._client.containers.list(all=True, filters={"label": filters})
        for c in found:
            try:
                c.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as e:
                raise RuntimeBackendError(
                    "the container engine could not remove a stale container"
                ) from e
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

    def _record(self, handle: Handle) -> Record:
        rec = self._records.get(handle.id) if handle.backend == BACKEND else None
        if rec is None:
            raise NotFound(f"no container of this backend for job {handle.job_id}")
        return rec

    def _container(self, rec: Record) -> Any:
        import docker

        try:
            return self._client.containers.get(rec.container_id)
        except docker.errors.NotFound as e:
            raise RuntimeBackendError(
                f"the container of job {rec.spec.job_id} is gone from the engine"
            ) from e
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"the container engine could not reach the container of job {rec.spec.job_id}"
            ) from e

    def _past_deadline(self, rec: Record) -> bool:
        return (
            rec.started_mono is not None
            and time.monotonic() >= rec.started_mono + rec.spec.timeout_s
        )

    def _read(self, rec: Record) -> ContainerStatus:
        """The container's state as the engine reports it, with what only this backend knows."""
        import docker

        try:
            attrs = self._client.api.inspect_container(rec.container_id)
        except docker.errors.NotFound:
            if rec.forced is not None:
                return rec.forced  # ended by force: what it was killed for stays its ending
            return ContainerStatus(RunState.REMOVED, reason="the container is gone from the engine")
        except docker.errors.DockerException as e:
            raise RuntimeBackendError(
                f"the container engine could not inspect the container of job {rec.spec.job_id}"
            ) from e
        return engine_status(rec, attrs.get("State") or {})

    def _pids_note(self, rec: Record) -> str:
        """``"; it had reached its limit of N processes ..."`` when the kernel refused the job
        forks (a fork bomb), else ``""``. Best effort: from the host's cgroup files, if visible."""
        try:
            pid = int(self._client.api.inspect_container(rec.container_id)["State"]["Pid"])
        except Exception:  # a note only: never let it stand in the way of the kill
            return ""
        refused = pids_refused(pid) if pid > 0 else None
        if not refused:
            return ""
        return f"; it had reached its limit of {rec.spec.pids} processes ({refused} forks refused)"

    def _kill(self, handle: Handle, why: RunState, *, note: str = "") -> None:
        """Record why this backend ends the container and ask the engine to kill it. The ask
        is bounded by ``kill_grace_s`` and its failure is not raised: :meth:`_settle` checks
        that the container ended and kills it harder when it did not."""
        import docker

        with self._lock:
            rec = self._record(handle)
            if rec.killed is not None:
                return
            self._records[handle.id] = replace(rec, killed=why, kill_note=note)
        done, error = bounded(lambda: self._client.api.kill(rec.container_id), self._kill_grace_s)
        if done and isinstance(error, docker.errors.APIError) and error.status_code == 409:
            # Not running: never started (the stop stands, so start stays a no-op) or it ended
            # by itself just now (its own ending is the truth, not ours).
            with self._lock:
                cur = self._records[handle.id]
                if cur.started_mono is not None:
                    self._records[handle.id] = replace(cur, killed=None, kill_note="")
        elif done and isinstance(error, docker.errors.NotFound):
            pass  # gone already: _settle reads it so
        # Any other failure (the engine's "did not receive an exit event", a timeout): the
        # container may still run, and _settle takes it from here.

    def _settle(self, handle: Handle) -> ContainerStatus:
        """The final status of a container this backend killed, within about three times
        ``kill_grace_s``: the engine's kill, then SIGKILL to every process of its cgroup, then
        forced removal (its logs taken first). Raises :class:`RuntimeBackendError` only when the
        container outlives all three."""
        with self._lock:
            rec = self._record(handle)
        st = self._await_end(rec, self._kill_grace_s)
        if st is not None:
            return st
        kill_cgroup(self._host_pid(rec), rec.container_id)
        st = self._await_end(rec, self._kill_grace_s)
        if st is not None:
            return st
        if self._removed_hard(handle.id):
            with self._lock:
                return self._records[handle.id].forced or self._read(rec)
        raise RuntimeBackendError(
            f"the container of job {handle.job_id} could not be ended; the site must see to it"
        )

    def _removed_hard(self, handle_id: str) -> bool:
        """Take the container's logs, then remove it by force (bounded). True once the engine
        no longer has it; the status it ended with is kept in the record."""
        import docker

        with self._lock:
            rec = cur = self._records[handle_id]
        if cur.logs is None:
            buf = TailBuffer(rec.spec.log_bytes)
            bounded(lambda: feed_logs(self._client, rec.container_id, buf), self._kill_grace_s)
            cur = replace(cur, logs=buf.value())
        killed = cur.killed or RunState.STOPPED
        why = (
            f"ran past its timeout of {rec.spec.timeout_s:g} s and was killed{cur.kill_note}"
            if killed is RunState.KILLED_TIMEOUT
            else "stopped on request"
        )
        forced = ContainerStatus(
            killed,
            137,
            f"{why}; the engine could not kill it, so it was removed by force",
            at_pids_limit=bool(cur.kill_note),
        )
        with self._lock:
            self._records[handle_id] = replace(cur, forced=forced)
        kill_cgroup(self._host_pid(rec), rec.container_id)
        bounded(
            lambda: self._client.api.remove_container(rec.container_id, force=True, v=True),
            self._kill_grace_s,
        )
        end = time.monotonic() + self._kill_grace_s
        while True:
            try:
                self._client.api.inspect_container(rec.container_id)
            except docker.errors.NotFound:
                return True
            except Exception:  # noqa: S110 - the engine is struggling; ask again until the end
                pass
            if time.monotonic() >= end:
                return False
            time.sleep(0.2)

    def _await_end(self, rec: Record, grace_s: float) -> ContainerStatus | None:
        """The container's status once it no longer runs, or None after ``grace_s``."""
        end = time.monotonic() + grace_s
        while True:
            try:
                st = self._read(rec)
            except RuntimeBackendError:
                st = None  # the engine is struggling (a fork bomb at its limit): ask again
            if st is not None and st.state is not RunState.RUNNING:
                return st
            left = end - time.monotonic()
            if left <= 0:
                return None
            step = max(0.1, min(1.0, left))
            bounded(
                lambda: self._client.api.wait(rec.container_id, timeout=step),  # noqa: B023
                step + 1.0,
            )

    def _host_pid(self, rec: Record) -> int:
        """The host PID of the container's first process, or 0 when the engine names none."""
        try:
            pid = self._client.api.inspect_container(rec.container_id)["State"]["Pid"]
        except Exception:  # the cgroup kill is best effort; forced removal follows it
            return 0
        return pid if isinstance(pid, int) and pid > 0 else 0


def _check_assignable(warm: ContainerSpec, job: ContainerSpec) -> None:
    """Raise :class:`InvalidInput` unless the warm container of ``warm`` keeps every promise of
    ``job``: what cannot change once a container runs must already be the job's."""
    same = ("image", "runtime", "gpus", "tmp_bytes", "shm_bytes", "log_bytes", "output_dir")
    for name in same:
        if getattr(job, name) != getattr(warm, name):
            raise InvalidInput(f"{name}: the warm container's is not the job's")
    if job.gpus or job.command is not None or job.receive_mounts:
        raise InvalidInput("a warm container runs only the image's harness, without GPUs")
    code = {h: t for h, t in warm.read_only_mounts.items() if t == str(CODE_DIR)}
    for host, target in job.read_only_mounts.items():
        if target == str(CODE_DIR):
            if code.get(host) != target:
                raise InvalidInput("/code: the warm container's is not the job's")
        elif PurePosixPath(target).parent != DATA_DIR and PurePosixPath(target) != MODEL_DIR:
            raise InvalidInput(f"{target}: a warm container receives only data and the model")
    if set(warm.receive_mounts.values()) != {str(t) for t in RECEIVE_TARGETS}:
        raise InvalidInput("the warm container does not receive both /data and /model")
