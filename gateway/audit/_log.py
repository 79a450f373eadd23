"""The gateway's audit log: durable, group-committed appends into a verifiable Merkle log.

Storage is one SQLite database (WAL, ``synchronous=FULL``): a committed transaction survives
``kill -9`` and power loss, SQLite's journal makes a half-written batch vanish whole, and the
query columns get real indexes — an append-only file would need all three rebuilt by hand.
:meth:`AuditLog.append` hands its event to one writer thread and returns only after the batch
holding it has committed (group commit: every appender waiting meanwhile shares one fsync, so
the rate grows with the number of concurrent callers instead of being one fsync per event).

Each record stores its *leaf* (:func:`~gateway.audit._model.encode_leaf`), the leaf hash (RFC
6962) and a running chain hash ``H(0x01 || chain[i-1] || leaf_hash[i])``; the query columns are
copies of fields of the leaf, checked against it by :meth:`AuditLog.verify`.

The query indexes are kept off the durable path: a commit writes only the records table, whose
pages fill in order. Indexing each batch of 64 as it commits cost more than the fsync (an index
on job ids touches a page per job in the batch, and each dirty page goes through the WAL). The
writer copies the tail of query columns into the indexed ``lookup`` table in one transaction
once it is ``_INDEX_ROWS`` long, when the log is idle, and on close; a query reads the indexed
part through the lookup table and the short tail from the records themselves, in one read
transaction, so it never misses a record. Verification checks the lookup table too.

The Merkle tree is
kept in memory as a :class:`~gateway.audit._merkle.Tree` (rebuilt from the leaf hashes on open),
so roots and proofs cost O(log² n). Signed checkpoints (size, root, time; Ed25519 by the
gateway's key) are written on demand, on an interval and on close. Verification names the first
bad record: a changed leaf fails its leaf hash; a changed hash breaks the chain; a rewritten
tail breaks the signed checkpoints. A failed commit leaves the log refusing every later append
(fail closed: the gateway must not act unaudited) unless the database is provably unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import _merkle
from gateway.audit._model import (
    FIELDS,
    AuditEvent,
    AuditRecord,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    decode_leaf,
    leaf_tail,
    normal_time,
    now,
)
from gateway.audit._verify import (
    GENESIS,
    check_checkpoints,
    check_lines,
    record_line,
    write_export,
)
from policies.errors import AuditLogError, InvalidInput

if TYPE_CHECKING:
    from gateway.audit._report import DatasetReport

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

# The query columns the lookup table indexes (the rest are filtered on the records found).
_INDEXED = ("principal", "action", "job_id", "dataset")
_INDEX_ROWS = 4096  # the unindexed tail is indexed once it is this long,
_INDEX_IDLE_S = 0.5  # or once no append has come for this long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, leaf BLOB NOT NULL, leaf_hash BLOB NOT NULL,
    chain BLOB NOT NULL, principal TEXT, role TEXT, action TEXT, outcome TEXT, job_id TEXT,
    dataset TEXT, file TEXT);
CREATE TABLE IF NOT EXISTS lookup (
    seq INTEGER PRIMARY KEY, principal TEXT, action TEXT, job_id TEXT, dataset TEXT);
CREATE INDEX IF NOT EXISTS lookup_job ON lookup(job_id);
CREATE INDEX IF NOT EXISTS lookup_dataset ON lookup(dataset);
CREATE INDEX IF NOT EXISTS lookup_action ON lookup(action);
CREATE INDEX IF NOT EXISTS lookup_principal ON lookup(principal);
DROP INDEX IF EXISTS records_job;
DROP INDEX IF EXISTS records_dataset;
DROP INDEX IF EXISTS records_action;
DROP INDEX IF EXISTS records_principal;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, time TEXT NOT NULL, signature BLOB NOT NULL);
"""


class _Pending:
    """One append waiting for its batch: the lock is released by the writer when done."""

    __slots__ = ("done", "error", "event", "record")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = threading.Lock()
        self.done.acquire()
        self.record: AuditRecord | None = None
        self.error: BaseException | None = None


