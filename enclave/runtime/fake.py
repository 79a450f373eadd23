"""An in-process :class:`~enclave.runtime.Runtime` for tests that need a fast site.

It isolates nothing and runs no image: "starting" a container calls a Python handler in a
thread, which gets a :class:`FakeJob` (the spec, the output directory, a log writer, a stop
event) and returns an exit code. It keeps the same states, timeouts, idempotency and errors as a
real backend, so the contract tests run against it too (like httpx's ``MockTransport``).

Handlers end on their own or when ``job.stopped`` is set (stop and timeout set it; use
:meth:`FakeJob.sleep`, which returns early). ``MemoryError`` from a handler reads as an OOM kill,
``SystemExit(n)`` as exit code ``n``, any other exception as exit code 1 with its traceback in
the logs. A handler that ignores a stop for ``kill_grace_s`` is a backend failure.
"""

from __future__ import annotations

import hashlib
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from enclave.runtime._base import (
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

BACKEND = "fake"
OOM_EXIT_CODE = 137


@dataclass
class FakeJob:
    """What a handler sees of its "container"."""

    spec: ContainerSpec
    output_dir: Path
    stopped: threading.Event
    _log: TailBuffer
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, data: bytes | str) -> None:
        """Write to the job's stdout/stderr (kept up to ``spec.log_bytes``, the tail)."""
        with self._lock:
            self._log.feed(data.encode() if isinstance(data, str) else data)

    def sleep(self, seconds: float) -> bool:
        """Sleep, or return early (True) when the job is stopped or timed out."""
        return self.stopped.wait(seconds)


Handler = Callable[[FakeJob], int | None]


@dataclass
class _Run:
    spec: ContainerSpec
    job: FakeJob
    thread: threading.Thread | None = None
    started_mono: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    oom: bool = False
    killed: RunState | None = None
    removed: ContainerStatus | None = None


