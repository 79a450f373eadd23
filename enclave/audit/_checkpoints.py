"""Signed checkpoints of the audit log, and what is checked against them: the export and the
full verification.

A checkpoint (size, root, time) is signed with the gateway's Ed25519 key and stored on demand,
on an interval and on close. Verification names the first bad record: a changed leaf fails its
leaf hash; a changed hash breaks the chain; a rewritten tail breaks the signed checkpoints. The
database is checked line by line exactly as an export of it would be (:mod:`._verify`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from enclave.audit._model import (
    FIELDS,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    now,
)
from enclave.audit._store import Store, check_lookup
from enclave.audit._verify import check_checkpoints, check_lines, record_line, write_export
from policies.errors import AuditLogError


class Checkpoints(Store):
    """Signing, export and verification for :class:`~enclave.audit.AuditLog`."""

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

    def export(self, path: Path) -> SignedCheckpoint:
        """Write the log as JSON lines (see :mod:`enclave.audit._verify`): every record up to
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
                check_lookup(db)
        except sqlite3.Error as e:
            raise AuditLogError(f"cannot read the audit log {self.path}: {e}") from e
        finally:
            db.close()
        return check_checkpoints(p, checkpoints, self.public_key, tail_allowed=True)


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