class AuditLog:
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
        self.path = path
        self._key = signing_key
        self.public_key = public_key or (signing_key.public_key() if signing_key else None)
        self._readonly = _readonly
        opened: list[sqlite3.Connection] = []
        try:
            self._wdb = self._connect()
            opened.append(self._wdb)
            if not _readonly:
                self._wdb.execute("PRAGMA journal_mode=WAL")
                self._wdb.execute("PRAGMA synchronous=FULL")
                self._wdb.executescript(_SCHEMA)
            # Readers get their own connection: WAL lets them run beside the writer's commits.
            self._rdb = self._connect() if not _readonly else self._wdb
            opened.append(self._rdb)
            gap = None if _readonly else _first_gap(self._rdb, "records")
            if gap is not None:
                raise RecordError(
                    "the database's records are not numbered 0..n-1 (one was "
                    "removed or inserted): run `sealroom audit verify`",
                    seq=gap,
                )
            self._tree = _merkle.Tree(
                [
                    bytes(lh)
                    for (lh,) in self._rdb.execute("SELECT leaf_hash FROM records ORDER BY seq")
                ]
            )
            last = self._rdb.execute(
                "SELECT chain FROM records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            self._chain = bytes(last[0]) if last else GENESIS
            # Records 0.._indexed-1 are in the lookup table. A log written before there was
            # one gets it now; read-only, such a log is queried without it.
            self._lookup = (
                self._rdb.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='lookup'"
                ).fetchone()
                is not None
            )
            self._indexed = 0
            if self._lookup:
                (self._indexed,) = self._rdb.execute("SELECT COUNT(*) FROM lookup").fetchone()
                if not _readonly and (
                    _first_gap(self._rdb, "lookup") is not None or self._indexed > len(self._tree)
                ):
                    # A gap, or rows for records the log does not hold: the table is derived
                    # data, so it is emptied here and filled again from the records below.
                    self._wdb.execute("DELETE FROM lookup")
                    self._indexed = 0
        except BaseException as e:
            for db in opened:
                db.close()
            if isinstance(e, sqlite3.Error):
                raise AuditLogError(f"cannot open the audit log {path}: {e}") from e
            raise
        self._wlock = threading.Lock()  # the writer connection
        self._rlock = threading.Lock()  # the reader connection
        self._cplock = threading.Lock()  # one checkpoint at a time
        self._state = threading.Lock()  # closing vs enqueueing
        self._closed = False
        self._broken: str | None = None
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

    def _connect(self) -> sqlite3.Connection:
        if self._readonly:
            return sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        return db

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
                    f"INSERT INTO lookup SELECT seq, {', '.join(_INDEXED)} "  # noqa: S608
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
                self._wdb.execute(_insert_sql(len(batch)), params)
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

    def checkpoint(self) -> SignedCheckpoint:
        """Sign and store a checkpoint of the log as it is now (read-only: the latest one).
        Raises :class:`CheckpointError` if there is none to give."""
        if self._key is None:
            latest = self.checkpoints()
            if not latest:
                raise CheckpointError("the log holds no checkpoint")
            return latest[-1]
        with self._cplock:
            size = len(self._tree)
            with self._rlock:
                row = self._rdb.execute(
                    "SELECT size, root, time, signature FROM checkpoints WHERE size=?", (size,)
                ).fetchone()
            if row is not None:
                return SignedCheckpoint(row[0], bytes(row[1]), row[2], bytes(row[3]))
            unsigned = SignedCheckpoint(size, self._tree.root(size), now(), b"")
            cp = SignedCheckpoint(
                size, unsigned.root, unsigned.time, self._key.sign(unsigned.note())
            )
            try:
                with self._wlock:
                    self._wdb.execute(
                        "INSERT INTO checkpoints VALUES (?,?,?,?)",
                        (cp.size, cp.root, cp.time, cp.signature),
                    )
            except sqlite3.Error as e:
                raise CheckpointError(f"cannot store a checkpoint: {e}") from e
        return cp

    def checkpoints(self) -> list[SignedCheckpoint]:
        """Every stored checkpoint, smallest first."""
        with self._rlock:
            rows = self._rdb.execute(
                "SELECT size, root, time, signature FROM checkpoints ORDER BY size"
            ).fetchall()
        return [SignedCheckpoint(r[0], bytes(r[1]), r[2], bytes(r[3])) for r in rows]

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

    # -- reading ----------------------------------------------------------------------------

    def size(self) -> int:
        """How many records the log holds (every one durable)."""
        return len(self._tree)

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` records (default: all)."""
        n = len(self._tree) if size is None else size
        self._check_size(n, allow_empty=True)
        return self._tree.root(n)

    def _check_size(self, n: int, *, allow_empty: bool = False) -> None:
        if not (0 if allow_empty else 1) <= n <= len(self._tree):
            raise InvalidInput(f"size {n}: the log has {len(self._tree)} records")

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 audit path of record ``seq`` in the tree of the first ``size``."""
        n = len(self._tree) if size is None else size
        self._check_size(n)
        if not 0 <= seq < n:
            raise InvalidInput(f"seq {seq} is not in a tree of size {n}")
        return self._tree.inclusion_proof(seq, n)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The RFC 9162 proof that the tree of ``new_size`` extends the one of ``old_size``."""
        n = len(self._tree) if new_size is None else new_size
        if not 0 < old_size <= n <= len(self._tree):
            raise InvalidInput(
                f"no consistency proof from {old_size} to {n}: the log has "
                f"{len(self._tree)} records"
            )
        return self._tree.consistency_proof(old_size, n)

    def record(self, seq: int) -> AuditRecord:
        """Record ``seq``. Raises InvalidInput if there is none."""
        with self._rlock:
            row = self._rdb.execute(
                "SELECT leaf, leaf_hash FROM records WHERE seq=?", (seq,)
            ).fetchone()
        if row is None:
            raise InvalidInput(f"no audit record {seq}")
        s, time, event = decode_leaf(bytes(row[0]))
        return AuditRecord(s, time, event, bytes(row[1]))

    def query(
        self,
        *,
        job: str | None = None,
        dataset: str | None = None,
        file: str | None = None,
        principal: str | None = None,
        role: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 1000,
    ) -> list[AuditRecord]:
        """Records matching every given filter, oldest first, at most ``limit``. ``dataset``
        matches ``name`` (every version) or ``name@vN``; ``action`` ending in ``*`` is a
        prefix; ``since``/``until`` are RFC 3339 times (inclusive)."""
        if limit <= 0:
            raise InvalidInput("limit: must be positive")
        terms: list[tuple[str, str, list[str]]] = []  # (column, condition, its arguments)
        for col, val in (
            ("job_id", job),
            ("file", file),
            ("principal", principal),
            ("role", role),
            ("outcome", outcome),
        ):
            if val:
                terms.append((col, f"{col} = ?", [val]))
        if dataset:
            if "@" in dataset:
                terms.append(("dataset", "dataset = ?", [dataset]))
            else:
                terms.append(
                    (
                        "dataset",
                        "(dataset = ? OR dataset GLOB ?)",
                        [dataset, _glob(dataset) + "@v*"],
                    )
                )
        if action:
            if action.endswith("*"):
                terms.append(("action", "action GLOB ?", [_glob(action[:-1]) + "*"]))
            else:
                terms.append(("action", "action = ?", [action]))
        if since:
            terms.append(("time", "time >= ?", [normal_time(since)]))
        if until:
            terms.append(("time", "time <= ?", [normal_time(until)]))
        every = " AND ".join(["1", *(cond for _, cond, _ in terms)])
        args = [a for _, _, a_ in terms for a in a_]
        indexed = [(cond, a_) for col, cond, a_ in terms if col in _INDEXED]
        if indexed and self._lookup:
            # The indexed records through the lookup table, then the tail not yet indexed;
            # both filtered on the records themselves, in one read transaction. (The
            # conditions are fixed text from above; every value is bound as a parameter.)
            sql = (
                "SELECT seq, leaf, leaf_hash FROM records WHERE seq IN (SELECT seq FROM lookup "  # noqa: S608
                f"WHERE {' AND '.join(c for c, _ in indexed)}) AND {every} UNION ALL "
                "SELECT seq, leaf, leaf_hash FROM records WHERE seq > "
                f"(SELECT IFNULL(MAX(seq), -1) FROM lookup) AND {every} ORDER BY seq LIMIT ?"
            )
            args = [*(a for _, a_ in indexed for a in a_), *args, *args]
        else:
            sql = f"SELECT seq, leaf, leaf_hash FROM records WHERE {every} ORDER BY seq LIMIT ?"  # noqa: S608
        with self._rlock:
            rows = self._rdb.execute(sql, (*args, limit)).fetchall()
        out = []
        for _, leaf, lh in rows:
            s, time, event = decode_leaf(bytes(leaf))
            out.append(AuditRecord(s, time, event, bytes(lh)))
        return out

    def report(self, dataset: str) -> DatasetReport:
        """The compliance report for ``dataset`` (see :mod:`gateway.audit._report`)."""
        from gateway.audit._report import dataset_report

        if not dataset:
            raise InvalidInput("dataset: name the dataset the report is about")
        every = 10**9
        return dataset_report(
            dataset,
            self.query(dataset=dataset, limit=every),
            [
                r
                for a in ("job.submit", "job.approve", "job.deny")
                for r in self.query(action=a, limit=every)
            ],
            [
                r
                for a in ("release.sign", "release.download")
                for r in self.query(action=a, limit=every)
            ],
        )

    # -- export and verification ------------------------------------------------------------

    def export(self, path: Path) -> SignedCheckpoint:
        """Write the log as JSON lines (see :mod:`gateway.audit._verify`): every record up to
        a fresh checkpoint, then every checkpoint with the consistency proof from the one
        before it. Written whole or not at all."""
        cp = self.checkpoint()
        cps = [c for c in self.checkpoints() if c.size <= cp.size]
        sizes = [0, *(c.size for c in cps)]
        proofs = [
            (c, old, self._tree.consistency_proof(old, c.size) if old else [])
            for c, old in zip(cps, sizes, strict=False)
        ]
        db = self._connect()  # a read transaction of its own: a stable view while writing
        try:
            rows = db.execute(
                "SELECT seq, leaf, leaf_hash, chain FROM records WHERE seq < ? ORDER BY seq",
                (cp.size,),
            )
            write_export(
                path, ((s, bytes(lf), bytes(lh), bytes(ch)) for s, lf, lh, ch in rows), proofs
            )
        except (sqlite3.Error, OSError) as e:
            raise AuditLogError(f"cannot export the audit log to {path}: {e}") from e
        finally:
            db.close()
        return cp

    def verify(self) -> VerifyResult:
        """Recompute the whole log from the database: each record's leaf, query columns, leaf
        hash and chain link, and every checkpoint (a writable log signs a fresh one first).
        Records after the last checkpoint of a read-only log are counted in ``unvouched``.
        Raises :class:`RecordError` naming the first bad record, or :class:`CheckpointError`.
        """
        if self.public_key is None:
            raise AuditLogError("verifying needs the gateway's public key")
        if self._key is not None and len(self._tree) and self._broken is None:
            self.checkpoint()
        checkpoints = self.checkpoints()
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT seq, leaf, leaf_hash, chain, principal, role, action, outcome, job_id, "
                "dataset, file FROM records ORDER BY seq"
            )
            p = check_lines(_db_lines(rows), sizes={c.size for c in checkpoints})
            if self._lookup:
                _check_lookup(db)
        except sqlite3.Error as e:
            raise AuditLogError(f"cannot read the audit log {self.path}: {e}") from e
        finally:
            db.close()
        return check_checkpoints(p, checkpoints, self.public_key, tail_allowed=True)


@functools.lru_cache(maxsize=64)
def _insert_sql(n: int) -> str:
    # Only placeholders are joined here: every value is bound as a parameter.
    return "INSERT INTO records VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * n)  # noqa: S608


def _first_gap(db: sqlite3.Connection, table: str) -> int | None:
    """The first seq missing from ``table`` (records or lookup), if they are not 0..n-1."""
    count, low, top = db.execute(f"SELECT COUNT(*), MIN(seq), MAX(seq) FROM {table}").fetchone()  # noqa: S608
    if not count or (low, top) == (0, count - 1):
        return None
    rows = db.execute(f"SELECT seq FROM {table} ORDER BY seq")  # noqa: S608
    return next(i for i, (seq,) in enumerate(rows) if seq != i)


def _check_lookup(db: sqlite3.Connection) -> None:
    """The lookup table holds records 0..k-1 with the records' own column values: a row
    removed, added or changed there would make queries miss records or find wrong ones."""
    differs = " OR ".join(f"l.{c} IS NOT r.{c}" for c in _INDEXED)
    row = db.execute(
        "SELECT l.seq, r.seq IS NULL FROM lookup l LEFT JOIN records r ON r.seq = l.seq "  # noqa: S608
        f"WHERE r.seq IS NULL OR {differs} ORDER BY l.seq LIMIT 1"
    ).fetchone()
    if row is not None:
        raise RecordError(
            "the query index lists it, but the log holds no such record"
            if row[1]
            else "its entry in the query index differs from it (edited)",
            seq=row[0],
        )
    gap = _first_gap(db, "lookup")
    if gap is not None:
        raise RecordError("its entry in the query index is missing (queries miss it)", seq=gap)


def _glob(text: str) -> str:
    """``text`` as a GLOB pattern that matches only itself (GLOB is case-sensitive, unlike
    LIKE, and an index serves a GLOB prefix)."""
    return text.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]")


def _db_lines(rows: Any) -> Iterator[bytes]:
    """Each row as its export line (so the database is checked exactly as an export of it
    would be), once its query columns are found to match its leaf."""
    for row in rows:
        seq, leaf = row[0], bytes(row[1])
        try:
            obj = json.loads(leaf)
            columns = tuple(obj[f] for f in FIELDS)
        except (ValueError, KeyError, TypeError) as e:
            raise RecordError(f"its leaf is not an event ({e})", seq=seq) from e
        if tuple(row[4:]) != columns:
            raise RecordError("its query columns differ from its leaf (edited)", seq=seq)
        yield record_line(seq, leaf, bytes(row[2]), bytes(row[3]))
