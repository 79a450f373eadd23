"""The gateway's audit log: durable, group-committed appends into a verifiable Merkle log.

:class:`AuditLog` is assembled by concern: the database, its schema and the in-memory tree in
:mod:`._store`; signed checkpoints, export and verification in :mod:`._checkpoints`; roots,
proofs, records and queries in :mod:`._query`; and here the writer, the one thread that appends.

:meth:`AuditLog.append` adds its event to the open batch and returns only after the writer
thread has committed that batch (group commit: every appender waiting meanwhile shares one
fsync, so the rate grows with the number of concurrent callers instead of being one fsync per
event). The appenders of a batch wait at one gate the writer opens once (:class:`_Batch`), and
the writer waits, no longer than a commit takes, for a batch as large as the one before
(:meth:`AuditLog._write_loop`): with many threads the rate is set by thread hand-offs (each
append wakes its thread and waits for the GIL) and by fsyncs, and both are paid per batch as
far as they can be.

The writer indexes the query columns of the records it wrote once ``_INDEX_ROWS`` wait, when
the log is idle for ``_INDEX_IDLE_S``, and on close (see :mod:`._store`). A second thread folds
the WAL into the database once the writer has written about ``WAL_BYTES`` to it, and when the
log goes idle, off the appenders' path (see :mod:`._store`); a third signs a checkpoint on an
interval. A failed commit leaves the log refusing every later append (fail closed: the gateway
must not act unaudited) unless the database is provably unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import sqlite3
import threading
from pathlib import Path
from time import perf_counter
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import _merkle  # noqa: F401  # _commit inlines its leaf_hash and node_hash
from enclave.audit._checkpoints import Checkpoints
from enclave.audit._model import (
    AuditEvent,
    AuditRecord,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    leaf_tail,
    now,
)
from enclave.audit._query import Queries
from enclave.audit._store import INDEXED, WAL_BYTES, insert_sql
from policies.errors import AuditLogError, InvalidInput

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "CheckpointError",
    "RecordError",
    "SignedCheckpoint",
    "VerifyResult",
]

_MAX_BATCH = 2048  # 12 parameters a row, within SQLite's limit of 32766
_INDEX_ROWS = 4096  # the unindexed tail is indexed once it is this long,
_INDEX_IDLE_S = 0.5  # or once no append has come for this long
_GATHER_MAX_S = 0.002  # the longest the writer waits for a batch to fill (see _write_loop)


class _Batch:
    """The events of one commit, and the one gate their appenders wait at.

    Appenders add events while the batch is open (under ``AuditLog._state``); the writer
    closes it, commits it whole, sets ``base``, ``time`` and ``hashes`` (or ``error``) and
    opens ``done``. Each waiter, once through, opens it for the next: the writer wakes one
    thread per batch, not one per event (waking 32 threads one lock each held the GIL for
    ~0.2-0.3 ms of every commit cycle, while the disk stood idle). ``enough`` is opened by
    the append that brings the batch to ``want`` events (see ``AuditLog._write_loop``)."""

    __slots__ = ("base", "done", "enough", "error", "events", "hashes", "time", "want")

    def __init__(self, want: int = 0) -> None:
        self.want = want
        self.enough = threading.Lock()
        self.enough.acquire()
        self.events: list[AuditEvent] = []
        self.done = threading.Lock()
        self.done.acquire()
        self.base = 0
        self.time = ""
        self.hashes: list[bytes] = []
        self.error: BaseException | None = None


class AuditLog(Checkpoints, Queries):
    """Append-only, verifiable, durable. Thread-safe. See the module docstring.

    Raises :class:`AuditLogError` when the database cannot be opened or does not hold a log
    whose records are numbered 0..n-1 (a writable log will not grow a damaged one)."""

    def __init__(
        self,
        path: Path,
        *,
        signing_key: ed25519.Ed25519PrivateKey | None,
        checkpoint_interval_s: float = 5.0,
        _readonly: bool = False,
        public_key: ed25519.Ed25519PublicKey | None = None,
    ) -> None:
        super().__init__(path, signing_key=signing_key, public_key=public_key, readonly=_readonly)
        self._state = threading.Lock()  # closing vs enqueueing
        self._closed = False
        # Batches with events, in order, for the writer; None after the last (close).
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._open = _Batch()  # the batch new events join (under _state)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._folder: threading.Thread | None = None
        self._wal_due = threading.Event()  # set by the writer: a WAL checkpoint is due
        self._wal_bytes = 0  # written to the WAL since the last one was asked for (about)
        self._folding = True  # cleared by close
        self._commit_s = _GATHER_MAX_S  # how long the last commit took (at most the cap)
        if not _readonly:
            self._index_tail()
            self._folder = threading.Thread(target=self._fold_wal, name="audit-wal", daemon=True)
            self._folder.start()
            self._writer = threading.Thread(
                target=self._write_loop, name="audit-writer", daemon=True
            )
            self._writer.start()
            if checkpoint_interval_s > 0 and signing_key is not None:
                self._ticker = threading.Thread(
                    target=self._tick,
                    args=(checkpoint_interval_s,),
                    name="audit-checkpoints",
                    daemon=True,
                )
                self._ticker.start()

    @classmethod
    def open_readonly(cls, path: Path, *, public_key: ed25519.Ed25519PublicKey) -> AuditLog:
        """Open a log to read, prove and verify; it cannot append or sign."""
        if not path.exists():
            raise AuditLogError(f"no audit log at {path}")
        return cls(path, signing_key=None, _readonly=True, public_key=public_key)

    # -- writing ----------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        """Append ``event``; returns once it is durable (committed and fsynced). Raises
        :class:`AuditLogError` if the log is closed, read-only or cannot write: then nothing
        was recorded."""
        if not isinstance(event, AuditEvent):
            raise InvalidInput(f"audit: append takes an AuditEvent, not {type(event).__name__}")
        with self._state:
            if self._writer is None or self._closed:
                raise AuditLogError("the audit log is closed (or read-only): nothing was recorded")
            batch = self._open
            i = len(batch.events)
            if i == _MAX_BATCH:
                batch = self._open = _Batch()
                i = 0
            batch.events.append(event)
            if i + 1 == batch.want:
                batch.enough.release()
            if not i:  # the writer learns of a batch by its first event
                self._queue.put(batch)
        batch.done.acquire()  # the writer opens the gate once the batch is durable (or failed),
        batch.done.release()  # and each waiter lets the next one through
        if batch.error is not None:
            raise batch.error
        return AuditRecord._make(batch.base + i, batch.time, event, batch.hashes[i])

    def _write_loop(self) -> None:
        while True:
            try:  # an idle moment is the time to index the tail and fold the WAL in
                batch = (
                    self._queue.get(timeout=_INDEX_IDLE_S)
                    if self._indexed < len(self._tree) or self._wal_bytes
                    else self._queue.get()
                )
            except queue.Empty:
                self._index_tail()
                self._fold_soon()
                continue
            if batch is None:
                self._index_tail()
                return
            # Group commit that stays grouped: the appenders the last gate let through come
            # back (each caller appends again), and a batch taken before they are all in holds
            # only some of them, the rest wait a whole commit more, in a batch of their own.
            # So the writer waits, no longer than its last commit took, for the batch to hold
            # as many events as the one before it. Without this, the faster the writer came
            # back, the smaller its batches and the more fsyncs per event (64 threads: ~18
            # events a commit against ~55 with it; the rate under disk contention followed).
            if len(batch.events) < batch.want:
                batch.enough.acquire(timeout=self._commit_s)
            with self._state:  # closed: the events in it are the ones this commit holds
                if self._open is batch:
                    self._open = _Batch(want=len(batch.events))
            started = perf_counter()
            try:
                self._commit(batch)
            except BaseException as e:  # a fault of the writer's own: trust nothing after it
                self._broken = f"the audit log's writer failed ({e!r}); restart the gateway"
                batch.error = AuditLogError(self._broken)
            finally:
                self._commit_s = min(_GATHER_MAX_S, perf_counter() - started)
                batch.done.release()
            if len(self._tree) - self._indexed >= _INDEX_ROWS:
                self._index_tail()
            if self._wal_bytes >= WAL_BYTES:
                self._fold_soon()

    def _index_tail(self) -> None:
        """Copy the query columns of the records not yet indexed into the lookup table, in
        one transaction of its own. Only the writer thread (or ``__init__``, before it) calls
        this, so no commit runs meanwhile. A failure leaves the tail to the next try: queries
        read the unindexed tail from the records themselves."""
        if self._indexed >= len(self._tree):
            return
        self._wal_bytes += 4096 * 4  # a page a job, dataset, action and principal, about
        try:
            with self._wlock:
                self._wdb.execute(
                    f"INSERT INTO lookup SELECT seq, {', '.join(INDEXED)} "  # noqa: S608
                    "FROM records WHERE seq >= ?",
                    (self._indexed,),
                )
        except sqlite3.Error:
            return
        self._indexed = len(self._tree)

    def _fold_soon(self) -> None:
        """Ask the WAL thread for a checkpoint of the WAL (writer thread only)."""
        self._wal_bytes = 0
        self._wal_due.set()

    def _fold_wal(self) -> None:
        """The WAL thread: copy the WAL into the database when asked, on a connection of its
        own. The first PASSIVE checkpoint runs beside the writer's commits; the second, with
        the writer held off, copies what they added meanwhile (a few pages), so that the WAL
        is wholly in the database and the next commit writes it from its start again."""
        try:
            db = self._connect()
            # The database is fsynced before the WAL is written over (a checkpoint on a
            # connection without it could lose committed records to a power cut).
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            return  # SQLite checkpoints on close; the WAL only grows meanwhile
        with contextlib.closing(db):
            while True:
                self._wal_due.wait()
                self._wal_due.clear()
                if not self._folding:
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    with self._wlock:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    continue  # the next one tries again: every commit is durable in the WAL

    def _commit(self, batch: _Batch) -> None:
        """Write ``batch`` in one fsynced transaction and set its outcome; the caller opens
        its gate."""
        if self._broken is not None:
            batch.error = AuditLogError(self._broken)
            return
        base = seq = len(self._tree)
        chain = self._chain
        size = 0
        time = now()  # one time for the batch: the moment it went to disk
        params: list[Any] = []  # the rows' values, one after another
        hashes = []
        add, sha256 = params.extend, hashlib.sha256
        tail = leaf_tail(time)
        for e in batch.events:
            leaf = b"%s%d%s" % (e._leaf_head, seq, tail)  # type: ignore[attr-defined] # encode_leaf
            lh = sha256(b"\x00" + leaf).digest()  # _merkle.leaf_hash and node_hash, inline
            chain = sha256(b"\x01" + chain + lh).digest()
            add(
                (
                    seq,
                    time,
                    leaf,
                    lh,
                    chain,
                    e.principal,
                    e.role,
                    e.action,
                    e.outcome,
                    e.job_id,
                    e.dataset,
                    e.file,
                )
            )
            hashes.append(lh)
            size += len(leaf)
            seq += 1
        try:
            # One multi-row INSERT in autocommit mode is one atomic, fsynced transaction and
            # one sqlite3_step: the writer gives up the GIL once a batch, not once a row, so
            # the appenders it wakes cannot keep it waiting for the GIL row after row.
            with self._wlock:
                self._wdb.execute(insert_sql(len(hashes)), params)
        except Exception as e:  # nothing was recorded; unless the database says otherwise
            err = AuditLogError(f"cannot write the audit log: {e}")
            try:
                with self._wlock:
                    (count,) = self._wdb.execute("SELECT COUNT(*) FROM records").fetchone()
            except sqlite3.Error:
                count = -1
            if count != base:
                self._broken = (
                    f"the audit log is unusable after a failed write ({e}); restart the gateway"
                )
            batch.error = err
            return
        self._tree.extend(hashes)  # publishes the new size only once its nodes are in
        self._chain = chain
        self._wal_bytes += 2 * size + 128 * len(hashes)  # a row holds its leaf's fields twice
        batch.base, batch.time, batch.hashes = base, time, hashes

    def _tick(self, interval: float) -> None:
        last = -1
        while not self._stop.wait(interval):
            if self.size() != last:
                with contextlib.suppress(AuditLogError):  # the next tick tries again
                    last = self.checkpoint().size

    def close(self) -> None:
        """Finish every append already made, sign a last checkpoint, close. Idempotent."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None:
                self._queue.put(None)
        if self._writer is not None:
            self._writer.join()
            if self._key is not None and len(self._tree) and self._broken is None:
                self.checkpoint()
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        self._folding = False
        self._wal_due.set()
        if self._folder is not None:
            self._folder.join()
        self._rdb.close()
        if self._wdb is not self._rdb:
            self._wdb.close()
