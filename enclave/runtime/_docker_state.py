"""What the Docker backend knows of one container, and its status read from the engine's.

:class:`Record` is what :class:`~enclave.runtime.DockerRuntime` remembers per container: only
what the engine cannot know (that the backend killed it, and why; the status and logs of a
container it had to remove by force). :func:`engine_status` maps the engine's ``State`` (from
``inspect``) and that record to a :class:`~enclave.runtime.ContainerStatus`; pure, so every
mapping holds without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enclave.runtime._base import ContainerSpec, ContainerStatus, RunState


@dataclass(frozen=True)
class Record:
    spec: ContainerSpec
    container_id: str
    started_mono: float | None = None
    killed: RunState | None = None
    """STOPPED or KILLED_TIMEOUT when this backend killed the container, else None."""
    kill_note: str = ""
    """What the job was doing when it was killed (at its process limit), for the reason."""
    removed: ContainerStatus | None = None
    forced: ContainerStatus | None = None
    """The final status of a container this backend had to remove by force to end it."""
    logs: bytes | None = None
    """Its logs, taken just before that forced removal."""


def parse_time(text: str | None) -> datetime | None:
    if not text or text.startswith("0001-01-01"):
        return None
    # The engine writes nanoseconds; datetime keeps microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    except ValueError:
        return None


def engine_status(rec: Record, s: dict[str, Any]) -> ContainerStatus:
    """The status of the container of ``rec`` from the engine's ``State`` ``s``, with what only
    the backend knows (that it killed the container, and why)."""
    started = parse_time(s.get("StartedAt"))
    finished = parse_time(s.get("FinishedAt"))
    if started is not None and finished is not None and finished < started:
        # The engine stamps a process that exits as it starts with its exit before its start
        # (the exit is handled before the start's bookkeeping); an end is never before a start.
        finished = started
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
            at_pids_limit=bool(rec.kill_note),
        )
    if rec.killed is RunState.STOPPED:
        return ContainerStatus(RunState.STOPPED, code, "stopped on request", oom, started, finished)
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
