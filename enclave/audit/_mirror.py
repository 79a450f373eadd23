"""A copy of another party's audit log, kept by one that cannot sign for it.

The gateway keeps one for each remote site: the site's own log (:class:`~enclave.audit.AuditLog`
signed with the site's key) grows at the site, and the site pushes each new stretch of records
with a checkpoint that vouches for them. :meth:`AuditMirror.extend` takes records only that way:
numbered on from the copy's end, each in the canonical leaf form, and with the Merkle root of the
whole copy, old records and new, equal to the root the site signed. So the copy only ever grows,
the site cannot rewrite a record it pushed before without its next checkpoint being refused, and
a compliance officer reads the copy (queries, proofs, an export) exactly as they read the log it
copies: its export verifies offline under the site's key alone
(:func:`~enclave.audit.verify_export`).

The database and its schema are the audit log's own (:mod:`enclave.audit._store`): one stretch
is one transaction, its checkpoint row included, so a failed push leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit._checkpoints import Checkpoints
from enclave.audit._model import SignedCheckpoint, decode_leaf, encode_leaf
from enclave.audit._query import Queries
from enclave.audit._store import INDEXED, insert_sql
from policies.errors import AuditLogError, IntegrityError, InvalidInput

_ROWS = 512  # records inserted a statement at a time


class AuditMirror(Checkpoints, Queries):
    """A verified copy of a log signed by ``public_key``'s owner. Thread-safe."""

    def __init__(self, path: Path, *, public_key: ed25519.Ed25519PublicKey) -> None:
        super().__init__(path, signing_key=None, public_key=public_key, readonly=False)
        self._extending = threading.Lock()
        self._committed = len(self._tree)
        with self._wlock:  # the lookup table is filled with the records, in one transaction
            # Pushes are few and off every caller's path: SQLite folds its WAL on commit.
            self._wdb.execute("PRAGMA wal_autocheckpoint=1000")
            if self._indexed != len(self._tree):  # emptied on open (derived data): refilled
                self._wdb.execute(
                    f"INSERT INTO lookup SELECT seq, {', '.join(INDEXED)} "  # noqa: S608
                    "FROM records WHERE seq >= ?",
                    (self._indexed,),
                )
                self._indexed = len(self._tree)

    def size(self) -> int:
        """How many records the copy holds (every one vouched for by its last checkpoint)."""
        return self._committed

    def _check_size(self, n: int, *, allow_empty: bool = False) -> None:
        # Not the tree's length: during an extend it holds records not yet kept.
        if n > self._committed:
            raise InvalidInput(f"size {n}: the copy holds {self._committed} records")
        super()._check_size(n, allow_empty=allow_empty)

    def held(self) -> SignedCheckpoint | None:
        """The last checkpoint the copy holds (it vouches for every record held)."""
        with self._rlock:
            row = self._rdb.execute(
                "SELECT size, root, time, signature FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
        return SignedCheckpoint(row[0], bytes(row[1]), row[2], bytes(row[3])) if row else None

    def extend(self, checkpoint: SignedCheckpoint, leaves: Iterable[bytes]) -> int:
        """Append ``leaves`` (the records from :meth:`size` on, as leaf bytes) if
        ``checkpoint`` is signed by the log's key and its root is the root of the copy with
        them; the size now held. The checkpoint the copy holds already is acknowledged.
        Raises :class:`CheckpointError` (signature), :class:`InvalidInput` (a leaf that is not
        the next record, or fewer or more records than the checkpoint vouches for) or
        :class:`IntegrityError` (the root differs: the log that signed it is not this copy
        grown); then nothing was stored."""
        assert self.public_key is not None
        checkpoint.verify(self.public_key)
        with self._extending:
            base = len(self._tree)
            held = self.held()
            if held is not None and (held.size, held.root) == (checkpoint.size, checkpoint.root):
                return base
            if checkpoint.size < base:
                raise IntegrityError(
                    f"the checkpoint vouches for {checkpoint.size} records; the copy holds "
                    f"{base} the log vouched for before"
                )
            try:
                with self._wlock:
                    self._wdb.execute("BEGIN IMMEDIATE")
                    try:
                        chain = self._append(base, checkpoint, leaves)
                        self._wdb.execute(
                            "INSERT INTO checkpoints VALUES (?,?,?,?)",
                            (
                                checkpoint.size,
                                checkpoint.root,
                                checkpoint.time,
                                checkpoint.signature,
                            ),
                        )
                        self._wdb.execute("COMMIT")
                    except BaseException:
                        self._wdb.execute("ROLLBACK")
                        self._tree.truncate(base)
                        raise
            except sqlite3.Error as e:
                raise AuditLogError(f"cannot write the copy of an audit log: {e}") from e
            self._chain = chain
            self._indexed = self._committed = len(self._tree)
            return self._committed

    def _append(self, base: int, checkpoint: SignedCheckpoint, leaves: Iterable[bytes]) -> bytes:
        """Insert the records (under the writer lock, inside the transaction) and grow the
        tree; the new chain head once the root is the checkpoint's."""
        seq, chain = base, self._chain
        rows: list[Any] = []
        hashes: list[bytes] = []
        for leaf in leaves:
            if seq >= checkpoint.size:
                raise InvalidInput(
                    f"more records than the checkpoint vouches for ({checkpoint.size})"
                )
            n, time, event = decode_leaf(leaf)
            if n != seq:
                raise InvalidInput(f"record {seq} is numbered {n}")
            if encode_leaf(n, time, event) != leaf:
                raise InvalidInput(f"record {seq} is not in the canonical leaf form")
            lh = hashlib.sha256(b"\x00" + leaf).digest()
            chain = hashlib.sha256(b"\x01" + chain + lh).digest()
            e = event
            columns = (e.principal, e.role, e.action, e.outcome, e.job_id, e.dataset, e.file)
            rows.append((seq, time, leaf, lh, chain, *columns))
            hashes.append(lh)
            seq += 1
            if len(rows) == _ROWS:
                self._insert(rows, hashes)
        self._insert(rows, hashes)
        if seq != checkpoint.size:
            raise InvalidInput(
                f"the checkpoint vouches for {checkpoint.size} records; {seq} were sent"
            )
        if self._tree.root(seq) != checkpoint.root:
            raise IntegrityError(
                f"the checkpoint's root is not the root of the {seq} records: the log that "
                f"signed it is not the one copied here, grown"
            )
        return chain

    def _insert(self, rows: list[Any], hashes: list[bytes]) -> None:
        if not rows:
            return
        self._wdb.execute(insert_sql(len(rows)), [v for r in rows for v in r])
        self._wdb.execute(
            f"INSERT INTO lookup SELECT seq, {', '.join(INDEXED)} FROM records WHERE seq >= ?",  # noqa: S608
            (rows[0][0],),
        )
        self._tree.extend(hashes)
        rows.clear()
        hashes.clear()

    def close(self) -> None:
        self._rdb.close()
        self._wdb.close()
