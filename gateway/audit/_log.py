"""The gateway's audit log: durable, group-committed appends into a verifiable Merkle log.

Storage is one SQLite database (WAL, ``synchronous=FULL``): a committed transaction survives
``kill -9`` and power loss, and SQLite's own journal makes a half-written batch vanish whole.
:meth:`AuditLog.append` hands its event to a single writer thread and returns only after the
batch holding it has committed (group commit: concurrent appenders share one fsync).

Each record stores its *leaf*, the canonical JSON of the event with its sequence number and
time, the leaf hash (RFC 6962), and a running chain hash ``H(chain[i-1] || leaf_hash[i])``; the
query columns are copies of fields of the leaf, checked against it by :meth:`AuditLog.verify`.
Signed checkpoints (size, root, time; Ed25519 by the gateway's key) are written on demand, on
an interval and on close. Verification names the first bad record: a changed leaf fails its
leaf hash; a changed hash breaks the chain; a rewritten tail breaks the signed checkpoints.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import queue
import sqlite3
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import _merkle
from policies.errors import AuditLogError, InvalidInput

ORIGIN = "sealroom-audit/v1"
_GENESIS = b"\x00" * 32
_MAX_BATCH = 4096
_FIELDS = ("principal", "role", "action", "outcome", "job_id", "dataset", "file")


class RecordError(AuditLogError):
    """A record does not match its hash, its place or the chain; ``seq`` names it."""

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(f"record {seq}: {message}")
        self.seq = seq


class CheckpointError(AuditLogError):
    """A checkpoint's signature or root does not hold."""


@dataclass(frozen=True)
class AuditEvent:
    """Something that happened: who (name and role), what, how it ended, about what."""

    principal: str
    role: str
    action: str
    outcome: str
    job_id: str | None = None
    dataset: str | None = None
    file: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("principal", "role", "action", "outcome"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidInput(f"audit event: {name} must be a non-empty string")
        try:
            details = json.loads(json.dumps(dict(self.details), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"audit event: details must be JSON ({e})") from e
        object.__setattr__(self, "details", MappingProxyType(details))


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: str
    event: AuditEvent
    leaf_hash: bytes


@dataclass(frozen=True)
class SignedCheckpoint:
    """A signed statement that the log had ``size`` records with Merkle root ``root``."""

    size: int
    root: bytes
    time: str
    signature: bytes
    origin: str = ORIGIN

    def note(self) -> bytes:
        return (f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"
                f"{self.time}\n").encode()

    def verify(self, public_key: ed25519.Ed25519PublicKey) -> None:
        try:
            public_key.verify(self.signature, self.note())
        except InvalidSignature as e:
            raise CheckpointError(
                f"checkpoint at size {self.size}: the signature is not the gateway key's"
            ) from e

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "size": self.size, "root": self.root.hex(),
                "time": self.time, "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SignedCheckpoint:
        try:
            return cls(size=int(d["size"]), root=bytes.fromhex(d["root"]), time=str(d["time"]),
                       signature=base64.b64decode(d["signature"], validate=True),
                       origin=str(d["origin"]))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"a checkpoint is malformed: {e}") from e


@dataclass(frozen=True)
class VerifyResult:
    size: int
    root: bytes
    checkpoint: SignedCheckpoint | None

    @property
    def root_hex(self) -> str:
        return self.root.hex()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_leaf(seq: int, time: str, event: AuditEvent) -> bytes:
    """The canonical bytes of one record: sorted-key compact ASCII JSON."""
    obj = {"seq": seq, "time": time, "details": dict(event.details),
           **{f: getattr(event, f) for f in _FIELDS}}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_leaf(leaf: bytes) -> tuple[int, str, AuditEvent]:
    obj = json.loads(leaf)
    return int(obj["seq"]), str(obj["time"]), AuditEvent(
        details=obj.get("details") or {}, **{f: obj.get(f) for f in _FIELDS})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, leaf BLOB NOT NULL, leaf_hash BLOB NOT NULL,
    chain BLOB NOT NULL, principal TEXT, role TEXT, action TEXT, outcome TEXT, job_id TEXT,
    dataset TEXT, file TEXT);
