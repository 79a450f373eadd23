"""Where registered data comes from: a directory, a tar archive, or any iterator of
``(relative path, binary stream)`` pairs (how the gateway streams an upload in).

The readers here only refuse what they alone can see (symbolic links, hard links, devices, FIFOs,
sockets, tar members of other types); the rules every source shares (path syntax, duplicates,
size and count caps) are enforced once, by the vault, as it streams the files in. Every error is
an :class:`~policies.errors.InvalidInput` naming the file at fault.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from enclave.vault._model import check_relpath
from policies.errors import InvalidInput


class Readable(Protocol):
    """A binary stream: all the vault needs of a file being registered."""

    def read(self, size: int = -1, /) -> bytes: ...


Source = Iterator[tuple[str, Readable]]


def iter_directory(root: Path) -> Source:
    """Yield every regular file under ``root`` (sorted, depth first) with its relative path.

    Symbolic links (to files or directories), devices, FIFOs and sockets are refused. Files are
    opened with ``O_NOFOLLOW`` and checked again on the open descriptor, so swapping a file for a
    link between the listing and the open does not let the walk escape ``root``. Empty
    directories carry no data and are not recorded.
    """
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(
            f"dataset source {str(root)!r} is not a readable directory: {e.strerror}"
        ) from e
    try:
        yield from _walk(top, "")
    finally:
        os.close(top)


def _walk(dir_fd: int, prefix: str) -> Source:
    names = sorted(os.listdir(dir_fd))
    for name in names:
        rel = f"{prefix}{name}"
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = _kind(st.st_mode)
        if kind == "directory":
            sub = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
            try:
                yield from _walk(sub, rel + "/")
            finally:
                os.close(sub)
        elif kind == "regular file":
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )
            except OSError as e:
                raise InvalidInput(f"dataset file {rel!r} cannot be opened: {e.strerror}") from e
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InvalidInput(f"dataset file {rel!r} changed type while being read")
                yield rel, f
        else:
            raise InvalidInput(f"dataset file {rel!r} is a {kind}; only regular files are allowed")


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


_TAR_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


def iter_tar(archive: Path | BinaryIO) -> Source:
    """Yield the regular files of a tar archive (plain or compressed), read as a stream.

    The archive is never extracted to disk: each member is handed on as a stream and read once.
    Directory members are skipped (their names are still checked); links, devices, FIFOs, sparse
    and unknown member types are refused. One leading ``./`` is dropped from member names, as
    ``tar -C dir -c .`` writes it; every other name is checked as given.
    """
    try:
        if isinstance(archive, Path):
            tf = tarfile.open(archive, mode="r|*")  # noqa: SIM115 - closed by the with below
        else:
            tf = tarfile.open(fileobj=archive, mode="r|*")  # noqa: SIM115
    except (tarfile.TarError, OSError) as e:
        raise InvalidInput(f"dataset source is not a readable tar archive: {e}") from e
    with tf:
        members = iter(tf)
        while True:
            try:
                member = next(members)
            except StopIteration:
                return
            except (tarfile.TarError, EOFError, OSError) as e:
                raise InvalidInput(f"tar archive is corrupt: {e}") from e
            name = member.name
            if name.startswith("./"):
                name = name[2:]
            if name in ("", ".", "./"):
                continue
            if member.isdir():
                _check_dir_name(name.rstrip("/"))
                continue
            if member.type in _TAR_KINDS:
                raise InvalidInput(
                    f"tar member {member.name!r} is a {_TAR_KINDS[member.type]}; "
                    "only regular files are allowed"
                )
            if not member.isreg():
                raise InvalidInput(
                    f"tar member {member.name!r} has type {member.type!r}; "
                    "only regular files are allowed"
                )
            stream = tf.extractfile(member)
            if stream is None:  # pragma: no cover - isreg() members always have a stream
                raise InvalidInput(f"tar member {member.name!r} has no content")
            yield name, _TarStream(stream, member.name, member.size)


def _check_dir_name(name: str) -> None:
    check_relpath(name)


class _TarStream:
    """A member's stream that maps tarfile's read errors to :class:`InvalidInput`."""

    def __init__(self, inner: IO[bytes], name: str, size: int) -> None:
        self._inner = inner
        self.name = name
        self.declared_size = size

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._inner.read(size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidInput(f"tar member {self.name!r} is corrupt: {e}") from e
