"""The vault's values (file entries, dataset versions) and the rules for names and paths.

The dataset root hash is defined here, once:

    root = SHA-256( b"sealroom-dataset-root-v1\\n"
                    || for each file, sorted by the UTF-8 bytes of its path:
                         path || 0x00 || decimal(size) || 0x00 || hex(sha256(content)) || 0x0a )

written as lowercase hex. Paths can hold neither NUL nor newline (see :func:`check_relpath`), so
the encoding is unambiguous: two datasets have the same root hash exactly when they hold the same
set of (path, content) pairs. The dataset's name and version are deliberately not part of it:
the root hash names content, so registering identical content twice can be recognised.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from policies.errors import InvalidInput, NotFound

ROOT_HASH_DOMAIN = b"sealroom-dataset-root-v1\n"
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255

# A dataset name becomes the directory /data/<name> inside the job, so it stays a plain,
# lower-case file name: no separators, no dot-only names, nothing a shell would reinterpret.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_REF_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,62})@v(?P<version>[1-9][0-9]{0,8})")


@dataclass(frozen=True)
class FileEntry:
    """One file of a dataset version: its relative POSIX path, size in bytes and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DatasetVersion:
    """An immutable registered version of a dataset. ``files`` is sorted by path."""

    name: str
    version: int
    root_hash: str
    files: tuple[FileEntry, ...]
    created_at: datetime

    @property
    def ref(self) -> str:
        """``name@vN``: how audit events and approvals name this version."""
        return f"{self.name}@v{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; raises :class:`NotFound` when the version has no such file."""
        for f in self.files:
            if f.path == path:
                return f
        raise NotFound(f"dataset {self.ref} has no file {path!r}")


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid dataset name; raise :class:`InvalidInput` otherwise."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidInput(
            f"dataset name {name!r} is invalid: use 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int]:
    """Split ``name@vN`` into its name and version; raise :class:`InvalidInput` when malformed."""
    m = _REF_RE.fullmatch(ref)
    if m is None:
        raise InvalidInput(f"dataset reference {ref!r} is not of the form name@vN")
    return m["name"], int(m["version"])


def check_relpath(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path for a dataset file.

    Refused, each with an :class:`InvalidInput` naming the path: non-strings, empty paths,
    absolute paths, ``.``/``..``/empty components (traversal and aliases), backslashes (a
    traversal on other systems), control characters (NUL, newline, C1 and Unicode line
    separators: they can forge log lines and break the root hash encoding), text that is not
    valid UTF-8, and over-long names.
    """
    if not isinstance(path, str):
        raise InvalidInput(f"dataset file name {path!r} is not a string")
    if path == "":
        raise InvalidInput("dataset file name is empty")
    for ch in path:
        if unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029":
            raise InvalidInput(f"dataset file name {path!r} contains a control character")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as e:  # surrogates from undecodable bytes
        raise InvalidInput(f"dataset file name {path!r} is not valid UTF-8") from e
    if "\\" in path:
        raise InvalidInput(f"dataset file name {path!r} contains a backslash")
    if path.startswith("/"):
        raise InvalidInput(f"dataset file name {path!r} is an absolute path")
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidInput(
            f"dataset file name {path[:64]!r}... is longer than {MAX_PATH_BYTES} bytes"
        )
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidInput(
                f"dataset file name {path!r} has an empty, '.' or '..' component (path traversal)"
            )
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise InvalidInput(
                f"dataset file name {path!r} has a component longer than "
                f"{MAX_COMPONENT_BYTES} bytes"
            )
    return path


def root_hash(files: Iterable[FileEntry]) -> str:
    """The dataset root hash over ``files`` (see the module docstring for the definition)."""
    h = hashlib.sha256(ROOT_HASH_DOMAIN)
    for f in sorted(files, key=lambda f: f.path.encode("utf-8")):
        h.update(f.path.encode("utf-8"))
        h.update(b"\0")
        h.update(str(f.size).encode("ascii"))
        h.update(b"\0")
        h.update(f.sha256.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def sort_files(files: Iterable[FileEntry]) -> tuple[FileEntry, ...]:
    """``files`` in the canonical order (by UTF-8 bytes of the path)."""
    return tuple(sorted(files, key=lambda f: f.path.encode("utf-8")))
