"""The gateway's audit log: durable, group-committed appends into a verifiable Merkle log.

:class:`AuditLog` is assembled by concern: the database, its schema and the in-memory tree in
:mod:`._store`; signed checkpoints, export and verification in :mod:`._checkpoints`; roots,
proofs, records and queries in :mod:`._query`; and here the writer, the one thread that appends.

:meth:`AuditLog.append` hands its event to the writer thread and returns only after the batch
holding it has committed (group commit: every appender waiting meanwhile shares one fsync, so
the rate grows with the number of concurrent callers instead of being one fsync per event).
The writer indexes the query columns of the records it wrote once ``_INDEX_ROWS`` wait, when
the log is idle for ``_INDEX_IDLE_S``, and on close (see :mod:`._store`). A second thread signs
a checkpoint on an interval. A failed commit leaves the log refusing every later append (fail
closed: the gateway must not act unaudited) unless the database is provably unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import _merkle  # noqa: F401  # _commit inlines its leaf_hash and node_hash
from gateway.audit._checkpoints import Checkpoints
from gateway.audit._model import (
    AuditEvent,
    AuditRecord,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    leaf_tail,
    now,
)
from gateway.audit._query import Queries
from gateway.audit._store import INDEXED, insert_sql
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


class _Pending:
    """One append waiting for its batch: the lock is released by the writer when done."""

    __slots__ = ("done", "error", "event", "record")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = threading.Lock()
        self.done.acquire()
        self.record: AuditRecord | None = None
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
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        if not _readonly:
            self._index_tail()
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
        item = _Pending(event)
        with self._state:
            if self._writer is None or self._closed:
                raise AuditLogError("the audit log is closed (or read-only): nothing was recorded")
            self._queue.put(item)
        item.done.acquire()
        if item.error is not None:
            raise item.error
        assert item.record is not None
        return item.record

    def _write_loop(self) -> None:
        while True:
            try:  # while records wait to be indexed, an idle moment is the time to do it
                first = (
                    self._queue.get(timeout=_INDEX_IDLE_S)
                    if self._indexed < len(self._tree)
                    else self._queue.get()
                )
            except queue.Empty:
                self._index_tail()
                continue
            if first is None:
                self._index_tail()
                return
            batch = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if len(self._tree) - self._indexed >= _INDEX_ROWS:
                self._index_tail()
            if stop:
                self._index_tail()
                return

    def _index_tail(self) -> None:
        """Copy the query columns of the records not yet indexed into the lookup table, in
        one transaction of its own. Only the writer thread (or ``__init__``, before it) calls
        this, so no commit runs meanwhile. A failure leaves the tail to the next try: queries
        read the unindexed tail from the records themselves."""
        if self._indexed >= len(self._tree):
            return
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

    def _commit(self, batch: list[_Pending]) -> None:
        if self._broken is not None:
            self._fail(batch, AuditLogError(self._broken))
            return
        base = seq = len(self._tree)
        chain = self._chain
        time = now()  # one time for the batch: the moment it went to disk
        params: list[Any] = []  # the rows' values, one after another
        hashes = []
        add, sha256 = params.extend, hashlib.sha256
        tail = leaf_tail(time)
        for item in batch:
            e = item.event
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
            seq += 1
        try:
            # One multi-row INSERT in autocommit mode is one atomic, fsynced transaction and
            # one sqlite3_step: the writer gives up the GIL once a batch, not once a row, so
            # the appenders it wakes cannot keep it waiting for the GIL row after row.
            with self._wlock:
                self._wdb.execute(insert_sql(len(batch)), params)
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
            self._fail(batch, err)
            return
        self._tree.extend(hashes)  # publishes the new size only once its nodes are in
        self._chain = chain
        for i, item in enumerate(batch):
            item.record = AuditRecord._make(base + i, time, item.event, hashes[i])
            item.done.release()

    @staticmethod
    def _fail(batch: list[_Pending], err: AuditLogError) -> None:
        for item in batch:
            item.error = err
            item.done.release()

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
        self._rdb.close()
        if self._wdb is not self._rdb:
            self._wdb.close()