class FakeRuntime:
    """The fake backend. ``handler`` runs as every job; ``images`` maps references to IDs.

    A reference not in ``images`` resolves to an ID made from its name; ``prepare`` knows only
    the IDs in ``images`` and those ``resolve_image`` has handed out (others: NotFound)."""

    def __init__(
        self,
        handler: Handler,
        *,
        images: dict[str, str] | None = None,
        kill_grace_s: float = 5.0,
    ) -> None:
        self._handler = handler
        self._images = dict(images or {})
        self._known = set(self._images.values())
        self._kill_grace_s = kill_grace_s
        self._runs: dict[str, _Run] = {}
        self._by_job: dict[str, Handle] = {}
        self._lock = threading.RLock()
        self._counter = 0

    def resolve_image(self, reference: str) -> str:
        if reference in self._images:
            return self._images[reference]
        if reference.startswith("sha256:"):
            if reference in self._known:
                return reference
            raise NotFound(f"image {reference!r} is not known to the fake backend")
        image_id = "sha256:" + hashlib.sha256(reference.encode()).hexdigest()
        with self._lock:
            self._known.add(image_id)
        return image_id

    def prepare(self, spec: ContainerSpec) -> Handle:
        with self._lock:
            known = self._by_job.get(spec.job_id)
            if known is not None:
                if self._runs[known.id].spec != spec:
                    raise InvalidState(
                        f"job {spec.job_id} was already prepared with a different spec"
                    )
                return known
            check_mount_sources(spec)
            if spec.image not in self._known:
                raise NotFound(f"image {spec.image} is not known to the fake backend")
            self._counter += 1
            handle = Handle(backend=BACKEND, id=f"fake-{self._counter}", job_id=spec.job_id)
            job = FakeJob(spec, spec.output_dir, threading.Event(), TailBuffer(spec.log_bytes))
            self._runs[handle.id] = _Run(spec=spec, job=job)
            self._by_job[spec.job_id] = handle
            return handle

    def start(self, handle: Handle) -> None:
        with self._lock:
            run = self._run(handle)
            if run.removed is not None:
                raise InvalidState(f"the container of job {handle.job_id} was cleaned up")
            if run.thread is not None or run.killed is not None:
                return
            run.started_mono = time.monotonic()
            run.started_at = datetime.now(UTC)
            run.thread = threading.Thread(
                target=self._body, args=(run,), name=f"fake-{handle.job_id}", daemon=True
            )
            run.thread.start()

    def _body(self, run: _Run) -> None:
        code: int
        oom = False
        try:
            result = self._handler(run.job)
            code = 0 if result is None else int(result)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except MemoryError:
            code, oom = OOM_EXIT_CODE, True
        except Exception:
            run.job.log(traceback.format_exc())
            code = 1
        with self._lock:
            if run.exit_code is None:
                run.exit_code = code
                run.oom = oom
                run.finished_at = datetime.now(UTC)

    def status(self, handle: Handle) -> ContainerStatus:
        with self._lock:
            run = self._run(handle)
            if run.removed is not None:
                return run.removed
            if (
                run.thread is not None
                and run.exit_code is None
                and run.started_mono is not None
                and time.monotonic() >= run.started_mono + run.spec.timeout_s
            ):
                self._kill(handle, run, RunState.KILLED_TIMEOUT)
            return self._describe(run)

    def _describe(self, run: _Run) -> ContainerStatus:
        if run.thread is None:
            if run.killed is RunState.STOPPED:
                return ContainerStatus(RunState.STOPPED, reason="stopped before it started")
            return ContainerStatus(RunState.PREPARED)
        if run.exit_code is None:
            return ContainerStatus(RunState.RUNNING, started_at=run.started_at)
        common = (run.exit_code,)
        if run.killed is RunState.KILLED_TIMEOUT:
            return ContainerStatus(
                RunState.KILLED_TIMEOUT,
                *common,
                f"ran past its timeout of {run.spec.timeout_s:g} s and was killed",
                run.oom,
                run.started_at,
                run.finished_at,
            )
        if run.killed is RunState.STOPPED:
            return ContainerStatus(
                RunState.STOPPED,
                *common,
                "stopped on request",
                run.oom,
                run.started_at,
                run.finished_at,
            )
        if run.oom:
            return ContainerStatus(
                RunState.KILLED_OOM,
                *common,
                f"hit its memory limit of {run.spec.memory_bytes} bytes and was killed",
                True,
                run.started_at,
                run.finished_at,
            )
        reason = "" if run.exit_code == 0 else f"exited with code {run.exit_code}"
        return ContainerStatus(
            RunState.EXITED, *common, reason, False, run.started_at, run.finished_at
        )

    def wait(self, handle: Handle, *, timeout_s: float) -> ContainerStatus:
        if not timeout_s > 0:
            raise InvalidInput(f"timeout_s: must be positive, got {timeout_s!r}")
        call_end = time.monotonic() + timeout_s
        while True:
            st = self.status(handle)
            if st.state is not RunState.RUNNING:
                return st
            with self._lock:
                run = self._run(handle)
            assert run.thread is not None and run.started_mono is not None
            now = time.monotonic()
            if now >= call_end:
                return st
            run.thread.join(max(0.01, min(run.started_mono + run.spec.timeout_s, call_end) - now))

    def stop(self, handle: Handle) -> None:
        with self._lock:
            run = self._run(handle)
            if run.removed is not None or run.killed is not None:
                return
            if run.thread is None:
                run.killed = RunState.STOPPED
                return
            if run.exit_code is not None:
                return
            self._kill(handle, run, RunState.STOPPED)

    def _kill(self, handle: Handle, run: _Run, why: RunState) -> None:
        # Called with the lock held; the handler thread takes it only when it has finished.
        run.killed = why
        run.job.stopped.set()
        assert run.thread is not None
        self._lock.release()
        try:
            run.thread.join(self._kill_grace_s)
        finally:
            self._lock.acquire()
        if run.thread.is_alive():
            raise RuntimeBackendError(
                f"the fake job {handle.job_id} ignored its stop for {self._kill_grace_s:g} s"
            )
        # Whatever the handler returned after the kill, a killed job reads as killed (SIGKILL).
        run.exit_code = 137
        run.finished_at = run.finished_at or datetime.now(UTC)

    def logs(self, handle: Handle, *, max_bytes: int) -> bytes:
        with self._lock:
            run = self._run(handle)
            if run.removed is not None:
                raise InvalidState(f"the container of job {handle.job_id} was cleaned up; no logs")
        with run.job._lock:
            kept = run.job._log.value()
        buf = TailBuffer(max_bytes)
        buf.total = run.job._log.total - len(kept)
        buf.feed(kept)
        return buf.value()

    def cleanup(self, handle: Handle) -> None:
        with self._lock:
            run = self._run(handle)
            if run.removed is not None:
                return
        self.stop(handle)
        with self._lock:
            last = self._describe(run)
            run.removed = ContainerStatus(
                RunState.REMOVED,
                last.exit_code,
                f"removed after: {last.state.value}" + (f" ({last.reason})" if last.reason else ""),
                last.oom_killed,
                last.started_at,
                last.finished_at,
            )

    def remove_stale(self, *, labels: Mapping[str, str]) -> int:
        """Stop and remove every run whose labels include all of ``labels``."""
        if not labels:
            raise InvalidInput("labels: name the site's containers; refusing to remove all")
        with self._lock:
            found = [
                h
                for h in self._by_job.values()
                if self._runs[h.id].removed is None
                and all(_labels(self._runs[h.id].spec).get(k) == v for k, v in labels.items())
            ]
        for handle in found:
            self.stop(handle)
            with self._lock:
                self._runs[handle.id].removed = ContainerStatus(
                    RunState.REMOVED, reason="removed as stale after a crash"
                )
        return len(found)

    def _run(self, handle: Handle) -> _Run:
        run = self._runs.get(handle.id) if handle.backend == BACKEND else None
        if run is None:
            raise NotFound(f"no container of this backend for job {handle.job_id}")
        return run


def _labels(spec: ContainerSpec) -> dict[str, str]:
    return {**spec.labels, JOB_LABEL: spec.job_id, MANAGED_LABEL: "true"}
