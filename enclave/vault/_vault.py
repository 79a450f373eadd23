"""The site's encrypted dataset vault: register, list, read, stage, rotate keys.

On disk (the vault root is mode 0700)::

    <root>/.lock                              serialises version numbering and key rotation
    <root>/tmp/<random>/                      a registration in progress (ciphertext only)
    <root>/datasets/<name>/v<N>/manifest.json the version's file list (authenticated, see _keys)
    <root>/datasets/<name>/v<N>/key.json      its data key, wrapped under the site key (0600)
    <root>/datasets/<name>/v<N>/blobs/<id>    one encrypted file per dataset file (see _chunks)

A registration streams every file through SHA-256 and AES-256-GCM into a temporary directory
and renames it into place only when everything passed, so a refused or interrupted registration
leaves nothing behind (a crash leaves ciphertext under ``tmp/``, removed on the next open).
Versions are immutable; registering content whose root hash an existing version already has
returns that version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.secretfile import fsync_dir, write_secret
from enclave.vault import _staging
from enclave.vault._chunks import (
    DEFAULT_CHUNK_SIZE,
    FILE_ID_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    BlobReader,
    ChunkError,
    ChunkWriter,
)
from enclave.vault._ingest import Readable, iter_directory, iter_tar
from enclave.vault._keys import KeyRing, new_site_key, save_site_key
from enclave.vault._model import (
    DatasetVersion,
    FileEntry,
    check_name,
    check_relpath,
    root_hash,
    sort_files,
)
from enclave.vault._staging import OnEvent, StageItem, Staging
from policies.errors import (
    IntegrityError,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    SiteError,
)

MANIFEST_FORMAT = "sealroom-vault-manifest-v1"
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")

RegisterSource = Path | Iterable[tuple[str, Readable]] | Iterable[tuple[str, BinaryIO]]


class _Stored:
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


class Vault:
    """An encrypted dataset store rooted at ``root``, keyed by the site key at ``site_key_path``.

    The site key file is created (mode 0600) when it is absent and the vault holds no dataset;
    when it is absent and datasets exist, opening fails closed with :class:`SiteError`. One
    agent process owns a vault root.
    """

    def __init__(
        self, root: Path, *, site_key_path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidInput(
                f"chunk_size {chunk_size} is outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        self.root = Path(root)
        self.chunk_size = chunk_size
        self._datasets = self.root / "datasets"
        self._tmp = self.root / "tmp"
        self._mutex = threading.RLock()
        for d in (self.root, self._datasets, self._tmp):
            d.mkdir(mode=0o700, exist_ok=True)
            if d.is_symlink() or not d.is_dir():
                raise SiteError(f"vault directory {d} is not a directory")
        os.chmod(self.root, 0o700)
        with self._locked():
            if not site_key_path.exists():
                if any(self._datasets.iterdir()):
                    raise SiteError(
                        f"site key {site_key_path} is missing but the vault at {self.root} holds "
                        "datasets: refusing to create a new key that could not read them"
                    )
                save_site_key(site_key_path, new_site_key())
            self._keys = KeyRing(site_key_path)
            for leftover in self._tmp.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
            # Half-written key files from a crash (write_secret's temp names).
            for leftover in site_key_path.parent.glob(f".{site_key_path.name}*.tmp"):
                leftover.unlink()

    @property
    def site_key_id(self) -> str:
        return self._keys.current.key_id

    # -- locking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # -- reading ------------------------------------------------------------------------------

    def datasets(self) -> tuple[str, ...]:
        """Names of every registered dataset, sorted."""
        return tuple(sorted(p.name for p in self._datasets.iterdir() if _is_name(p.name)))

    def versions(self, name: str) -> tuple[DatasetVersion, ...]:
        """Every version of ``name``, oldest first; raises :class:`NotFound` for an unknown name."""
        check_name(name)
        nums = self._version_numbers(name)
        if not nums:
            raise NotFound(f"dataset {name!r} is not registered")
        return tuple(self._load(name, n).version for n in nums)

    def get(self, name: str, version: int) -> DatasetVersion:
        """One version, its manifest authenticated; :class:`NotFound` when it does not exist."""
        return self._load(check_name(name), version).version

    def latest(self, name: str) -> DatasetVersion:
        return self.versions(name)[-1]

    def read_file(self, version: DatasetVersion, path: str) -> bytes:
        """One file's plaintext, decrypted in memory (for the site's release gate)."""
        stored = self._load_matching(version)
        for entry, file_id, blob in stored.blobs:
            if entry.path == path:
                return _decrypt_to_bytes(stored, entry, file_id, blob)
        raise NotFound(f"dataset {version.ref} has no file {path!r}")

    def iter_plaintext(self, version: DatasetVersion) -> Iterator[tuple[FileEntry, bytes]]:
        """Every file of ``version`` with its plaintext, decrypted in memory one file at a time.

        Meant for checks that run inside the site (the release gate's memorization test needs
        the protected texts); nothing is written to disk.
        """
        stored = self._load_matching(version)
        for entry, file_id, blob in stored.blobs:
            yield entry, _decrypt_to_bytes(stored, entry, file_id, blob)

    def verify(self, version: DatasetVersion) -> None:
        """Decrypt every chunk of every file and check each SHA-256 and the root hash.

        Raises :class:`IntegrityError` naming the dataset, file and chunk at fault. (Staging
        relies on the per-chunk GCM tags alone; this is the full audit.)
        """
        stored = self._load_matching(version)
        for entry, file_id, blob in stored.blobs:
            h = hashlib.sha256()
            _decrypt(stored, entry, file_id, blob, sink=_hash_into(h))
            if h.hexdigest() != entry.sha256:
                raise IntegrityError(
                    f"dataset {version.ref}, file {entry.path!r}: SHA-256 is {h.hexdigest()}, "
                    f"manifest says {entry.sha256}"
                )

    # -- registering --------------------------------------------------------------------------

    def register(
        self,
        name: str,
        source: RegisterSource,
        *,
        max_bytes: int,
        max_files: int,
    ) -> DatasetVersion:
        """Stream ``source`` in as a new version of ``name`` (or return the identical existing one).

        ``source`` is a directory, a tar archive (a :class:`Path` to a file; or use
        :func:`~enclave.vault.iter_tar` on a stream), or an iterable of ``(relative path,
        binary stream)``. Raises :class:`InvalidInput` naming the file for a bad name, path
        traversal, absolute path, link, device, duplicate or control character, and
        :class:`ResourceExhausted` past ``max_bytes`` (total plaintext) or ``max_files``. On any
        error nothing is left in the vault.
        """
        check_name(name)
        if max_bytes < 0 or max_files < 1:
            raise InvalidInput("max_bytes must be >= 0 and max_files >= 1")
        work = self._tmp / secrets.token_hex(12)
        work.mkdir(mode=0o700)
        try:
            dek = AESGCM.generate_key(bit_length=256)
            files = self._ingest(
                name, _open_source(source), work, AESGCM(dek), max_bytes, max_files
            )
            return self._commit(name, files, work, dek)
        finally:
            if work.exists():
                shutil.rmtree(work)

    def _ingest(
        self,
        name: str,
        source: Iterable[tuple[str, Readable]],
        work: Path,
        aead: AESGCM,
        max_bytes: int,
        max_files: int,
    ) -> list[tuple[FileEntry, bytes]]:
        blobs = work / "blobs"
        blobs.mkdir(mode=0o700)
        out: list[tuple[FileEntry, bytes]] = []
        seen_files: set[str] = set()
        seen_dirs: set[str] = set()
        total = 0
        cs = self.chunk_size
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

    def _commit(
        self, name: str, files: list[tuple[FileEntry, bytes]], work: Path, dek: bytes
    ) -> DatasetVersion:
        entries = sort_files(e for e, _ in files)
        rh = root_hash(entries)
        ids = {e.path: fid for e, fid in files}
        with self._locked():
            nums = self._version_numbers(name)
            for n in nums:
                existing = self._load(name, n).version
                if existing.root_hash == rh:
                    return existing
            number = (nums[-1] + 1) if nums else 1
            created = datetime.now(UTC).replace(microsecond=0)
            manifest = _dump_manifest(name, number, rh, entries, ids, created, self.chunk_size)
            key_file = self._keys.new_key_file(dek, name=name, version=number, manifest=manifest)
            write_secret(work / "manifest.json", manifest, exclusive=True)
            write_secret(work / "key.json", key_file, exclusive=True)
            parent = self._datasets / name
            parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(work, parent / f"v{number}")
            fsync_dir(parent)
            fsync_dir(self._datasets)
            return DatasetVersion(
                name=name, version=number, root_hash=rh, files=entries, created_at=created
            )

    # -- staging ------------------------------------------------------------------------------

    def stage(
        self,
        job_id: str,
        versions: Sequence[DatasetVersion],
        *,
        dest_root: Path,
        on_event: OnEvent,
    ) -> Staging:
        """Decrypt exactly ``versions`` into a new tmpfs for ``job_id`` under ``dest_root``.

        Each version is re-read from the vault and must still have the root hash the caller
        holds (what the approval bound), else :class:`IntegrityError`. See
        :mod:`enclave.vault._staging` for the layout, modes and events. Needs root (mount).
        """
        _staging.check_job_id(job_id)
        items = []
        for v in versions:
            stored = self._load_matching(v)
            items.append(
                StageItem(
                    version=stored.version,
                    blobs=stored.blobs,
                    chunk_size=stored.chunk_size,
                    aead=AESGCM(stored.dek),
                )
            )
        return _staging.stage(job_id, items, dest_root=dest_root, on_event=on_event)

    # -- keys ---------------------------------------------------------------------------------

    def rotate_site_key(self) -> str:
        """Re-wrap every data key under a new site key; returns the new key's id.

        No data is re-encrypted. Crash-safe (see :mod:`enclave.vault._keys`): calling it again
        after a crash finishes the interrupted rotation rather than starting another.
        """
        with self._locked():
            self._keys.reload()
            if self._keys.pending is None:
                save_site_key(self._keys.next_path, new_site_key())
                self._keys.reload()
            new = self._keys.pending
            assert new is not None
            everything = [(n, v) for n in self.datasets() for v in self._version_numbers(n)]
            for n, v in everything:
                d = self._datasets / n / f"v{v}"
                manifest = _read_manifest_bytes(d, f"{n}@v{v}")
                self._keys.add_wrap(d / "key.json", new, name=n, version=v, manifest=manifest)
            os.rename(self._keys.next_path, self._keys.path)  # the commit point
            fsync_dir(self._keys.path.parent)
            self._keys.reload()
            for n, v in everything:
                d = self._datasets / n / f"v{v}"
                self._keys.keep_only(d / "key.json", new.key_id, ref=f"{n}@v{v}")
                for leftover in d.glob(".key.json.*.tmp"):  # from an interrupted rotation
                    leftover.unlink()
            return new.key_id

    # -- internals ----------------------------------------------------------------------------

    def _version_numbers(self, name: str) -> list[int]:
        d = self._datasets / name
        if not d.is_dir():
            return []
        nums = [int(m[1]) for p in d.iterdir() if (m := _VERSION_DIR.fullmatch(p.name))]
        return sorted(nums)

    def _load(self, name: str, number: int) -> _Stored:
        ref = f"{name}@v{number}"
        d = self._datasets / name / f"v{number}"
        if not isinstance(number, int) or number < 1 or not d.is_dir():
            raise NotFound(f"dataset {ref} is not registered")
        manifest = _read_manifest_bytes(d, ref)
        # Unwrapping authenticates the manifest bytes (they are bound into the wrap).
        dek = self._keys.unwrap(d / "key.json", name=name, version=number, manifest=manifest)
        version, blobs, chunk_size = _parse_manifest(manifest, name, number, d / "blobs")
        return _Stored(version, blobs, chunk_size, dek)

    def _load_matching(self, version: DatasetVersion) -> _Stored:
        stored = self._load(check_name(version.name), version.version)
        if stored.version.root_hash != version.root_hash:
            raise IntegrityError(
                f"dataset {version.ref}: root hash in the vault is {stored.version.root_hash}, "
                f"the caller expects {version.root_hash}"
            )
        return stored


def _is_name(s: str) -> bool:
    try:
        check_name(s)
    except InvalidInput:
        return False
    return True


def _open_source(source: RegisterSource) -> Iterable[tuple[str, Readable]]:
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


def _dump_manifest(
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


def _read_manifest_bytes(d: Path, ref: str) -> bytes:
    try:
        return (d / "manifest.json").read_bytes()
    except FileNotFoundError as e:
        raise IntegrityError(f"dataset {ref}: manifest is missing") from e


def _parse_manifest(
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


def _decrypt(
    stored: _Stored,
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


def _hash_into(h: Any) -> Callable[[int, memoryview], None]:
    def feed(_offset: int, view: memoryview) -> None:
        h.update(view)

    return feed


def _decrypt_to_bytes(stored: _Stored, entry: FileEntry, file_id: bytes, blob: Path) -> bytes:
    out = bytearray(entry.size)
    with memoryview(out) as dest:
        _decrypt(stored, entry, file_id, blob, dest=dest)
    return bytes(out)
