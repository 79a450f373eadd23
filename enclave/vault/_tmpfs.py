"""Staging's memory-backed mounts: the site's shared mount code (:mod:`enclave._mounts`) with
staging's choices.

Decrypted data lives only on these mounts, so they are mounted ``noswap`` (Linux 6.4+) where
the kernel supports it, and where it does not, only if no swap device is active (fail closed: a
swapped-out page would put plaintext on the host's disk). Huge pages are asked for because
staging writes through memory maps, where 4 KiB page faults would cost more than decryption; each
map is also advised ``MADV_HUGEPAGE`` so that on fragmented memory a fault compacts rather than
falls back to small pages (see ``_staging._ask_huge_pages``).
"""

from __future__ import annotations

from pathlib import Path

from enclave import _mounts

STAGE_SOURCE = "sealroom-stage"

is_mount_point = _mounts.is_mount_point
mounts_under = _mounts.mounts_under
remount_readonly = _mounts.remount_readonly
unmount = _mounts.unmount


def mount_points() -> list[Path]:
    """Every mount point of this process's mount namespace, in mount order."""
    return [m.path for m in _mounts.mount_table()]


def mount_tmpfs(
    target: Path, *, size_bytes: int, nr_inodes: int, mode: int, uid: int, gid: int
) -> None:
    """Mount a fresh staging tmpfs (nosuid, nodev, noexec, noswap) of ``size_bytes``."""
    _mounts.mount_tmpfs(
        target,
        size_bytes=size_bytes,
        owner=(uid, gid),
        mode=mode,
        nr_inodes=nr_inodes,
        source=STAGE_SOURCE,
        require_noswap=True,
        huge=True,
    )
