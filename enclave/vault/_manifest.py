"""A stored dataset version on disk: its manifest, and decrypting its blobs.

A version's ``manifest.json`` lists its files (path, size, SHA-256, blob id), its chunk size
and root hash in canonical JSON; :func:`dump_manifest` writes it and :func:`parse_manifest`
reads it back, refusing anything malformed, out of place or whose files do not hash to the
stated root as :class:`IntegrityError`. (The manifest bytes are authenticated by the key wrap,
see :mod:`enclave.vault._keys`.) :class:`Stored` is a loaded version with its data key;
:func:`decrypt` and :func:`decrypt_to_bytes` read one file's blob back, naming the chunk at
fault when a tag does not verify.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.vault._chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, BlobReader, ChunkError
from enclave.vault._model import DatasetVersion, FileEntry, check_relpath, root_hash, sort_files
from policies.errors import IntegrityError, InvalidInput

MANIFEST_FORMAT = "sealroom-vault-manifest-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


class Stored:
    """A loaded, authenticated version with what is needed to decrypt it."""

    def __init__(
        self,
        version: DatasetVersion,
        blobs: tuple[tuple[FileEntry, bytes, Path], ...],
        chunk_size: int,
        dek: bytes,
    ) -> None:
        self.version = version
        self.blobs = blobs
        self.chunk_size = chunk_size
        self.dek = dek


def dump_manifest(
    name: str,
    version: int,
    rh: str,
    entries: tuple[FileEntry, ...],
    ids: dict[str, bytes],
    created: datetime,
    chunk_size: int,
) -> bytes:
    body = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "root_hash": rh,
        "created_at": created.isoformat(),
        "chunk_size": chunk_size,
        "files": [
            {"path": e.path, "size": e.size, "sha256": e.sha256, "blob": ids[e.path].hex()}
            for e in entries
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def read_manifest_bytes(d: Path, ref: str) -> bytes:
    try:
        return (d / "manifest.json").read_bytes()
    except FileNotFoundError as e:
        raise IntegrityError(f"dataset {ref}: manifest is missing") from e


def parse_manifest(
    raw: bytes, name: str, number: int, blobs_dir: Path
) -> tuple[DatasetVersion, tuple[tuple[FileEntry, bytes, Path], ...], int]:
    ref = f"{name}@v{number}"
    try:
        body: Any = json.loads(raw)
        if body["format"] != MANIFEST_FORMAT or body["name"] != name or body["version"] != number:
            raise ValueError("format, name or version does not match its place in the vault")
        chunk_size = body["chunk_size"]
        if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size {chunk_size!r}")
        blobs = []
        for f in body["files"]:
            entry = FileEntry(path=check_relpath(f["path"]), size=f["size"], sha256=f["sha256"])
            if not isinstance(entry.size, int) or entry.size < 0:
                raise ValueError(f"size of {entry.path!r}")
            if not isinstance(entry.sha256, str) or not _HEX64.fullmatch(entry.sha256):
                raise ValueError(f"sha256 of {entry.path!r}")
            if not isinstance(f["blob"], str) or not _HEX32.fullmatch(f["blob"]):
                raise ValueError(f"blob id of {entry.path!r}")
            blobs.append((entry, bytes.fromhex(f["blob"]), blobs_dir / f["blob"]))
        entries = sort_files(e for e, _, _ in blobs)
        rh = root_hash(entries)
        if rh != body["root_hash"]:
            raise ValueError(f"root hash {body['root_hash']!r} does not match its files ({rh})")
        created = datetime.fromisoformat(body["created_at"])
    except (ValueError, KeyError, TypeError, InvalidInput) as e:
        raise IntegrityError(f"dataset {ref}: manifest is malformed: {e}") from e
    version = DatasetVersion(
        name=name, version=number, root_hash=rh, files=entries, created_at=created
    )
    blobs.sort(key=lambda b: b[0].path.encode("utf-8"))
    return version, tuple(blobs), chunk_size


def decrypt(
    stored: Stored,
    entry: FileEntry,
    file_id: bytes,
    blob: Path,
    *,
    sink: Callable[[int, memoryview], None] | None = None,
    dest: memoryview | None = None,
) -> None:
    ref = stored.version.ref
    try:
        fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise IntegrityError(f"dataset {ref}, file {entry.path!r}: its blob is missing") from e
    try:
        aead = AESGCM(stored.dek)
        with BlobReader(fd, file_id=file_id, size=entry.size, chunk_size=stored.chunk_size) as r:
            if dest is not None:
                r.decrypt_range(aead, 0, r.chunks, dest)
            elif sink is not None:
                r.decrypt_each(aead, sink)
    except ChunkError as e:
        where = f"chunk {e.chunk}" if e.chunk is not None else "blob"
        raise IntegrityError(f"dataset {ref}, file {entry.path!r}, {where}: {e}") from None
    finally:
        os.close(fd)


def hash_into(h: Any) -> Callable[[int, memoryview], None]:
    def feed(_offset: int, view: memoryview) -> None:
        h.update(view)

    return feed


def decrypt_to_bytes(stored: Stored, entry: FileEntry, file_id: bytes, blob: Path) -> bytes:
    out = bytearray(entry.size)
    with memoryview(out) as dest:
        decrypt(stored, entry, file_id, blob, dest=dest)
    return bytes(out)
