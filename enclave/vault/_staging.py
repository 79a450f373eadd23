"""Per-job staging: decrypt the approved dataset versions into a job's own tmpfs, then destroy it.

Layout: ``<dest_root>/<job_id>/`` is a fresh tmpfs (noswap, nosuid, nodev, noexec) sized to the
data; each dataset is a directory ``<dest_root>/<job_id>/<name>/`` that the runtime bind-mounts
read-only at ``/data/<name>``. Everything is owned by root with the job's group (gid 10001) and
modes 0550/0440, so the job can read and nobody can write; the tmpfs is then remounted read-only.
No plaintext byte is ever written anywhere but this tmpfs, and destroying the staging unmounts it.

Events go to the caller's ``on_event`` (the gateway appends them to its audit log). The order is
audit-before-act: ``KEY_RELEASED`` for a version is reported before any of its bytes are
decrypted, so a callback that raises (say, the audit log is down) stops the staging, which is
then destroyed. Every staging that released a key ends with exactly one ``DESTROYED`` event.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import re
import shutil
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.vault import _tmpfs
from enclave.vault._chunks import BlobReader, ChunkError
from enclave.vault._model import DatasetVersion, FileEntry
from policies.errors import IntegrityError, InvalidInput, InvalidState, SiteError
from trainers.contract import JOB_USER

JOB_GID = int(JOB_USER.split(":")[1])
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PAGE = 4096
# Decryption threads: AES-GCM releases the GIL, and page faults on the tmpfs map run in parallel
# too; beyond a few threads staging is bound by memory bandwidth.
WORKERS = max(1, min(4, os.cpu_count() or 1))


class StagingEventKind(enum.Enum):
    KEY_RELEASED = "key_released"
    STAGED = "staged"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class StagingEvent:
    """Something the audit log must hear about. ``datasets`` holds ``name@vN`` references."""

    kind: StagingEventKind
    job_id: str
    datasets: tuple[str, ...]
    at: datetime
    total_bytes: int = 0


class StagingState(enum.Enum):
    STAGED = "staged"
    DESTROYED = "destroyed"


OnEvent = Callable[[StagingEvent], None]


@dataclass(frozen=True)
class StageItem:
    """One authenticated dataset version ready to decrypt: what the vault hands to staging."""

    version: DatasetVersion
    blobs: tuple[tuple[FileEntry, bytes, Path], ...]  # (entry, file id, blob path)
    chunk_size: int
    aead: AESGCM


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or _JOB_ID_RE.fullmatch(job_id) is None:
        raise InvalidInput(
            f"job id {job_id!r} is invalid: use 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-'"
        )
    return job_id


class Staging:
    """A job's staged datasets. Use as a context manager, or call :meth:`destroy` (idempotent)."""

    def __init__(
        self,
        *,
        job_id: str,
        root: Path,
        versions: tuple[DatasetVersion, ...],
        on_event: OnEvent,
    ) -> None:
        self.job_id = job_id
        self.root = root
        self.versions = versions
        self._on_event = on_event
        self._lock = threading.Lock()
        self._state = StagingState.STAGED

    @property
    def state(self) -> StagingState:
        return self._state

    @property
    def datasets(self) -> Mapping[str, Path]:
        """Dataset name -> its staged directory on the host (bind-mount it at /data/<name>)."""
        return {v.name: self.root / v.name for v in self.versions}

    def path(self, name: str) -> Path:
        for v in self.versions:
            if v.name == name:
                return self.root / name
        raise InvalidInput(f"dataset {name!r} is not staged for job {self.job_id}")

    def destroy(self) -> None:
        """Unmount the tmpfs (its pages are freed, detached if still busy) and remove the mount
        point, then report ``DESTROYED``. Safe to call again; raises :class:`SiteError` if the
        mount cannot be removed (the staging then stays ``STAGED`` so a retry is possible)."""
        with self._lock:
            if self._state is StagingState.DESTROYED:
                return
            _teardown(self.root)
            self._state = StagingState.DESTROYED
        self._on_event(
            StagingEvent(
                kind=StagingEventKind.DESTROYED,
                job_id=self.job_id,
                datasets=tuple(v.ref for v in self.versions),
                at=_now(),
            )
        )

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        refs = ", ".join(v.ref for v in self.versions)
        return f"Staging({self.job_id!r}, {str(self.root)!r}, [{refs}], {self._state.value})"


def _now() -> datetime:
    return datetime.now(UTC)


