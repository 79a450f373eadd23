"""The contract every container backend keeps: the :class:`Runtime` protocol and its values.

A backend runs one job's code in isolation. The site agent hands it a :class:`ContainerSpec`
(image pinned by ID, read-only mounts, the writable output directory, the limits) and drives it
through ``prepare -> start -> wait/status -> stop -> logs -> cleanup``. The isolation promises are
written on :class:`Runtime`; the same contract tests
(``tests/integration/test_runtime_contract.py``) run against every backend, and the
hostile-job suite attacks the Docker one.
"""

from __future__ import annotations

import enum
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from policies.errors import InvalidInput
from trainers.contract import CODE_DIR, DATA_DIR, MODEL_DIR, OUTPUT_DIR, START_DIR

JOB_LABEL = "org.sealroom.job"
"""Label naming the job on every container a backend creates."""
MANAGED_LABEL = "org.sealroom.managed"
"""Label marking every container a backend creates, so leftovers can be found after a crash."""

IMAGE_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")
_RUNTIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_SHM_BYTES = 64 * 1024**2
DEFAULT_LOG_BYTES = 16 * 1024**2


class RunState(enum.Enum):
    """Where a container is. Every state but PREPARED and RUNNING is final."""

    PREPARED = "prepared"
    """Created with all its limits, not started."""
    RUNNING = "running"
    EXITED = "exited"
    """The job's process ended by itself; ``exit_code`` says how."""
    STOPPED = "stopped"
    """Stopped by :meth:`Runtime.stop` (a cancel), before or while running."""
    KILLED_TIMEOUT = "killed_timeout"
    """Ran past ``ContainerSpec.timeout_s`` and was killed."""
    KILLED_OOM = "killed_oom"
    """Hit its memory limit; the kernel killed it."""
    REMOVED = "removed"
    """Cleaned up (or gone from the engine); nothing of it is left to inspect."""

    @property
    def final(self) -> bool:
        return self not in (RunState.PREPARED, RunState.RUNNING)


@dataclass(frozen=True)
class Handle:
    """An opaque reference to one prepared container, valid for the backend that made it."""

    backend: str
    id: str
    job_id: str


@dataclass(frozen=True)
class ContainerStatus:
    state: RunState
    exit_code: int | None = None
    reason: str = ""
    oom_killed: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    at_pids_limit: bool = False
    """The kernel had refused the job forks at its process limit when it was killed."""


def _allowed_target(target: PurePosixPath) -> bool:
    return target in (MODEL_DIR, START_DIR, CODE_DIR) or (
        target.parent == DATA_DIR and target.name not in ("", ".", "..")
    )


RECEIVE_TARGETS = frozenset({DATA_DIR, MODEL_DIR.parent})
"""Where a warm container may receive mounts later: the parents of ``/data/<name>`` and
``/model/base``."""


