"""Registering a dataset version: a source's files streamed through SHA-256 and AES-256-GCM.

:func:`open_source` turns what the caller gave (a directory, a tar archive, or ``(path,
stream)`` pairs) into one stream of files; :func:`ingest` checks each path (traversal, links,
duplicates, a file that is also a directory), enforces the byte and file caps while reading,
and writes one encrypted blob per file into the registration's temporary directory. Nothing
here touches the vault's datasets: :meth:`enclave.vault.Vault.register` commits the result
under its lock, or removes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.secretfile import fsync_dir
from enclave.vault._chunks import FILE_ID_SIZE, ChunkWriter
from enclave.vault._ingest import Readable, iter_directory, iter_tar
from enclave.vault._model import FileEntry, check_relpath
from policies.errors import InvalidInput, ResourceExhausted

RegisterSource = Path | Iterable[tuple[str, Readable]] | Iterable[tuple[str, BinaryIO]]


def open_source(source: RegisterSource) -> Iterable[tuple[str, Readable]]:
    if isinstance(source, str | bytes):
        raise InvalidInput("dataset source must be a Path or an iterable of (path, stream) pairs")
    if isinstance(source, os.PathLike):
        p = Path(source)
        if p.is_dir():
            return iter_directory(p)
        if p.is_file():
            return iter_tar(p)
        raise InvalidInput(f"dataset source {str(p)!r} is neither a directory nor a tar archive")
    return source


def _check_unique(path: str, files: set[str], dirs: set[str]) -> None:
    if path in files:
        raise InvalidInput(f"dataset file {path!r} appears twice")
    if path in dirs:
        raise InvalidInput(f"dataset file {path!r} is also a directory of other files")
    parts = path.split("/")
    for k in range(1, len(parts)):
        parent = "/".join(parts[:k])
        if parent in files:
            raise InvalidInput(f"dataset file {path!r} lies under {parent!r}, which is a file")
    for k in range(1, len(parts)):
        dirs.add("/".join(parts[:k]))
    files.add(path)


def ingest(
    name: str,
    source: Iterable[tuple[str, Readable]],
    work: Path,
    aead: AESGCM,
    *,
    max_bytes: int,
    max_files: int,
    chunk_size: int,
) -> list[tuple[FileEntry, bytes]]:
    """Encrypt every file of ``source`` into ``work/blobs`` under ``aead``; each file's entry
    and blob id, in source order. Raises :class:`InvalidInput` for a bad path, duplicate or
    non-binary stream and :class:`ResourceExhausted` past ``max_bytes`` or ``max_files``."""
    blobs = work / "blobs"
    blobs.mkdir(mode=0o700)
    out: list[tuple[FileEntry, bytes]] = []
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    total = 0
    cs = chunk_size
    for item in source:
        try:
            path, stream = item
        except (TypeError, ValueError) as e:
            raise InvalidInput(
                f"dataset {name!r}: source items must be (relative path, binary stream) pairs"
            ) from e
        path = check_relpath(path)
        _check_unique(path, seen_files, seen_dirs)
        if len(out) >= max_files:
            raise ResourceExhausted(
                f"dataset {name!r}: file {path!r} is one more than max_files={max_files}"
            )
        declared = getattr(stream, "declared_size", None)
        if isinstance(declared, int) and total + declared > max_bytes:
            raise ResourceExhausted(
                f"dataset {name!r}: file {path!r} ({declared} bytes) takes the dataset past "
                f"max_bytes={max_bytes}"
            )
        file_id = os.urandom(FILE_ID_SIZE)
        h = hashlib.sha256()
        size = 0
        with open(blobs / file_id.hex(), "xb") as f:
            writer = ChunkWriter(aead, file_id, cs, f)
            while True:
                data = stream.read(cs)
                if not isinstance(data, bytes | bytearray):
                    raise InvalidInput(f"dataset {name!r}: stream of {path!r} is not binary")
                if not data:
                    break
                size += len(data)
                if total + size > max_bytes:
                    raise ResourceExhausted(
                        f"dataset {name!r}: file {path!r} takes the dataset past "
                        f"max_bytes={max_bytes}"
                    )
                h.update(data)
                writer.write(data)
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
        total += size
        out.append((FileEntry(path=path, size=size, sha256=h.hexdigest()), file_id))
    if not out:
        raise InvalidInput(f"dataset {name!r}: the source holds no files")
    fsync_dir(blobs)
    return out