def _teardown(root: Path) -> None:
    if root.exists() and _tmpfs.is_mount_point(root):
        _tmpfs.unmount(root)
    if _tmpfs.is_mount_point(root):
        raise SiteError(f"staging {root} is still mounted after unmounting it")
    if root.exists():
        # Only an empty mount point should be left; anything else was written off the tmpfs.
        shutil.rmtree(root)


def tmpfs_size(items: Sequence[StageItem]) -> tuple[int, int]:
    """Bytes and inodes the tmpfs needs: each file rounded up to pages, plus each directory."""
    files = [e for it in items for (e, _, _) in it.blobs]
    dirs = {
        (it.version.name, *e.path.split("/")[:k])
        for it in items
        for (e, _, _) in it.blobs
        for k in range(len(e.path.split("/")))
    }
    data = sum(-(-e.size // _PAGE) * _PAGE for e in files)
    inodes = len(files) + len(dirs) + 16
    return data + (len(dirs) + 16) * _PAGE, inodes


def stage(
    job_id: str,
    items: Sequence[StageItem],
    *,
    dest_root: Path,
    on_event: OnEvent,
) -> Staging:
    """Decrypt ``items`` into a new tmpfs at ``dest_root/job_id`` (see the module docstring)."""
    check_job_id(job_id)
    if not items:
        raise InvalidInput(f"job {job_id}: no dataset versions to stage")
    names = [it.version.name for it in items]
    if len(set(names)) != len(names):
        raise InvalidInput(f"job {job_id}: a dataset name appears twice in {names}")
    if not dest_root.is_dir() or dest_root.is_symlink():
        raise SiteError(f"staging root {dest_root} is not a directory")
    root = dest_root / job_id
    try:
        os.mkdir(root, 0o700)
    except FileExistsError as e:
        raise InvalidState(f"job {job_id} is already staged at {root}") from e
    released: list[str] = []
    staging = Staging(
        job_id=job_id, root=root, versions=tuple(it.version for it in items), on_event=on_event
    )
    try:
        size, inodes = tmpfs_size(items)
        _tmpfs.mount_tmpfs(root, size_bytes=size, nr_inodes=inodes, mode=0o750, uid=0, gid=JOB_GID)
        for it in items:
            # Counted as released before the callback runs: if the audit append fails midway the
            # log may or may not hold the release, and a DESTROYED after it is then never wrong.
            released.append(it.version.ref)
            on_event(
                StagingEvent(
                    kind=StagingEventKind.KEY_RELEASED,
                    job_id=job_id,
                    datasets=(it.version.ref,),
                    at=_now(),
                )
            )
        total = _decrypt_versions(items, root)
        _tmpfs.remount_readonly(root)
        on_event(
            StagingEvent(
                kind=StagingEventKind.STAGED,
                job_id=job_id,
                datasets=tuple(released),
                at=_now(),
                total_bytes=total,
            )
        )
    except BaseException:
        if released:
            # Reports DESTROYED for the keys already released; the first error is what propagates.
            try:
                staging.destroy()
            except Exception as cleanup:  # the original error matters more
                _attach(cleanup)
        else:
            _teardown(root)
        raise
    return staging


def _attach(cleanup: BaseException) -> None:
    """Keep a cleanup failure visible on the error being raised without replacing it."""
    current = sys.exc_info()[1]
    if current is not None:
        current.add_note(f"and destroying the staging failed too: {cleanup!r}")


def _mkdirs(base: Path, rel_dir: str, made: set[str]) -> None:
    parts = rel_dir.split("/") if rel_dir else []
    for k in range(len(parts) + 1):
        sub = "/".join(parts[:k])
        if sub in made:
            continue
        p = base / sub if sub else base
        os.mkdir(p, 0o550)
        os.chown(p, 0, JOB_GID)
        made.add(sub)


class _Writer:
    """Decrypts many files into the tmpfs with a small thread pool.

    Each file is created, sized and memory-mapped (advised for huge pages) by the calling
    thread; its chunks are then decrypted in ranges by the pool straight into the map
    (``AESGCM`` releases the GIL, so the ranges run in parallel). At most ``_IN_FLIGHT`` files
    are mapped at once. Every submitted task is waited for before any map is closed, on success
    and on error alike.
    """

    _IN_FLIGHT = 32
    _CHUNKS_PER_TASK = 8

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vault-stage")
        self._open: deque[_OpenFile] = deque()

    def add(
        self, item: StageItem, entry: FileEntry, file_id: bytes, blob_path: Path, out: Path
    ) -> None:
        f = _OpenFile(item, entry)
        self._open.append(f)  # before opening anything, so close() always releases it
        f.open(file_id, blob_path, out)
        r = f.reader
        assert r is not None
        step = self._CHUNKS_PER_TASK
        for start in range(0, r.chunks, step):
            f.futures.append(
                self._pool.submit(
                    r.decrypt_range, item.aead, start, min(start + step, r.chunks), f.dest
                )
            )
        while len(self._open) > self._IN_FLIGHT:
            self._finish(self._open.popleft())

    def finish(self) -> None:
        while self._open:
            self._finish(self._open.popleft())

    def close(self) -> None:
        """Wait for everything submitted, release every map and stop the pool (error path)."""
        while self._open:
            f = self._open.popleft()
            for fut in f.futures:
                fut.cancel()
            wait(f.futures)
            f.close()
        self._pool.shutdown(wait=True)

    def _finish(self, f: _OpenFile) -> None:
        try:
            for fut in f.futures:
                try:
                    fut.result()
                except ChunkError as e:
                    where = f"chunk {e.chunk}" if e.chunk is not None else "blob"
                    raise IntegrityError(
                        f"dataset {f.item.version.ref}, file {f.entry.path!r}, {where}: {e}"
                    ) from None
        except BaseException:
            self._open.appendleft(f)  # close() still waits for its other tasks
            raise
        f.close()


class _OpenFile:
    def __init__(self, item: StageItem, entry: FileEntry) -> None:
        self.item = item
        self.entry = entry
        self.futures: list[Future[None]] = []
        self.reader: BlobReader | None = None
        self._fds: list[int] = []
        self._map: mmap.mmap | None = None
        self.dest = memoryview(bytearray())  # empty files: the tag still gets checked

    def open(self, file_id: bytes, blob_path: Path, out_path: Path) -> None:
        ref, entry = self.item.version.ref, self.entry
        out = os.open(
            out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o440
        )
        self._fds.append(out)
        os.fchown(out, 0, JOB_GID)
        try:
            blob = os.open(blob_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise IntegrityError(f"dataset {ref}, file {entry.path!r}: its blob is missing") from e
        self._fds.append(blob)
        try:
            self.reader = BlobReader(
                blob, file_id=file_id, size=entry.size, chunk_size=self.item.chunk_size
            )
        except ChunkError as e:
            raise IntegrityError(f"dataset {ref}, file {entry.path!r}, blob: {e}") from None
        if entry.size:
            os.ftruncate(out, entry.size)
            self._map = mmap.mmap(
                out, entry.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            _ask_huge_pages(self._map)
            self.dest = memoryview(self._map)

    def close(self) -> None:
        self.dest.release()
        if self._map is not None:
            self._map.close()
        if self.reader is not None:
            self.reader.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _ask_huge_pages(m: mmap.mmap) -> None:
    """Let a fault on ``m`` compact memory for a huge page rather than fall back to small ones.

    The tmpfs is mounted ``huge=within_size``, but under the usual THP ``defrag=madvise`` a fault
    on a map that was not advised may not reclaim or compact: on a machine whose free memory is
    fragmented (after a test run, say) it silently gets 4 KiB pages, one fault and one zeroing
    each, and staging slows several times over (``thp_file_fallback`` in /proc/vmstat counts
    it). Advised, the fault compacts, which costs far less. Only a hint: a kernel without THP
    refuses it and staging goes on with small pages.
    """
    with contextlib.suppress(AttributeError, OSError):
        m.madvise(mmap.MADV_HUGEPAGE)


def _decrypt_versions(items: Sequence[StageItem], root: Path) -> int:
    writer = _Writer(workers=WORKERS)
    total = 0
    try:
        for item in items:
            base = root / item.version.name
            made: set[str] = set()
            for entry, file_id, blob_path in item.blobs:
                _mkdirs(base, entry.path.rpartition("/")[0], made)
                writer.add(item, entry, file_id, blob_path, base / entry.path)
                total += entry.size
        writer.finish()
    finally:
        writer.close()
    return total


def wipe_leftovers(root: Path) -> tuple[Path, ...]:
    """Remove every staging under ``root`` left by a crash; call at agent start-up, first.

    Unmounts (detaching if busy) every mount below ``root``, deepest first, then deletes every
    entry of ``root``: the staging root belongs to the vault, and anything found there may hold
    plaintext. Returns the top-level entries removed.
    """
    if not root.exists():
        return ()
    if not root.is_dir() or root.is_symlink():
        raise SiteError(f"staging root {root} is not a directory")
    for mp in _tmpfs.mounts_under(root):
        _tmpfs.unmount(mp)
    removed: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    if _tmpfs.mounts_under(root):
        raise SiteError(f"mounts remain under {root} after wiping it")
    return tuple(removed)
