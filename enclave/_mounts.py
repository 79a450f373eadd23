"""Size-capped, memory-backed host directories for a job: its ``/output`` and data staging.

A job's ``/output`` is a tmpfs mounted on a per-job host path, so a job that fills it hits
``ENOSPC`` inside its own cap and the host's disk is never touched; it is mounted ``nosuid,nodev,
noexec`` (and ``noswap`` where the kernel has it) and owned by the job user so uid 10001 can
write it. :func:`tmpfs` mounts one for the length of a ``with`` block; :func:`release` unmounts
and removes it (idempotent); :func:`wipe_leftovers` finds every mount this module made under a
root after a crash and destroys it. Mounts are made with mount(2) through libc (no util-linux
needed) and tagged with a source name starting ``sealroom-`` so that only ours are ever
unmounted. Mounting needs root (CAP_SYS_ADMIN): the site agent runs as root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from policies.errors import InvalidInput, SiteError

SOURCE_PREFIX = "sealroom-"
OUTPUT_SOURCE = "sealroom-output"

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MNT_DETACH = 2
_SAFE = MS_NOSUID | MS_NODEV | MS_NOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo``: where, what filesystem, from which source."""

    path: Path
    fstype: str
    source: str
    options: frozenset[str]


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def mount_table() -> list[MountInfo]:
    """Every mount of this process's mount namespace, in mount order."""
    out: list[MountInfo] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            fstype, source, *rest = right.split(" ")
            opts = set(fields[5].split(","))
            if rest:
                opts.update(rest[0].split(","))
            out.append(
                MountInfo(Path(_unescape(fields[4])), fstype, _unescape(source), frozenset(opts))
            )
    return out


def mounts_under(root: Path) -> list[Path]:
    """Mount points strictly below ``root``, deepest first (the order to unmount them in)."""
    real = Path(os.path.realpath(root))
    found = {m.path for m in mount_table() if real in m.path.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mount_point(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return any(m.path == real for m in mount_table())


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SiteError(
            f"cannot {what}: mounting a memory-backed directory needs root (CAP_SYS_ADMIN); "
            "run the site agent as root"
        )


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> int:
    rc = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data is not None else None,
    )
    return 0 if rc == 0 else ctypes.get_errno()


def _swap_active() -> bool:
    try:
        with open("/proc/swaps", encoding="ascii") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True  # cannot tell: assume the worst


def mount_tmpfs(
    target: Path,
    *,
    size_bytes: int,
    owner: tuple[int, int],
    mode: int = 0o700,
    nr_inodes: int | None = None,
    source: str = OUTPUT_SOURCE,
    require_noswap: bool = False,
    huge: bool = False,
) -> None:
    """Mount a fresh tmpfs of ``size_bytes`` (``nosuid,nodev,noexec``) on the directory ``target``.

    ``noswap`` (Linux 6.4+) is asked for so that nothing written there is paged to disk; where
    the kernel lacks it the mount goes on without it unless ``require_noswap`` and swap is active
    (then it fails closed: decrypted data must never reach a disk). ``huge`` asks for huge pages
    where a file covers a whole one (``huge=within_size``; for writers through memory maps),
    falling back to ordinary pages. Raises :class:`SiteError`.
    """
    _require_root(f"mount a tmpfs on {target}")
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise InvalidInput(f"size_bytes: must be a positive integer, got {size_bytes!r}")
    if not source.startswith(SOURCE_PREFIX):
        raise InvalidInput(f"source: must start with {SOURCE_PREFIX!r} to be found again")
    uid, gid = owner
    base = f"size={size_bytes},mode={mode:o},uid={uid},gid={gid}"
    if nr_inodes is not None:
        base += f",nr_inodes={nr_inodes}"
    tries = (",huge=within_size", "") if huge else ("",)
    err = errno.EINVAL
    for extra in tries:
        err = _mount(source, target, "tmpfs", _SAFE, base + ",noswap" + extra)
        if err != errno.EINVAL:
            break
    if err == errno.EINVAL:
        if require_noswap and _swap_active():
            raise SiteError(
                f"cannot mount {target} without swap: the kernel lacks tmpfs noswap and swap is "
                "active, so its content could be paged to disk"
            )
        for extra in tries:
            err = _mount(source, target, "tmpfs", _SAFE, base + extra)
            if err != errno.EINVAL:
                break
    if err:
        raise SiteError(f"cannot mount a tmpfs on {target}: {os.strerror(err)}")


REMOUNT_TRIES = 20
REMOUNT_WAIT_S = 0.05


def remount_readonly(target: Path) -> None:
    """Make the tmpfs at ``target`` read-only. The kernel refuses (EBUSY) while any file of it
    is open for writing anywhere: briefly so when another thread of the site forks or an engine
    copies the mount table as a container starts (sites sharing a process, two jobs staging at
    once); so EBUSY is tried again for up to a second before it is the site's error."""
    _require_root(f"remount {target}")
    for _ in range(REMOUNT_TRIES):
        err = _mount("none", target, None, MS_REMOUNT | MS_RDONLY | _SAFE, None)
        if err != errno.EBUSY:
            break
        time.sleep(REMOUNT_WAIT_S)
    if err:
        raise SiteError(f"cannot remount {target} read-only: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount ``target``; if it is busy, detach it (it goes when its last user does)."""
    _require_root(f"unmount {target}")
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno() if err == errno.EBUSY else err
    raise SiteError(f"cannot unmount {target}: {os.strerror(err)}")


def release(target: Path) -> None:
    """Unmount every mount on ``target`` (stacked ones too) and remove the empty directory.

    Idempotent: a missing ``target`` is fine. Raises :class:`SiteError` if the directory is not
    empty once unmounted (something wrote under the mount point: never delete blindly).
    """
    if not os.path.lexists(target):
        return
    for sub in mounts_under(target):
        unmount(sub)
    while is_mount_point(target):
        unmount(target)
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SiteError(f"cannot remove {target} after unmounting it: {e.strerror}") from e


@contextmanager
def tmpfs(
    target: Path,
    *,
    size_bytes: int,
    owner: tuple[int, int],
    mode: int = 0o700,
    source: str = OUTPUT_SOURCE,
    require_noswap: bool = False,
) -> Iterator[Path]:
    """Create ``target`` (it must not exist), mount a capped tmpfs on it, yield it; on exit
    unmount and remove it, whatever happened. Raises :class:`SiteError` (and InvalidInput)."""
    _require_root(f"mount a tmpfs on {target}")
    try:
        os.mkdir(target, 0o700)
    except FileExistsError as e:
        raise SiteError(f"{target} already exists: a job's mount is never reused") from e
    except OSError as e:
        raise SiteError(f"cannot create {target}: {e.strerror}") from e
    try:
        mount_tmpfs(
            target,
            size_bytes=size_bytes,
            owner=owner,
            mode=mode,
            source=source,
            require_noswap=require_noswap,
        )
    except BaseException:
        os.rmdir(target)
        raise
    try:
        yield target
    finally:
        release(target)


def wipe_leftovers(root: Path) -> list[Path]:
    """Unmount every mount of ours (source ``sealroom-*``) below ``root`` and remove its mount
    point; return what was wiped. For the agent's start-up after a crash: no output or staged
    data may outlive its run. Mounts made by anyone else are left alone."""
    if not os.path.isdir(root):
        return []
    real = Path(os.path.realpath(root))
    ours = sorted(
        {
            m.path
            for m in mount_table()
            if real in m.path.parents and m.source.startswith(SOURCE_PREFIX)
        },
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for path in ours:
        release(path)
    return ours
