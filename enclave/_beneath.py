"""Reading a file the job could have written, beneath a root, without following anything.

Everything under a job's ``/output`` is the job's: it may plant a symbolic link to a host file
(absolute or relative, to a file or a directory), a hard link, a FIFO that blocks a reader, a
device node, a 1 TiB sparse file, or swap a file for a link while the site reads it. The site
(often root) therefore opens such a path only through :func:`open_beneath`: one ``openat2(2)``
with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`` and
``O_NOFOLLOW | O_NONBLOCK`` (or, where the kernel lacks ``openat2``, the same walk one component
at a time with ``O_NOFOLLOW`` directory descriptors and a device check), then checks *the open
descriptor* (never the name, which can change after the check) is a regular file with one link
on the root's filesystem. Reads are capped: at most ``cap + 1`` bytes are read and a file over
its cap is refused from its size alone, so a sparse giant costs nothing. Refusals are a
:class:`BeneathRefused` whose text comes from a fixed vocabulary and never holds a job-chosen
name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
from pathlib import Path

from policies.errors import ReleaseRefused

# The reasons a read is refused: a fixed vocabulary, so a refusal never carries what the job wrote.
MISSING = "it does not exist"
LINK = "a symbolic link is on its path (links are never followed)"
OUTSIDE = "it resolves outside the root or onto another filesystem"
NOT_DIRECTORY = "a component of its path is not a directory"
NOT_REGULAR = "it is not a regular file (a FIFO, socket, device or directory)"
HARD_LINKS = "it has more than one hard link (a link may point at protected data)"
TOO_LARGE = "it exceeds its size cap"
BAD_PATH = "its path is not a plain relative path"
UNREADABLE = "it cannot be opened"
ROOT_UNUSABLE = "the root cannot be opened as a directory"
CHANGED = "it changed after it was listed"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO returns at once (and is refused on the descriptor) instead of
# waiting for a writer; O_NOCTTY: a terminal device never becomes the site's controlling tty.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

# openat2 has the same number on every architecture that took the unified table (Linux 5.6+).
_OPENAT2_NR: int | None = (
    437
    if sys.platform == "linux"
    and platform.machine()
    in {"x86_64", "aarch64", "arm64", "i386", "i686", "armv7l", "riscv64", "ppc64le", "s390x"}
    else None
)


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class BeneathRefused(ReleaseRefused):
    """A job-writable path was not read. ``reason`` is one of this module's fixed reasons;
    ``errno`` the system's error where there was one (for the site's own logs)."""

    def __init__(self, reason: str, *, err: int | None = None) -> None:
        super().__init__(f"a file the job wrote was not read: {reason}")
        self.reason = reason
        self.errno = err


_libc: ctypes.CDLL | None = None


def _openat2(dir_fd: int, relpath: str) -> int | None:
    """The file's descriptor, or None where the kernel has no ``openat2`` (ENOSYS)."""
    global _libc, _OPENAT2_NR
    if _OPENAT2_NR is None:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags=_FILE_FLAGS, mode=0, resolve=_RESOLVE)
    while True:
        fd = _libc.syscall(
            ctypes.c_long(_OPENAT2_NR),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(relpath)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err == errno.ENOSYS:
            _OPENAT2_NR = None  # an older kernel (or a filter that hides it): walk by hand
            return None
        raise _refusal(err)


def _refusal(err: int) -> BeneathRefused:
    reason = {
        errno.ENOENT: MISSING,
        errno.ELOOP: LINK,
        errno.EXDEV: OUTSIDE,
        errno.ENOTDIR: NOT_DIRECTORY,
        errno.ENXIO: NOT_REGULAR,  # a socket, or a device with no driver behind it
        errno.EISDIR: NOT_REGULAR,
    }.get(err, UNREADABLE)
    return BeneathRefused(reason, err=err)


def _components(relpath: str) -> list[str]:
    parts = relpath.split("/")
    if not relpath or "\0" in relpath or any(p in ("", ".", "..") for p in parts):
        raise BeneathRefused(BAD_PATH)
    return parts


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk_open(root_fd: int, parts: list[str], root_dev: int) -> int:
    """The same resolution as ``openat2`` above, by hand: each directory opened with
    ``O_NOFOLLOW`` from the one before (``lstat`` semantics) and kept on the root's device."""
    fds: list[int] = []
    try:
        here = root_fd
        for part in parts[:-1]:
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=here)
            except OSError as e:
                # O_DIRECTORY | O_NOFOLLOW on a link says ENOTDIR: name the link as openat2 does.
                is_link = e.errno == errno.ENOTDIR and _is_link(part, here)
                refusal = BeneathRefused(LINK, err=e.errno) if is_link else _refusal(e.errno or 0)
                raise refusal from None  # the OSError's text holds the job's name
            here = sub
            fds.append(here)
            if os.fstat(here).st_dev != root_dev:
                raise BeneathRefused(OUTSIDE)
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=here)
        except OSError as e:
            raise _refusal(e.errno or 0) from None
    finally:
        for fd in fds:
            os.close(fd)


