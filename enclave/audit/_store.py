"""The audit log's storage: one SQLite database, its schema, and the Merkle tree over it.

Storage is one SQLite database (WAL, ``synchronous=FULL``): a committed transaction survives
``kill -9`` and power loss, SQLite's journal makes a half-written batch vanish whole, and the
query columns get real indexes — an append-only file would need all three rebuilt by hand.

Each record stores its *leaf* (:func:`~enclave.audit._model.encode_leaf`), the leaf hash (RFC
6962) and a running chain hash ``H(0x01 || chain[i-1] || leaf_hash[i])``; the query columns are
copies of fields of the leaf, checked against it by :meth:`AuditLog.verify`.

The query indexes are kept off the durable path: a commit writes only the records table, whose
pages fill in order. Indexing each batch of 64 as it commits cost more than the fsync (an index
on job ids touches a page per job in the batch, and each dirty page goes through the WAL). The
writer copies the tail of query columns into the indexed ``lookup`` table in one transaction
once it is long enough, when the log is idle, and on close (:mod:`enclave.audit._log`); a query
reads the indexed part through the lookup table and the short tail from the records
themselves, in one read transaction, so it never misses a record (:mod:`enclave.audit._query`).
Verification checks the lookup table too.

Checkpoints of the WAL (folding it into the database file, not the signed checkpoints) are
kept off the durable path too. SQLite by default runs one inside the commit that takes the WAL
past 1000 pages: it copies ~4 MB into the database file and fsyncs it while every appender
waits. On a fresh machine that commit also grows the database file (new blocks, new page cache
pages): such commits took 30-250 ms, with every appender waiting. The writer connection
turns that off; a thread of the writer's (:mod:`enclave.audit._log`) checkpoints on its own
connection once the writer has written about :data:`WAL_BYTES` (PASSIVE: beside the commits),
then once more for the tail written meanwhile with the writer held off, so that the next
commit starts the WAL over instead of growing it. Durability does not depend on it: a commit is
fsynced in the WAL, and SQLite checkpoints again on close and recovers the WAL on open.

The Merkle tree is kept in memory as a :class:`~enclave.audit._merkle.Tree` (rebuilt from the
leaf hashes on open), so roots and proofs cost O(log² n).
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import _merkle
from enclave.audit._model import RecordError
from enclave.audit._verify import GENESIS
from policies.errors import AuditLogError

# About this many bytes written to the WAL call for a checkpoint (SQLite's default is 1000 pages).
WAL_BYTES = 4 << 20

# The query columns the lookup table indexes (the rest are filtered on the records found).
INDEXED = ("principal", "action", "job_id", "dataset")

SCHEMA = """CREATE TABLE IF NOT EXISTS records (
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


class Store:
    """The open database (a writer and a reader connection), the tree and chain head rebuilt
    from it, and the locks that share them; the base of :class:`~enclave.audit.AuditLog`.

    Raises :class:`AuditLogError` when the database cannot be opened or does not hold a log
    whose records are numbered 0..n-1 (a writable log will not grow a damaged one)."""

    def __init__(
        self,
        path: Path,
        *,
        signing_key: ed25519.Ed25519PrivateKey | None,
        public_key: ed25519.Ed25519PublicKey | None,
        readonly: bool,
    ) -> None:
        self.path = path
        self._key = signing_key
        self.public_key = public_key or (signing_key.public_key() if signing_key else None)
        self._readonly = readonly
        opened: list[sqlite3.Connection] = []
        try:
            self._wdb = self._connect()
            opened.append(self._wdb)
            if not readonly:
                self._wdb.execute("PRAGMA journal_mode=WAL")
                self._wdb.execute("PRAGMA synchronous=FULL")
                # No checkpoint on commit: the writer's own would copy ~4 MB into the database
                # and fsync it inside an append's wait (see "Checkpoints of the WAL" above).
                self._wdb.execute("PRAGMA wal_autocheckpoint=0")
                self._wdb.executescript(SCHEMA)
            # Readers get their own connection: WAL lets them run beside the writer's commits.
            self._rdb = self._connect() if not readonly else self._wdb
            opened.append(self._rdb)
            gap = None if readonly else first_gap(self._rdb, "records")
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
                if not readonly and (
                    first_gap(self._rdb, "lookup") is not None or self._indexed > len(self._tree)
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
        # Set by the writer when a failed commit may have left the database changed.
        self._broken: str | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._readonly:
            return sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def size(self) -> int:
        """How many records the log holds (every one durable)."""
        return len(self._tree)


@functools.lru_cache(maxsize=64)
def insert_sql(n: int) -> str:
    # Only placeholders are joined here: every value is bound as a parameter.
    return "INSERT INTO records VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * n)  # noqa: S608


def first_gap(db: sqlite3.Connection, table: str) -> int | None:
    """The first seq missing from ``table`` (records or lookup), if they are not 0..n-1."""
    count, low, top = db.execute(f"SELECT COUNT(*), MIN(seq), MAX(seq) FROM {table}").fetchone()  # noqa: S608
    if not count or (low, top) == (0, count - 1):
        return None
    rows = db.execute(f"SELECT seq FROM {table} ORDER BY seq")  # noqa: S608
    return next(i for i, (seq,) in enumerate(rows) if seq != i)


def check_lookup(db: sqlite3.Connection) -> None:
    """The lookup table holds records 0..k-1 with the records' own column values: a row
    removed, added or changed there would make queries miss records or find wrong ones."""
    differs = " OR ".join(f"l.{c} IS NOT r.{c}" for c in INDEXED)
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
    gap = first_gap(db, "lookup")
    if gap is not None:
        raise RecordError("its entry in the query index is missing (queries miss it)", seq=gap)
