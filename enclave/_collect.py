"""Walking a job's output directory on the host without ever following a link.

The job owns ``/output`` and will plant whatever might make the host read something else: a
symbolic link to ``/data``, a hard link to a dataset file, a FIFO that blocks a reader, a device
node, a socket. :func:`walk_output` looks every name up relative to an open directory descriptor
with ``O_NOFOLLOW`` (``lstat`` semantics), accepts only directories and regular files with one
link, all on the output's own filesystem, and refuses the whole output otherwise (fail closed).
:func:`read_entry` opens a listed file the same way and checks it is still the listed inode.

Refusals never echo a job-chosen name (names can carry data): they say what kind of entry was
found and how deep. The names are kept on :attr:`OutputRefused.relpaths` for use inside the site.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from policies.errors import ReleaseRefused

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO ever be opened, the reader must not hang.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class OutputRefused(ReleaseRefused):
    """The output holds an entry that is never collected; ``relpaths`` stays in the site."""

    def __init__(self, message: str, *, relpaths: tuple[str, ...]) -> None:
        super().__init__(message)
        self.relpaths = relpaths


@dataclass(frozen=True)
class OutputEntry:
    """A regular file or directory found in the output, and which inode it was."""

    relpath: str
    is_dir: bool
    size: int
    dev: int
    ino: int


def _refusal(st: os.stat_result, root_dev: int) -> str | None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link (links are refused, never followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file or directory"
    if st.st_dev != root_dev:
        return "on another filesystem (a mount inside the output)"
    if stat.S_ISREG(mode) and st.st_nlink != 1:
        return f"a file with {st.st_nlink} hard links (a link may point at protected data)"
    return None


def walk_output(
    root: Path, *, max_entries: int = 10_000, max_depth: int = 16, max_bytes: int | None = None
) -> tuple[OutputEntry, ...]:
    """Every directory and regular file under ``root``, sorted by path, never through a link.

    Raises :class:`OutputRefused` (a :class:`ReleaseRefused`) naming each kind of bad entry, or
    when the output holds more than ``max_entries`` entries, nests deeper than ``max_depth`` or
    its files exceed ``max_bytes`` in all.
    """
    try:
        root_fd = os.open(root, _OPEN_DIR)
    except OSError as e:
        raise OutputRefused(
            "the output directory cannot be opened as a directory", relpaths=()
        ) from e
    found: list[OutputEntry] = []
    bad: list[tuple[str, str]] = []
    total = 0
    try:
        root_dev = os.fstat(root_fd).st_dev
        stack: list[tuple[int, str, int]] = [(root_fd, "", 0)]
        opened: list[int] = []
        try:
            while stack:
                dir_fd, prefix, depth = stack.pop()
                with os.scandir(dir_fd) as it:
                    names = sorted(e.name for e in it)
                for name in names:
                    rel = f"{prefix}{name}"
                    if len(found) + len(bad) >= max_entries:
                        raise OutputRefused(
                            f"the output holds more than {max_entries} entries", relpaths=()
                        )
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    why = _refusal(st, root_dev)
                    if why is not None:
                        bad.append((rel, f"an entry at depth {depth + 1} is {why}"))
                        continue
                    is_dir = stat.S_ISDIR(st.st_mode)
                    found.append(
                        OutputEntry(rel, is_dir, 0 if is_dir else st.st_size, st.st_dev, st.st_ino)
                    )
                    if is_dir:
                        if depth + 1 >= max_depth:
                            bad.append((rel, f"directories nest deeper than {max_depth}"))
                            continue
                        sub = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
                        opened.append(sub)
                        if (os.fstat(sub).st_dev, os.fstat(sub).st_ino) != (st.st_dev, st.st_ino):
                            bad.append((rel, f"an entry at depth {depth + 1} changed while read"))
                            continue
                        stack.append((sub, rel + "/", depth + 1))
                    else:
                        total += st.st_size
        finally:
            for fd in opened:
                os.close(fd)
    finally:
        os.close(root_fd)
    if max_bytes is not None and total > max_bytes:
        bad.append(("", f"the output's files exceed {max_bytes} bytes in all"))
    if bad:
        reasons = sorted({why for _, why in bad})
        raise OutputRefused(
            "output refused: " + "; ".join(reasons), relpaths=tuple(rel for rel, _ in bad if rel)
        )
    return tuple(sorted(found, key=lambda e: e.relpath))


def read_entry(root: Path, entry: OutputEntry, *, max_bytes: int) -> bytes:
    """The content of a listed regular file, opened without following any link and checked to
    be the listed inode, with one link, at most ``max_bytes``. Raises :class:`OutputRefused`."""
    if entry.is_dir:
        raise OutputRefused("a directory has no content to read", relpaths=(entry.relpath,))
    parts = entry.relpath.split("/")
    fds = [os.open(root, _OPEN_DIR)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, _OPEN_DIR, dir_fd=fds[-1]))
        fd = os.open(parts[-1], _OPEN_FILE, dir_fd=fds[-1])
    except OSError as e:
        raise OutputRefused(
            "an output file cannot be opened without following a link", relpaths=(entry.relpath,)
        ) from e
    finally:
        for d in fds:
            os.close(d)
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_nlink != 1
            or (st.st_dev, st.st_ino) != (entry.dev, entry.ino)
        ):
            raise OutputRefused(
                "an output file changed after it was listed", relpaths=(entry.relpath,)
            )
        if st.st_size > max_bytes:
            raise OutputRefused(
                f"an output file exceeds {max_bytes} bytes", relpaths=(entry.relpath,)
            )
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise OutputRefused(
                f"an output file exceeds {max_bytes} bytes", relpaths=(entry.relpath,)
            )
        return data
    finally:
        os.close(fd)
