"""Memory-backed mounts for staging: mount, remount read-only, unmount, and find leftovers.

A private, minimal helper (mount(2) through libc, no util-linux needed) until the site's shared
mount code (``enclave/_mounts.py``) exists; the two are meant to be merged. Decrypted data lives
only on these mounts, so they are mounted ``noswap`` (Linux 6.4+) where the kernel supports it:
a swapped-out tmpfs page would put plaintext on the host's disk. Where the kernel lacks
``noswap`` the mount proceeds only if no swap device is active, and fails closed otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from pathlib import Path

from policies.errors import SiteError

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


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> int:
    rc = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data is not None else None,
    )
    return 0 if rc == 0 else ctypes.get_errno()


def swap_active() -> bool:
    """Whether any swap device is in use on this host."""
    try:
        with open("/proc/swaps", encoding="ascii") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True  # cannot tell: assume the worst


def mount_tmpfs(
    target: Path, *, size_bytes: int, nr_inodes: int, mode: int, uid: int, gid: int
) -> None:
    """Mount a fresh tmpfs (nosuid, nodev, noexec, noswap) of ``size_bytes`` on ``target``.

    Huge pages are asked for (``huge=within_size``: only where a file covers a whole huge page)
    because staging writes through memory maps, where 4 KiB page faults would cost more than the
    decryption; kernels without them get ordinary pages.
    """
    base = f"size={size_bytes},nr_inodes={nr_inodes},mode={mode:o},uid={uid},gid={gid}"
    err = errno.EINVAL
    for extra in (",noswap,huge=within_size", ",noswap"):
        err = _mount("sealroom-stage", target, "tmpfs", _SAFE, base + extra)
        if err != errno.EINVAL:
            break
    if err == errno.EINVAL:
        if swap_active():
            raise SiteError(
                "the kernel cannot mount tmpfs with noswap and swap is active: decrypted data "
                "could be paged to disk, so staging is refused"
            )
        for extra in (",huge=within_size", ""):
            err = _mount("sealroom-stage", target, "tmpfs", _SAFE, base + extra)
            if err != errno.EINVAL:
                break
    if err:
        raise SiteError(
            f"cannot mount a tmpfs on {target}: {os.strerror(err)} (staging needs root)"
        )


def remount_readonly(target: Path) -> None:
    err = _mount("sealroom-stage", target, None, MS_REMOUNT | MS_RDONLY | _SAFE, None)
    if err:
        raise SiteError(f"cannot remount {target} read-only: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount ``target``; if it is busy, detach it (it goes when its last user does)."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno() if err == errno.EBUSY else err
    raise SiteError(f"cannot unmount {target}: {os.strerror(err)}")


_OCTAL = re.compile(r"\\([0-7]{3})")


def mount_points() -> list[Path]:
    """Every mount point of this process's mount namespace, in mount order."""
    out: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            field = line.split(" ")[4]
            out.append(Path(_OCTAL.sub(lambda m: chr(int(m[1], 8)), field)))
    return out


def mounts_under(root: Path) -> list[Path]:
    """Mount points strictly below ``root``, deepest first (the order to unmount them in)."""
    root = root.resolve()
    found = {p for p in mount_points() if root in p.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mount_point(path: Path) -> bool:
    return path.resolve() in set(mount_points())