def _overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a backend needs to run one job, and all it may grant.

    ``read_only_mounts`` maps host directories to container paths, which must be the contract's
    (``/data/<name>``, ``/model/base``, ``/code``); ``output_dir`` is mounted read-write at
    ``/output`` and nothing else is writable but a ``tmp_bytes`` memory-backed ``/tmp`` (and
    the private ``shm_bytes`` ``/dev/shm``). ``command`` overrides the image's entrypoint and
    command (``None`` runs the image's harness). ``log_bytes`` caps what the engine keeps of
    stdout and stderr. Raises :class:`InvalidInput` naming the field at fault.

    ``receive_mounts`` is for a warm container only (:mod:`enclave._warm`): host directories
    bound read-only at the *parents* of the contract's paths (``/data``, ``/model``) with slave
    propagation, so that read-only mounts the site makes below them once it gives the
    container a job (``/data/<name>``, ``/model/base``) appear in it; nothing is below them
    before. A spec has either these or data and model in ``read_only_mounts``, never both.
    """

    image: str
    job_id: str
    output_dir: Path
    memory_bytes: int
    cpus: float
    pids: int
    tmp_bytes: int
    timeout_s: float
    env: Mapping[str, str] = field(default_factory=dict)
    read_only_mounts: Mapping[Path, str] = field(default_factory=dict)
    gpus: int = 0
    runtime: str = "runc"
    labels: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    shm_bytes: int = DEFAULT_SHM_BYTES
    log_bytes: int = DEFAULT_LOG_BYTES
    receive_mounts: Mapping[Path, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not IMAGE_ID_RE.match(self.image):
            raise InvalidInput(
                f"image: {self.image!r} is not an image ID (sha256:<64 hex>); images are pinned "
                "by ID, never by a tag that could move"
            )
        if not JOB_ID_RE.match(self.job_id):
            raise InvalidInput(f"job_id: {self.job_id!r} is not a plain identifier")
        for name in ("memory_bytes", "pids", "tmp_bytes", "shm_bytes", "log_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise InvalidInput(f"gpus: must be a non-negative integer, got {self.gpus!r}")
        for name in ("cpus", "timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf  # NaN fails too; an infinite timeout never fires
            ):
                raise InvalidInput(f"{name}: must be a positive finite number, got {value!r}")
        if not _RUNTIME_RE.match(self.runtime):
            raise InvalidInput(f"runtime: {self.runtime!r} is not a runtime name")
        out = Path(self.output_dir)
        if not out.is_absolute() or ".." in out.parts:
            raise InvalidInput(f"output_dir: {str(out)!r} must be an absolute normalised path")
        mounts: dict[Path, str] = {}
        targets: set[PurePosixPath] = set()
        for host, target in self.read_only_mounts.items():
            hp = Path(host)
            tp = PurePosixPath(target)
            if not hp.is_absolute() or ".." in hp.parts:
                raise InvalidInput(f"read_only_mounts: host path {str(hp)!r} must be absolute")
            if str(tp) != target or not _allowed_target(tp):
                raise InvalidInput(
                    f"read_only_mounts: {target!r} is not a contract path "
                    f"({DATA_DIR}/<name>, {MODEL_DIR}, {START_DIR}, {CODE_DIR})"
                )
            if tp in targets:
                raise InvalidInput(f"read_only_mounts: {target!r} is mounted twice")
            if _overlaps(PurePosixPath(hp), PurePosixPath(out)):
                raise InvalidInput(
                    f"read_only_mounts: {str(hp)!r} overlaps the writable output directory"
                )
            targets.add(tp)
            mounts[hp] = target
        receive: dict[Path, str] = {}
        for host, target in self.receive_mounts.items():
            hp = Path(host)
            tp = PurePosixPath(target)
            if not hp.is_absolute() or ".." in hp.parts:
                raise InvalidInput(f"receive_mounts: host path {str(hp)!r} must be absolute")
            if str(tp) != target or tp not in RECEIVE_TARGETS:
                raise InvalidInput(
                    f"receive_mounts: {target!r} is not {DATA_DIR} or {MODEL_DIR.parent}"
                )
            if target in receive.values() or any(_overlaps(tp, t) for t in targets):
                raise InvalidInput(f"receive_mounts: {target!r} is mounted twice")
            if _overlaps(PurePosixPath(hp), PurePosixPath(out)):
                raise InvalidInput(
                    f"receive_mounts: {str(hp)!r} overlaps the writable output directory"
                )
            receive[hp] = target
        env = dict(self.env)
        for k, v in env.items():
            if not isinstance(k, str) or not _ENV_NAME_RE.match(k):
                raise InvalidInput(f"env: {k!r} is not a variable name")
            if not isinstance(v, str) or "\0" in v:
                raise InvalidInput(f"env: the value of {k} must be a string without NUL")
        labels = dict(self.labels)
        for k, v in labels.items():
            if not isinstance(k, str) or not _LABEL_RE.match(k) or not isinstance(v, str):
                raise InvalidInput(f"labels: {k!r} is not a label name with a string value")
        if self.command is not None and (
            not self.command or not all(isinstance(a, str) and "\0" not in a for a in self.command)
        ):
            raise InvalidInput("command: must be a non-empty tuple of strings without NUL")
        # Frozen all the way down: a spec is what was checked, so nobody may change it after.
        object.__setattr__(self, "output_dir", out)
        object.__setattr__(self, "read_only_mounts", MappingProxyType(mounts))
        object.__setattr__(self, "receive_mounts", MappingProxyType(receive))
        object.__setattr__(self, "env", MappingProxyType(env))
        object.__setattr__(self, "labels", MappingProxyType(labels))
        if self.command is not None:
            object.__setattr__(self, "command", tuple(self.command))


def check_mount_sources(spec: ContainerSpec) -> tuple[tuple[Path, str], ...]:
    """Check on the host that every mount source is a real directory; return them resolved.

    Sources are resolved (symbolic links followed once, here) so the engine binds exactly the
    directory that was checked; a socket, a device or a file (``docker.sock``) is refused.
    Raises :class:`InvalidInput`.
    """
    out: list[tuple[Path, str]] = []
    every = [
        *spec.read_only_mounts.items(),
        *spec.receive_mounts.items(),
        (spec.output_dir, str(OUTPUT_DIR)),
    ]
    for host, target in every:
        try:
            st = os.stat(host)
        except OSError as e:
            raise InvalidInput(f"mount source for {target}: {host} does not exist ({e})") from e
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"mount source for {target}: {host} is not a directory")
        out.append((Path(os.path.realpath(host)), target))
    resolved_out = PurePosixPath(out[-1][0])
    for host, target in out[:-1]:
        if _overlaps(PurePosixPath(host), resolved_out):
            raise InvalidInput(f"mount source for {target} overlaps the writable output directory")
    return tuple(out)


@runtime_checkable
class Runtime(Protocol):
    """A container backend. Docker implements it today; Kubernetes can tomorrow.

    Isolation promises (each shown by an attack in ``tests/integration/test_hostile_jobs.py``):

    - **No network but loopback.** The container has its own network namespace with only ``lo``;
      the host's loopback, the site's network and DNS servers are unreachable, and the resolver
      names no server outside the container.
    - **Read-only root.** The image's filesystem cannot be written. The only writable paths are
      ``/output`` (the spec's ``output_dir``, a size-capped memory-backed host directory),
      a size-capped memory-backed ``/tmp`` (``nosuid,nodev,noexec``) and a private, capped
      ``/dev/shm``; the last two vanish with the container.
    - **Only the declared mounts.** ``/data/<name>``, ``/model/base`` and ``/code`` read-only,
      ``/output`` read-write; no Docker socket, no other host path.
    - **Unprivileged.** The job runs as uid:gid 10001 (:data:`trainers.contract.JOB_USER`), every
      capability dropped, ``no-new-privileges``, the engine's default seccomp profile, no core
      dumps.
    - **Limited.** Memory (no swap beyond it), PIDs, CPU, ``/tmp`` and ``/dev/shm`` sizes, the
      log bytes the engine keeps, and a wall-clock timeout after which the job is killed.
    - **Pinned and labelled.** The image is referenced by ID; every container carries the spec's
      labels plus :data:`JOB_LABEL` and :data:`MANAGED_LABEL`.
    - **GPUs on request only**, through a device request for exactly ``spec.gpus`` devices.

    Lifecycle: ``prepare`` creates the container with all limits (state PREPARED); ``start`` runs
    it; ``wait`` blocks up to ``timeout_s`` and kills the job once ``spec.timeout_s`` has passed
    since ``start`` (KILLED_TIMEOUT; ``status`` enforces the same deadline); ``stop`` kills it
    (STOPPED unless already final); ``logs`` returns at most ``max_bytes`` of stdout and stderr
    (the tail: that is where tracebacks are), which stay in the site; ``cleanup`` removes it
    (REMOVED). Every method is idempotent: ``start`` never runs a job twice, ``stop`` and
    ``cleanup`` on a final or removed container do nothing; ``remove_stale`` ends what a crashed
    agent left behind. Killing is bounded and is the job's ending, not the backend's failure:
    a container that does not die on the first kill is killed harder (every process of its
    cgroup, then forced removal, its logs kept for ``logs``) and still ends KILLED_TIMEOUT or
    STOPPED, ``at_pids_limit`` set where it was at its process limit. Error texts name no engine
    address and no container ID (those stay on ``__cause__``, for the site's audit). Errors:
    :class:`InvalidInput` for a bad spec,
    :class:`~policies.errors.NotFound` for a handle this backend did not make or an image it does
    not have, :class:`~policies.errors.InvalidState` for ``start``/``logs`` after ``cleanup`` (and
    ``prepare`` of a job already prepared with another spec),
    :class:`~policies.errors.RuntimeBackendError` when the backend itself fails.
    """

    def resolve_image(self, reference: str) -> str:
        """The ID (``sha256:...``) of the image ``reference`` names now. Raises NotFound."""
        ...

    def prepare(self, spec: ContainerSpec) -> Handle: ...

    def start(self, handle: Handle) -> None: ...

    def status(self, handle: Handle) -> ContainerStatus: ...

    def wait(self, handle: Handle, *, timeout_s: float) -> ContainerStatus: ...

    def stop(self, handle: Handle) -> None: ...

    def logs(self, handle: Handle, *, max_bytes: int) -> bytes: ...

    def cleanup(self, handle: Handle) -> None: ...

    def remove_stale(self, *, labels: Mapping[str, str]) -> int:
        """Kill and remove every container of this backend that carries all of ``labels`` (not
        empty: a site names its own), whoever made it; return how many. For an agent's start-up
        after a crash, *before* staging and output mounts are wiped: a container left running
        keeps its mounts' memory (the decrypted data) alive however the host unmounts them."""
        ...


class TailBuffer:
    """Keeps the last ``max_bytes`` of a stream in bounded memory (at most twice the cap)."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidInput(f"max_bytes: must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.total = 0
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._buf += chunk[-self.max_bytes :]
        if len(self._buf) > 2 * self.max_bytes:
            del self._buf[: len(self._buf) - self.max_bytes]

    def value(self) -> bytes:
        """The tail, behind a marker saying how many bytes were cut; never over the cap."""
        data = bytes(self._buf[-self.max_bytes :])
        if self.total <= self.max_bytes:
            return data
        marker = f"[sealroom: {self.total} bytes of output, earlier ones cut]\n".encode()
        if len(marker) >= self.max_bytes:
            return data
        return marker + data[len(marker) :]


def cap_tail(data: bytes, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of ``data``: its tail, behind a marker saying bytes were cut."""
    buf = TailBuffer(max_bytes)
    buf.feed(data)
    return buf.value()
