"""Warm containers: the runtime image started ahead of any job, its imports done, then given to
exactly one job and destroyed after it.

What a team waits for between the approval and its first step is mostly Python importing
torch, Lightning and transformers (about 4 of the 4.5 s a bare ``docker run`` takes to its
first step on the bench). A site with ``SiteLimits.warm_containers`` > 0 keeps that many
containers started ahead (:class:`WarmPool`), each in a slot of its own, ``<site>/warm/<slot>/``:

- ``data/`` and ``model/``: empty directories, each bound onto itself and made a shared mount,
  which the container receives at ``/data`` and ``/model``, read-only, with slave propagation
  (``ContainerSpec.receive_mounts``). Nothing is below them until the site gives the container
  a job; then the site mounts the job's staged datasets at ``data/<name>`` and the base model at
  ``model/base``, read-only, ``nosuid,nodev,noexec`` from the moment they appear (``open_tree``,
  ``mount_setattr``, ``move_mount``): the job sees ``/data/<name>`` and ``/model/base`` as a cold
  container does, and the same inodes, so the access ledger's watches on the staging see its
  opens.
- ``code/``: empty, read-only at ``/code``. The job's assignment (its environment, the job
  configuration in it) is written there last, atomically; the warm harness
  (``python -m trainers.harness --warm``) waits for it.
- ``output/``: a fresh size-capped tmpfs owned by the job user, the job's ``/output``.

What keeps a warm container no weaker than a cold one (each tried by
``tests/integration/test_hostile_warm.py``):

- **Nothing of a job before it is given one**: no data, no model, no job configuration, not even
  its name (the container is labelled with its slot). It has run only the site's own image code.
- **The same isolation**: it is created by the same runtime with the same options from a spec
  with the site's limits (no network, read-only root, every capability dropped, the same
  ``/tmp``, ``/dev/shm``, log caps and OCI runtime). Its memory (no swap beyond it), CPU and
  process limits are set to the job's and read back from the engine *before* anything of the
  job reaches it; a job whose container it could not be (a code bundle, custom code, GPUs)
  starts cold.
- **One job**: it leaves the pool before anything else happens to it and is destroyed with its
  slot after the job, whatever the job's end; never returned.
- **No state from the warm-up the job can read**: the harness writes nothing while warm, and the
  slot's output must still be empty when the job is given it, else the container is destroyed
  and the job starts cold.
- **Destroyed on agent start** like any leftover (the site's labels), and its slot mounts
  unmounted *before* the staging is wiped: a slot's bind keeps a staging tmpfs alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from enclave import _mounts
from enclave._jobcontainer import SiteLimits
from enclave.contract import Report, RunOrder, SiteReport
from enclave.runtime import ContainerSpec, Handle
from policies.errors import SiteError
from trainers.contract import (
    DATA_DIR,
    MODEL_DIR,
    WARM_ASSIGN_FILE,
    WARM_FLAG,
    WARM_READY,
)

WARM_LABEL = "org.sealroom.warm"
WARM_TIMEOUT_S = 30 * 24 * 3600.0
"""How long a warm container may wait for a job (the runtime's deadline counts from its
start until it is given one; the job's own timeout then counts from that moment)."""
JOB_OWNER = (10001, 10001)
HARNESS_WARM = ("/usr/bin/python3", "-m", "trainers.harness", WARM_FLAG)
"""What a warm container runs: the image's harness, waiting for its job (tests run others)."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64 and arm64 alike
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_PRIVATE, _MS_SHARED = 4096, 1 << 18, 1 << 20


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _fail(what: str) -> SiteError:
    err = ctypes.get_errno()
    return SiteError(f"cannot {what}: {os.strerror(err)} (errno {err})")


def _shared_self_bind(path: Path) -> None:
    """Make the empty directory ``path`` a mount point of its own with shared propagation:
    what is mounted below it later reaches the containers that received it."""
    p = os.fsencode(path)
    if _libc.mount(p, p, None, _MS_BIND, None) != 0:
        raise _fail(f"bind {path.name} onto itself")
    if _libc.mount(None, p, None, _MS_SHARED, None) != 0:
        raise _fail(f"share {path.name}")


def bind_read_only(source: Path, target: Path) -> None:
    """Mount the directory ``source`` at the empty directory ``target``, read-only and
    ``nosuid,nodev,noexec`` from the moment it appears there (it is made aside, detached, and
    only then moved in; a remount after the fact would not reach the containers that received
    the copy). Private: nothing mounted below ``source`` later follows it."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
    )
    if fd < 0:
        raise _fail(f"clone the mount of {source.name}")
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC,
            0,
            _MS_PRIVATE,
            0,
        )
        rc = _libc.syscall(
            _SYS_MOUNT_SETATTR,
            fd,
            b"",
            _AT_EMPTY_PATH | _AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        )
        if rc != 0:
            raise _fail(f"make the mount of {source.name} read-only")
        rc = _libc.syscall(
            _SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH
        )
        if rc != 0:
            raise _fail(f"mount {source.name} for the job")
    finally:
        os.close(fd)


