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
returns that version. The reading of sources and the encrypting is :mod:`enclave.vault._register`,
the manifest format and decryption :mod:`enclave.vault._manifest`; this class holds the lock,
numbers versions, commits them, stages them and rotates the site key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.secretfile import fsync_dir, write_secret
from enclave.vault import _staging
from enclave.vault._chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from enclave.vault._keys import KeyRing, new_site_key, save_site_key
from enclave.vault._manifest import (
    Stored,
    decrypt,
    decrypt_to_bytes,
    dump_manifest,
    hash_into,
    parse_manifest,
    read_manifest_bytes,
)
from enclave.vault._model import DatasetVersion, FileEntry, check_name, root_hash, sort_files
from enclave.vault._register import RegisterSource, ingest, open_source
from enclave.vault._staging import OnEvent, StageItem, Staging
from policies.errors import IntegrityError, InvalidInput, NotFound, SiteError

_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")


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
                return decrypt_to_bytes(stored, entry, file_id, blob)
        raise NotFound(f"dataset {version.ref} has no file {path!r}")

    def iter_plaintext(self, version: DatasetVersion) -> Iterator[tuple[FileEntry, bytes]]:
        """Every file of ``version`` with its plaintext, decrypted in memory one file at a time.

        Meant for checks that run inside the site (the release gate's memorization test needs
        the protected texts); nothing is written to disk.
        """
        stored = self._load_matching(version)
        for entry, file_id, blob in stored.blobs:
            yield entry, decrypt_to_bytes(stored, entry, file_id, blob)

    def verify(self, version: DatasetVersion) -> None:
        """Decrypt every chunk of every file and check each SHA-256 and the root hash.

        Raises :class:`IntegrityError` naming the dataset, file and chunk at fault. (Staging
        relies on the per-chunk GCM tags alone; this is the full audit.)
        """
        stored = self._load_matching(version)
        for entry, file_id, blob in stored.blobs:
            h = hashlib.sha256()
            decrypt(stored, entry, file_id, blob, sink=hash_into(h))
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
            files = ingest(
                name,
                open_source(source),
                work,
                AESGCM(dek),
                max_bytes=max_bytes,
                max_files=max_files,
                chunk_size=self.chunk_size,
            )
            return self._commit(name, files, work, dek)
        finally:
            if work.exists():
                shutil.rmtree(work)

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
            manifest = dump_manifest(name, number, rh, entries, ids, created, self.chunk_size)
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
                manifest = read_manifest_bytes(d, f"{n}@v{v}")
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

    def _load(self, name: str, number: int) -> Stored:
        ref = f"{name}@v{number}"
        d = self._datasets / name / f"v{number}"
        if not isinstance(number, int) or number < 1 or not d.is_dir():
            raise NotFound(f"dataset {ref} is not registered")
        manifest = read_manifest_bytes(d, ref)
        # Unwrapping authenticates the manifest bytes (they are bound into the wrap).
        dek = self._keys.unwrap(d / "key.json", name=name, version=number, manifest=manifest)
        version, blobs, chunk_size = parse_manifest(manifest, name, number, d / "blobs")
        return Stored(version, blobs, chunk_size, dek)

    def _load_matching(self, version: DatasetVersion) -> Stored:
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
