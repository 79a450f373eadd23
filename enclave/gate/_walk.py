"""Listing and opening a job's ``/output`` without ever following a link.

A job may plant a symbolic link to ``/data``, a hard link to a dataset file, a FIFO that blocks
a reader, or a device node. Every name here is looked up relative to an open directory
descriptor with ``O_NOFOLLOW`` (``lstat`` semantics), each file is checked to be a regular file
with one link under the size cap. :func:`open_verified` opens a listed file the one way the
site opens anything the job wrote (:func:`enclave._beneath.open_beneath`) and re-checks the
opened descriptor against the listing (same device, inode and size) so nothing can be swapped
in between.

Reasons never echo a job-chosen name: only names from the fixed layout (``weights``,
``metrics.json``, ...) and well-known extensions appear in them.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from enclave import _beneath
from policies.release import OutputLimits

WEIGHTS_DIR = "weights"
METRICS_FILE = "metrics.json"
IGNORED_FILES = frozenset({"metrics.jsonl"})
"""Read by nobody here and never released (live progress lines)."""
IGNORED_DIRS = frozenset({"checkpoints"})
"""Never entered and never released (resume checkpoints)."""
KNOWN_NAMES = frozenset({WEIGHTS_DIR, METRICS_FILE, *IGNORED_FILES, *IGNORED_DIRS})
WEIGHTS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.safetensors$")
PICKLE_EXTENSIONS = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5"}
)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
VANISHED = "changed while the output was listed"


@dataclass(frozen=True)
class FileRef:
    """A regular file found in the output: where it is and which inode it was."""

    relpath: str
    dev: int
    ino: int
    size: int


@dataclass(frozen=True)
class Listing:
    weights: tuple[FileRef, ...]
    metrics: FileRef | None
    entries: int
    total_bytes: int


def _describe(prefix: str, name: str) -> str:
    if name in KNOWN_NAMES and not prefix:
        return repr(name)
    ext = os.path.splitext(name)[1].lower()
    shown = f"a '{ext}' file" if ext in PICKLE_EXTENSIONS or ext == ".safetensors" else "an entry"
    where = f" in {prefix.rstrip('/')}/" if prefix else ""
    return f"{shown}{where} (name withheld)"


def _kind(mode: int) -> str | None:
    """Why an entry of this type is refused, or None for regular files and directories."""
    if stat.S_ISLNK(mode):
        return "is a symbolic link (links are refused, never followed)"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device node"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "is not a regular file"


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    """The entry's own status (a link's, not its target's); None when it went away after it
    was listed (the job still renaming: refused as the job's fault, never a site error)."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _check_file(st: os.stat_result, what: str, cap: int) -> str | None:
    if st.st_nlink != 1:
        return f"{what} has more than one hard link (a link may point at protected data)"
    if st.st_size > cap:
        return f"{what} exceeds the size cap of {cap} bytes"
    return None


def list_output(root: Path, *, limits: OutputLimits) -> tuple[Listing | None, list[str]]:
    """List the release candidates in ``root``; return ``(listing, [])`` or ``(None, reasons)``."""
    reasons: list[str] = []
    weights: list[FileRef] = []
    metrics: FileRef | None = None
    entries = 0
    total = 0
    try:
        root_fd = os.open(root, _OPEN_DIR)
    except OSError:
        return None, ["the output directory cannot be opened as a directory"]
    try:
        with os.scandir(root_fd) as it:
            top = []
            for entry in it:
                entries += 1
                if entries > limits.max_files:
                    return None, [f"more than {limits.max_files} entries in the output"]
                top.append((entry.name, _lstat(entry.name, root_fd)))
        for name, st in sorted(top, key=lambda t: t[0]):
            what = _describe("", name)
            bad = _kind(st.st_mode) if st is not None else VANISHED
            if bad or st is None:
                reasons.append(f"{what} {bad}")
                continue
            if name in IGNORED_DIRS:
                if not stat.S_ISDIR(st.st_mode):
                    reasons.append(f"{what} is not a directory")
                continue
            if name in IGNORED_FILES:
                if not stat.S_ISREG(st.st_mode):
                    reasons.append(f"{what} is not a regular file")
                continue
            if name == METRICS_FILE and stat.S_ISREG(st.st_mode):
                problem = _check_file(st, what, limits.max_metrics_bytes)
                if problem:
                    reasons.append(problem)
                else:
                    metrics = FileRef(name, st.st_dev, st.st_ino, st.st_size)
                    total += st.st_size
                continue
            if name == WEIGHTS_DIR and stat.S_ISDIR(st.st_mode):
                found, more, count, size = _list_weights(root_fd, limits)
                weights.extend(found)
                reasons.extend(more)
                entries += count
                total += size
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in PICKLE_EXTENSIONS:
                reasons.append(f"{what}: pickle-format files are refused (only safetensors)")
            else:
                reasons.append(
                    f"{what} is not a release artifact (only weights/*.safetensors, metrics.json)"
                )
    finally:
        os.close(root_fd)
    if entries > limits.max_files:
        reasons.append(f"more than {limits.max_files} entries in the output")
    if total > limits.max_total_bytes:
        reasons.append(f"release candidates exceed the total cap of {limits.max_total_bytes} bytes")
    if not weights and not reasons:
        reasons.append("no weights: weights/*.safetensors is empty or missing")
    if reasons:
        return None, reasons
    return Listing(tuple(weights), metrics, entries, total), []


def _list_weights(root_fd: int, limits: OutputLimits) -> tuple[list[FileRef], list[str], int, int]:
    found: list[FileRef] = []
    reasons: list[str] = []
    count = 0
    total = 0
    try:
        dir_fd = os.open(WEIGHTS_DIR, _OPEN_DIR, dir_fd=root_fd)
    except OSError:
        return [], ["'weights' cannot be opened as a directory"], 0, 0
    try:
        with os.scandir(dir_fd) as it:
            for entry in it:
                count += 1
                if count > limits.max_files:
                    reasons.append(f"more than {limits.max_files} entries in weights/")
                    break
                name = entry.name
                st = _lstat(name, dir_fd)
                what = _describe(WEIGHTS_DIR + "/", name)
                bad = _kind(st.st_mode) if st is not None else VANISHED
                if bad or st is None:
                    reasons.append(f"{what} {bad}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    reasons.append(f"{what} is a directory (weights/ holds files only)")
                    continue
                if not WEIGHTS_NAME_RE.match(name):
                    ext = os.path.splitext(name)[1].lower()
                    kind = (
                        "pickle-format files are refused"
                        if ext in PICKLE_EXTENSIONS
                        else ("not a .safetensors file with a plain name")
                    )
                    reasons.append(f"{what}: {kind}")
                    continue
                problem = _check_file(st, what, limits.max_file_bytes)
                if problem:
                    reasons.append(problem)
                    continue
                found.append(FileRef(f"{WEIGHTS_DIR}/{name}", st.st_dev, st.st_ino, st.st_size))
                total += st.st_size
    finally:
        os.close(dir_fd)
    return sorted(found, key=lambda f: f.relpath), reasons, count, total


def open_verified(root: Path, ref: FileRef) -> int:
    """Open ``ref`` for reading beneath ``root`` (:func:`enclave._beneath.open_beneath`: no link
    followed, a regular file with one link on the output's filesystem, checked on the open
    descriptor) and check it is still the listed inode, of the listed size.

    Raises :class:`~enclave._beneath.BeneathRefused` (a :class:`ReleaseRefused`) otherwise.
    """
    fd = _beneath.open_beneath(root, ref.relpath)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino, st.st_size) != (ref.dev, ref.ino, ref.size):
        os.close(fd)
        raise _beneath.BeneathRefused(_beneath.CHANGED)
    return fd