def unmount_all(root: Path) -> None:
    """Unmount every mount at or below ``root``, deepest first. Raises :class:`SiteError` if
    one stays (never delete through a mount)."""
    if not os.path.isdir(root):
        return
    real = Path(os.path.realpath(root))
    for _ in range(64):  # stacked mounts: one layer each time round
        found = [m.path for m in _mounts.mount_table() if m.path == real or real in m.path.parents]
        if not found:
            return
        for path in sorted(set(found), key=lambda p: len(p.parts), reverse=True):
            if _libc.umount2(os.fsencode(path), 0) != 0 and ctypes.get_errno() not in (
                errno.EINVAL,
                errno.ENOENT,
            ):
                raise _fail(f"unmount {path.name}")
    raise SiteError(f"mounts below {root.name} would not go away")


@dataclass
class Slot:
    """One warm container and the host directories it received."""

    root: Path
    handle: Handle | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def output(self) -> Path:
        return self.root / "output"

    def destroy(self, runtime: Any) -> None:
        """The container removed, then every mount of the slot, then the slot."""
        if self.handle is not None:
            runtime.cleanup(self.handle)
        unmount_all(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


class WarmPool:
    """Up to ``limits.warm_containers`` started containers waiting for a job (see the module).

    :meth:`fill` starts (in the background) as many as are missing; :meth:`give` hands one to
    a job, or says there is none; :meth:`close` destroys the idle ones.
    """

    def __init__(
        self,
        root: Path,
        *,
        runtime: Any,
        image: str,
        limits: SiteLimits,
        labels: Mapping[str, str],
        command: tuple[str, ...] = HARNESS_WARM,
    ) -> None:
        self.root = root
        self.command = command
        self.runtime = runtime
        self.image = image
        self.limits = limits
        self.labels = dict(labels)
        self.size = limits.warm_containers
        self.last_error: BaseException | None = None
        self._idle: list[Slot] = []
        self._lock = threading.Lock()
        self._filling: threading.Thread | None = None
        self._closed = False
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def wipe_leftovers(root: Path) -> None:
        """After a crash (the containers already removed): every slot's mounts and directory."""
        if not root.is_dir():
            return
        for slot in root.iterdir():
            unmount_all(slot)
            shutil.rmtree(slot, ignore_errors=True)

    def available(self) -> bool:
        return self.runtime_can_warm() and self.size > 0

    def serves(self, order: RunOrder) -> bool:
        """A warm container runs only the image's harness for a built-in trainer, without a
        code bundle or a GPU: what it can be given without changing what it is."""
        spec = order.spec
        return (
            self.available()
            and not spec.is_custom
            and order.bundle is None
            and spec.resources.gpus == 0
        )

    def runtime_can_warm(self) -> bool:
        return callable(getattr(self.runtime, "assign", None))

    # -- filling ----------------------------------------------------------------------------

    def fill(self) -> None:
        """Start warming the missing containers on a thread of its own (one at a time)."""
        if not self.available():
            return
        with self._lock:
            if self._closed or (self._filling is not None and self._filling.is_alive()):
                return
            self._filling = threading.Thread(target=self._fill, name="warm-pool", daemon=True)
            self._filling.start()

    def _fill(self) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._idle) >= self.size:
                    return
            try:
                slot = self._warm_one()
            except Exception as e:  # the pool stays short; jobs start cold meanwhile
                self.last_error = e
                return
            with self._lock:
                if self._closed:
                    slot.destroy(self.runtime)
                    return
                self._idle.append(slot)

    def _warm_one(self) -> Slot:
        slot = Slot(self.root / secrets.token_hex(6))
        slot.root.mkdir(mode=0o700)
        try:
            for d in (slot.data, slot.model):
                d.mkdir(mode=0o755)
                _shared_self_bind(d)
            slot.code.mkdir(mode=0o755)
            slot.output.mkdir(mode=0o700)
            _mounts.mount_tmpfs(slot.output, size_bytes=self.limits.output_bytes, owner=JOB_OWNER)
            spec = ContainerSpec(
                image=self.image,
                job_id=f"warm-{slot.root.name}",
                output_dir=slot.output,
                memory_bytes=self.limits.memory_mb * 1024**2,
                cpus=self.limits.cpus,
                pids=self.limits.pids,
                tmp_bytes=self.limits.tmp_bytes,
                timeout_s=WARM_TIMEOUT_S,
                read_only_mounts={slot.code: str(PurePosixPath("/code"))},
                receive_mounts={slot.data: str(DATA_DIR), slot.model: str(MODEL_DIR.parent)},
                runtime=self.limits.runtime,
                labels={**self.labels, WARM_LABEL: slot.root.name},
                command=self.command,
            )
            slot.handle = self.runtime.prepare(spec)
            self.runtime.start(slot.handle)
        except BaseException:
            slot.destroy(self.runtime)
            raise
        return slot

    def ready(self, *, timeout_s: float) -> bool:
        """Whether the pool is full and every idle container has finished warming (for the
        bench: so that warming does not run beside what it measures)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = list(self._idle)
                filling = self._filling is not None and self._filling.is_alive()
            if len(idle) >= self.size and not filling:
                done = all(
                    WARM_READY.encode() in self.runtime.logs(s.handle, max_bytes=4096)
                    for s in idle
                    if s.handle is not None
                )
                if done:
                    return True
            time.sleep(0.05)
        return False

    # -- giving -----------------------------------------------------------------------------

    def take(self) -> Slot | None:
        with self._lock:
            return self._idle.pop(0) if self._idle else None

    def give(self, slot: Slot, cspec: ContainerSpec, stack: ExitStack) -> Handle:
        """Give ``slot``'s container to the job of ``cspec`` (built with the slot's output and
        code directories): the job's limits, then its data and model, then its assignment.
        Registers the slot's destruction on ``stack``. Raises :class:`_NotUsable` (nothing of
        the job reached the slot, which is destroyed: start the job cold) or another error
        once something of it may have (the run fails)."""
        if slot.handle is None:
            raise SiteError("a warm slot without a container")
        with ExitStack() as undo:
            undo.callback(slot.destroy, self.runtime)
            try:
                if os.listdir(slot.output):
                    raise NotUsable("the warm container wrote to its output before its job")
                handle: Handle = self.runtime.assign(slot.handle, cspec)
            except NotUsable:
                raise
            except Exception as e:
                raise NotUsable(f"the warm container could not take the job: {e}") from e
            slot.handle = handle
            for host, target in cspec.read_only_mounts.items():
                t = PurePosixPath(target)
                if t.parent == DATA_DIR:
                    where = slot.data / t.name
                elif t == MODEL_DIR:
                    where = slot.model / MODEL_DIR.name
                else:
                    continue  # /code: the slot's own, already in place (the runtime checked)
                where.mkdir(mode=0o755)
                bind_read_only(host, where)
            _write_assignment(slot.code, cspec.env)
            stack.push(undo.pop_all())
        return handle

    def give_or_refuse(
        self, slot: Slot, cspec: ContainerSpec, stack: ExitStack, report: Report
    ) -> Handle | None:
        """:meth:`give`, or None when the slot cannot take the job (nothing of the job reached
        it), which is reported as ``container.warm_refused``: start the job cold."""
        try:
            return self.give(slot, cspec, stack)
        except NotUsable as e:
            report(
                SiteReport(
                    cspec.job_id,
                    audit_action="container.warm_refused",
                    audit_outcome="error",
                    details={"reason": str(e)},
                )
            )
            return None

    def close(self, *, timeout_s: float = 120.0) -> None:
        """Stop filling (the container being warmed is destroyed when its start returns) and
        destroy the idle ones."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            filling = self._filling
        for slot in idle:
            with contextlib.suppress(Exception):
                slot.destroy(self.runtime)
        if filling is not None:
            filling.join(timeout_s)


class NotUsable(SiteError):
    """The warm container cannot take this job; nothing of the job reached it."""


def _write_assignment(code: Path, env: Mapping[str, str]) -> None:
    name = PurePosixPath(WARM_ASSIGN_FILE).name
    partial = code / f".{name}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"env": dict(env)}, sort_keys=True))
    os.chmod(partial, 0o644)
    os.replace(partial, code / name)