def _open_root(root: Path | int) -> tuple[int, bool]:
    if isinstance(root, int):
        return root, False
    try:
        return os.open(root, _DIR_FLAGS), True
    except OSError as e:
        raise BeneathRefused(ROOT_UNUSABLE, err=e.errno) from None


def open_beneath(root: Path | int, relpath: str) -> int:
    """A read-only descriptor of the regular file ``relpath`` beneath ``root`` (a directory path,
    itself not a link, or an open directory descriptor). The caller closes it.

    Raises :class:`BeneathRefused` when any component is a link, the path leaves the root or its
    filesystem, or the opened file is not a regular file with exactly one link."""
    parts = _components(relpath)
    root_fd, owned = _open_root(root)
    try:
        root_dev = os.fstat(root_fd).st_dev
        fd = _openat2(root_fd, relpath)
        if fd is None:
            fd = _walk_open(root_fd, parts, root_dev)
    finally:
        if owned:
            os.close(root_fd)
    try:
        st = os.fstat(fd)  # the descriptor, not the name: what is read is what was checked
        if not stat.S_ISREG(st.st_mode):
            raise BeneathRefused(NOT_REGULAR)
        if st.st_nlink != 1:
            raise BeneathRefused(HARD_LINKS)
        if st.st_dev != root_dev:
            raise BeneathRefused(OUTSIDE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, *, max_bytes: int, offset: int = 0) -> bytes:
    """All of an open regular file from ``offset``, refused when over ``max_bytes``: the size
    is checked before any read and at most ``max_bytes + 1`` bytes are ever read (it may grow)."""
    if os.fstat(fd).st_size - offset > max_bytes:
        raise BeneathRefused(TOO_LARGE)
    data = _pread_upto(fd, max_bytes + 1, offset)
    if len(data) > max_bytes:
        raise BeneathRefused(TOO_LARGE)
    return data


def _pread_upto(fd: int, limit: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.pread(fd, min(limit - got, 1 << 20), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_beneath(root: Path | int, relpath: str, *, max_bytes: int) -> bytes:
    """The content of the regular file ``relpath`` beneath ``root``, at most ``max_bytes``.

    Raises :class:`BeneathRefused` (see :func:`open_beneath`), or when the file is larger."""
    fd = open_beneath(root, relpath)
    try:
        return read_fd(fd, max_bytes=max_bytes)
    finally:
        os.close(fd)


def read_new(
    root: Path | int, relpath: str, offset: int, *, max_bytes: int, max_size: int
) -> bytes:
    """Up to ``max_bytes`` of a growing regular file from ``offset`` on (empty when nothing is
    new): for following a file the job appends to. A file over ``max_size`` in all is refused
    from its size, unread.

    Raises :class:`BeneathRefused` (see :func:`open_beneath`), or when the file is larger."""
    if offset < 0:
        raise ValueError("offset: must not be negative")
    fd = open_beneath(root, relpath)
    try:
        if os.fstat(fd).st_size > max_size:
            raise BeneathRefused(TOO_LARGE)
        return _pread_upto(fd, max_bytes, offset)
    finally:
        os.close(fd)


def copy_beneath(root: Path | int, relpath: str, dest: Path, *, max_bytes: int) -> None:
    """Copy the regular file ``relpath`` beneath ``root`` to ``dest`` (a new file, 0600), at
    most ``max_bytes``, streamed: for a job-written file the site then reads by name.

    Raises :class:`BeneathRefused` (see :func:`open_beneath`), or when the file is larger;
    ``dest`` is not left behind then."""
    fd = open_beneath(root, relpath)
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise BeneathRefused(TOO_LARGE)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(out, "wb") as f:
                got = 0
                while chunk := os.pread(fd, 1 << 20, got):
                    got += len(chunk)
                    if got > max_bytes:  # it grew while read
                        raise BeneathRefused(TOO_LARGE)
                    f.write(chunk)
        except BaseException:
            dest.unlink()
            raise
    finally:
        os.close(fd)