CREATE INDEX IF NOT EXISTS records_job ON records(job_id);
CREATE INDEX IF NOT EXISTS records_dataset ON records(dataset);
CREATE INDEX IF NOT EXISTS records_action ON records(action);
CREATE INDEX IF NOT EXISTS records_principal ON records(principal);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, time TEXT NOT NULL, signature BLOB NOT NULL);
"""


class AuditLog:
    """Append-only, verifiable, durable. Thread-safe. See the module docstring."""

    def __init__(self, path: Path, *, signing_key: ed25519.Ed25519PrivateKey | None,
                 checkpoint_interval_s: float = 5.0, _readonly: bool = False,
                 public_key: ed25519.Ed25519PublicKey | None = None) -> None:
        self.path = path
        self._key = signing_key
        self.public_key = public_key or (signing_key.public_key() if signing_key else None)
        uri = f"file:{path}?mode=ro" if _readonly else str(path)
        self._db = sqlite3.connect(uri, uri=_readonly, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")
        if not _readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        self._read_lock = threading.Lock()
        rows = self._db.execute("SELECT leaf_hash, chain FROM records ORDER BY seq").fetchall()
        self._leaves: list[bytes] = [bytes(r[0]) for r in rows]
        self._chain = bytes(rows[-1][1]) if rows else _GENESIS
        self._closed = threading.Event()
        self._queue: queue.SimpleQueue[tuple[AuditEvent, Future[AuditRecord]] | None] = (
            queue.SimpleQueue())
        self._writer: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        if not _readonly:
            self._writer = threading.Thread(target=self._write_loop, name="audit-writer",
                                            daemon=True)
            self._writer.start()
            if checkpoint_interval_s > 0 and signing_key is not None:
                self._ticker = threading.Thread(target=self._tick, args=(checkpoint_interval_s,),
                                                name="audit-checkpoints", daemon=True)
                self._ticker.start()

    @classmethod
    def open_readonly(cls, path: Path, *, public_key: ed25519.Ed25519PublicKey) -> AuditLog:
        if not path.exists():
            raise AuditLogError(f"no audit log at {path}")
        return cls(path, signing_key=None, _readonly=True, public_key=public_key)

    # -- writing ----------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        """Append ``event``; returns once it is durable. Raises AuditLogError if closed."""
        if self._writer is None or self._closed.is_set():
            raise AuditLogError("the audit log is closed (or read-only): nothing was recorded")
        fut: Future[AuditRecord] = Future()
        self._queue.put((event, fut))
        return fut.result()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[AuditEvent, Future[AuditRecord]]]) -> None:
        seq = len(self._leaves)
        chain = self._chain
        rows, records = [], []
        for event, _ in batch:
            time = _now()
            leaf = encode_leaf(seq, time, event)
            lh = _merkle.leaf_hash(leaf)
            chain = _merkle.node_hash(chain, lh)
            rows.append((seq, time, leaf, lh, chain,
                         *(getattr(event, f) for f in _FIELDS)))
            records.append(AuditRecord(seq, time, event, lh))
            seq += 1
        try:
            with self._read_lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
        except Exception as e:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            err = AuditLogError(f"cannot write the audit log: {e}")
            for _, fut in batch:
                fut.set_exception(err)
            return
        self._leaves.extend(r.leaf_hash for r in records)
        self._chain = chain
        for (_, fut), rec in zip(batch, records, strict=True):
            fut.set_result(rec)

    def _tick(self, interval: float) -> None:
        last = -1
        while not self._closed.wait(interval):
            if self.size() != last:
                try:
                    last = self.checkpoint().size
                except AuditLogError:
                    pass

    def checkpoint(self) -> SignedCheckpoint:
        """Sign and store a checkpoint of the log as it is now (or the latest one, read-only)."""
        if self._key is None:
            latest = self.checkpoints()
            if not latest:
                raise CheckpointError("the log holds no checkpoint")
            return latest[-1]
        with self._read_lock:
            size = len(self._leaves)
            root = _merkle.root(self._leaves[:size])
            existing = self._db.execute(
                "SELECT size, root, time, signature FROM checkpoints WHERE size=?", (size,)
            ).fetchone()
            if existing is not None:
                return SignedCheckpoint(existing[0], bytes(existing[1]), existing[2],
                                        bytes(existing[3]))
            time = _now()
            unsigned = SignedCheckpoint(size, root, time, b"")
            cp = SignedCheckpoint(size, root, time, self._key.sign(unsigned.note()))
            self._db.execute("INSERT INTO checkpoints VALUES (?,?,?,?)",
                             (cp.size, cp.root, cp.time, cp.signature))
        return cp

    def checkpoints(self) -> list[SignedCheckpoint]:
        with self._read_lock:
            rows = self._db.execute(
                "SELECT size, root, time, signature FROM checkpoints ORDER BY size").fetchall()
        return [SignedCheckpoint(r[0], bytes(r[1]), r[2], bytes(r[3])) for r in rows]

    def close(self) -> None:
        if self._closed.is_set():
            return
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            if self._key is not None and self._leaves:
                self.checkpoint()
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        self._db.close()

    # -- reading ----------------------------------------------------------------------------

    def size(self) -> int:
        return len(self._leaves)

    def root(self, size: int | None = None) -> bytes:
        n = len(self._leaves) if size is None else size
        return _merkle.root(self._leaves[:n])

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        n = len(self._leaves) if size is None else size
        if not 0 < n <= len(self._leaves):
            raise InvalidInput(f"size {n}: the log has {len(self._leaves)} records")
        return _merkle.inclusion_proof(seq, self._leaves[:n])

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        n = len(self._leaves) if new_size is None else new_size
        if not 0 < old_size <= n <= len(self._leaves):
            raise InvalidInput(
                f"no consistency proof from {old_size} to {n}: the log has "
                f"{len(self._leaves)} records")
        return _merkle.consistency_proof(old_size, self._leaves[:n])

    def record(self, seq: int) -> AuditRecord:
        with self._read_lock:
            row = self._db.execute(
                "SELECT leaf, leaf_hash FROM records WHERE seq=?", (seq,)).fetchone()
        if row is None:
            raise InvalidInput(f"no audit record {seq}")
        s, time, event = decode_leaf(bytes(row[0]))
        return AuditRecord(s, time, event, bytes(row[1]))

    def query(self, *, job: str | None = None, dataset: str | None = None,
              file: str | None = None, principal: str | None = None, role: str | None = None,
              action: str | None = None, outcome: str | None = None, since: str | None = None,
              until: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """Records matching every given filter, oldest first, at most ``limit``. ``dataset``
        matches ``name`` (every version) or ``name@vN``; ``action`` ending in ``*`` is a
        prefix; ``since``/``until`` are RFC 3339 times (inclusive)."""
        where, args = [], []
        for col, val in (("job_id", job), ("file", file), ("principal", principal),
                         ("role", role), ("outcome", outcome)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        if dataset:
            if "@" in dataset:
                where.append("dataset = ?")
                args.append(dataset)
            else:
                where.append("(dataset = ? OR dataset LIKE ? ESCAPE '\\')")
                args += [dataset, dataset.replace("_", "\\_").replace("%", "\\%") + "@v%"]
        if action:
            if action.endswith("*"):
                where.append("action LIKE ? ESCAPE '\\'")
                args.append(action[:-1].replace("_", "\\_").replace("%", "\\%") + "%")
            else:
                where.append("action = ?")
                args.append(action)
        if since:
            where.append("time >= ?")
            args.append(_normal_time(since))
        if until:
            where.append("time <= ?")
            args.append(_normal_time(until))
        if limit <= 0:
            raise InvalidInput("limit: must be positive")
        sql = "SELECT leaf, leaf_hash FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ?"
        with self._read_lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        out = []
        for leaf, lh in rows:
            s, time, event = decode_leaf(bytes(leaf))
            out.append(AuditRecord(s, time, event, bytes(lh)))
        return out

    def report(self, dataset: str) -> Any:
        """The compliance report for ``dataset`` (see :mod:`gateway.audit._report`)."""
        from gateway.audit._report import dataset_report

        if not dataset:
            raise InvalidInput("dataset: name the dataset the report is about")
        return dataset_report(dataset, self.query(dataset=dataset, limit=10**9),
                              self.query(action="release.sign", limit=10**9))

    # -- export and verification ------------------------------------------------------------

    def export(self, path: Path) -> SignedCheckpoint:
        """Write the log as JSON lines (records, then every checkpoint, the last one fresh)."""
        cp = self.checkpoint()
        with self._read_lock:
            rows = self._db.execute(
                "SELECT seq, leaf, leaf_hash, chain FROM records WHERE seq < ? ORDER BY seq",
                (cp.size,)).fetchall()
        cps = [c for c in self.checkpoints() if c.size <= cp.size]
        with path.open("w", encoding="ascii") as f:
            for seq, leaf, lh, chain in rows:
                f.write(json.dumps({"seq": seq, "leaf": json.loads(leaf),
                                    "leaf_hash": bytes(lh).hex(), "chain": bytes(chain).hex()},
                                   sort_keys=True, separators=(",", ":")) + "\n")
            for c in cps:
                f.write(json.dumps({"checkpoint": c.to_dict()}, sort_keys=True,
                                   separators=(",", ":")) + "\n")
        return cp

    def verify(self) -> VerifyResult:
        """Recompute the whole log; raise naming the first bad record or checkpoint."""
        if self.public_key is None:
            raise AuditLogError("verifying needs the gateway's public key")
        if self._key is not None and self._leaves:
            self.checkpoint()  # vouch for what is here now, then recompute it all
        with self._read_lock:
            rows = self._db.execute(
                "SELECT seq, leaf, leaf_hash, chain, principal, role, action, outcome, job_id, "
                "dataset, file FROM records ORDER BY seq").fetchall()
        entries = []
        for row in rows:
            seq, leaf, lh, chain = row[0], bytes(row[1]), bytes(row[2]), bytes(row[3])
            try:
                _, _, event = decode_leaf(leaf)
            except (ValueError, KeyError, TypeError, InvalidInput) as e:
                raise RecordError(f"the leaf is not a valid event ({e})", seq=seq) from e
            if tuple(row[4:]) != tuple(getattr(event, f) for f in _FIELDS):
                raise RecordError("its query columns differ from its leaf (edited)", seq=seq)
            entries.append((seq, leaf, lh, chain))
        return _verify_entries(entries, self.checkpoints(), self.public_key)


def _normal_time(text: str) -> str:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise InvalidInput(f"{text!r} is not an RFC 3339 time") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _verify_entries(entries: list[tuple[int, bytes, bytes, bytes]],
                    checkpoints: list[SignedCheckpoint],
                    public_key: ed25519.Ed25519PublicKey) -> VerifyResult:
    leaves: list[bytes] = []
    chain = _GENESIS
    for expected, (seq, leaf, lh, stored_chain) in enumerate(entries):
        if seq != expected:
            what = "missing" if seq > expected else "out of order or repeated"
            raise RecordError(f"found where record {expected} belongs: a record is {what}",
                              seq=expected)
        try:
            inner_seq = json.loads(leaf)["seq"]
        except (ValueError, KeyError, TypeError) as e:
            raise RecordError(f"the leaf is not valid JSON ({e})", seq=seq) from e
        if inner_seq != seq:
            raise RecordError(f"its leaf says it is record {inner_seq} (moved)", seq=seq)
        actual = _merkle.leaf_hash(leaf)
        if actual != lh:
            raise RecordError("its content does not match its leaf hash (edited)", seq=seq)
        chain = _merkle.node_hash(chain, lh)
        if chain != stored_chain:
            raise RecordError("the hash chain breaks here (edited, removed or inserted)",
                              seq=seq)
        leaves.append(lh)
    if not checkpoints:
        raise CheckpointError("the log holds no signed checkpoint: nothing vouches for it")
    prev = 0
    for cp in checkpoints:
        cp.verify(public_key)
        if cp.size > len(leaves):
            raise CheckpointError(
                f"a checkpoint vouches for {cp.size} records but only {len(leaves)} are "
                "here: records were removed from the end")
        if _merkle.root(leaves[: cp.size]) != cp.root:
            raise RecordError(
                f"records {prev}..{cp.size - 1} do not match the signed checkpoint at size "
                f"{cp.size} (rewritten)", seq=prev)
        prev = cp.size
    last = checkpoints[-1]
    return VerifyResult(size=len(leaves), root=_merkle.root(leaves), checkpoint=last)


def verify_export(path: Path, *, public_key: ed25519.Ed25519PublicKey,
                  previous: SignedCheckpoint | None = None) -> VerifyResult:
    """Verify an export offline: every record, the chain, every checkpoint's signature and
    root; with ``previous`` (a checkpoint seen earlier), that this log extends it. Raises
    :class:`AuditLogError` (a :class:`RecordError` naming the first bad record)."""
    entries: list[tuple[int, bytes, bytes, bytes]] = []
    checkpoints: list[SignedCheckpoint] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise AuditLogError(f"line {n} of the export is not JSON") from e
            if "checkpoint" in obj:
                checkpoints.append(SignedCheckpoint.from_dict(obj["checkpoint"]))
                continue
            try:
                seq = int(obj["seq"])
                leaf = json.dumps(obj["leaf"], sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True).encode()
                entries.append((seq, leaf, bytes.fromhex(obj["leaf_hash"]),
                                bytes.fromhex(obj["chain"])))
            except (KeyError, ValueError, TypeError) as e:
                raise RecordError(f"line {n} is not a record ({e})",
                                  seq=int(obj.get("seq", -1)) if isinstance(obj, dict) else -1
                                  ) from e
    result = _verify_entries(entries, checkpoints, public_key)
    if previous is not None:
        previous.verify(public_key)
        leaves = [lh for _, _, lh, _ in entries]
        if previous.size > len(leaves):
            raise CheckpointError(f"the earlier checkpoint ({previous.size} records) is larger "
                                  f"than this log ({len(leaves)})")
        _merkle.verify_consistency(
            old_size=previous.size, new_size=len(leaves), old_root=previous.root,
            new_root=result.root,
            proof=_merkle.consistency_proof(previous.size, leaves) if previous.size else [])
    return result
