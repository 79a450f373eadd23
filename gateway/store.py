"""The gateway's state: datasets, policy versions, jobs, approvals and releases, in SQLite.

Every write is one transaction, so a failed call leaves nothing half-written. Job state changes
go through :meth:`Store.transition`, which checks the lifecycle edge under the store's lock
and persists the new state before the caller acts on it. Rows come back as frozen values (in
:mod:`gateway._records`, with how each maps to its row; they are this module's public names
too); the store hands out no cursors or connections.

The leakage ledger (:mod:`gateway._ledger`) is written in the transaction of the change that
incurs each charge.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway import _ledger
from gateway._ledger import ReleaseCharges
from gateway._records import (
    ApprovalRecord,
    DatasetFileRecord,
    DatasetRecord,
    JobRecord,
    PinnedDataset,
    PolicyRecord,
    dataset_from_row,
    job_from_row,
    job_row,
    utcnow,
)
from policies.errors import AlreadyExists, InvalidState, NotFound
from policies.lifecycle import JobState, check_transition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL, root_hash TEXT NOT NULL,
    size INTEGER NOT NULL, files TEXT NOT NULL, description TEXT NOT NULL,
    created_at TEXT NOT NULL, site TEXT NOT NULL DEFAULT '', PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS policies (
    dataset TEXT NOT NULL, version INTEGER NOT NULL, document TEXT NOT NULL,
    sha256 TEXT NOT NULL, author TEXT NOT NULL, created_at TEXT NOT NULL,
    signature TEXT NOT NULL DEFAULT '', signer_cert TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (dataset, version));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, submitter TEXT NOT NULL,
    team TEXT NOT NULL, spec TEXT NOT NULL, spec_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL, datasets TEXT NOT NULL, policy_versions TEXT NOT NULL,
    reasons TEXT NOT NULL, image_id TEXT NOT NULL, metrics TEXT NOT NULL,
    release_id TEXT NOT NULL, binding TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    owner_record TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_submitter ON jobs (submitter);
CREATE INDEX IF NOT EXISTS jobs_team ON jobs (team);
CREATE TABLE IF NOT EXISTS approvals (
    job_id TEXT NOT NULL, owner TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
    binding TEXT NOT NULL, created_at TEXT NOT NULL,
    signature TEXT NOT NULL DEFAULT '', signer_cert TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, owner));
"""


class Store:
    """SQLite-backed state. Thread-safe: one connection, one lock, one transaction per call."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA + _ledger.SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "owner_record" not in columns:  # a store from before the leakage account
            self._conn.execute(
                "ALTER TABLE jobs ADD COLUMN owner_record TEXT NOT NULL DEFAULT '{}'"
            )
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(datasets)")}
        if "site" not in columns:  # a store from before remote sites
            self._conn.execute("ALTER TABLE datasets ADD COLUMN site TEXT NOT NULL DEFAULT ''")
        for table in ("policies", "approvals"):  # a store from before signed decisions
            columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for column in ("signature", "signer_cert"):
                if column not in columns:
                    self._conn.execute(
                        f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
                    )
        self._lock = threading.RLock()
        self._release_charges: ReleaseCharges | None = None
        with self._tx() as c:
            _ledger.build_bits(c, utcnow())

    def keep_ledger(self, release_charges: ReleaseCharges) -> None:
        """Charge each job's ε, on its transition to RELEASED, as ``release_charges`` reads it
        from the job's signed release. The first time (a store from before the ledger), the ε of
        every job already released is charged the same way, in one transaction."""
        with self._tx() as c:
            self._release_charges = release_charges
            rows = c.execute("SELECT * FROM jobs WHERE state = ?", (JobState.RELEASED.value,))
            _ledger.build_epsilon(c, (job_from_row(r) for r in rows), release_charges, utcnow())

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- datasets ---------------------------------------------------------------------------

    def dataset_owner(self, name: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT owner FROM datasets WHERE name = ? ORDER BY version LIMIT 1", (name,)
            ).fetchone()
        return None if row is None else str(row[0])

    def add_dataset(self, record: DatasetRecord) -> DatasetRecord:
        files = json.dumps([[f.path, f.size, f.sha256] for f in record.files])
        with self._tx() as c:
            if c.execute(
                "SELECT 1 FROM datasets WHERE name = ? AND version = ?",
                (record.name, record.version),
            ).fetchone():
                raise AlreadyExists(f"dataset {record.name} v{record.version} already exists")
            c.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.version,
                    record.owner,
                    record.root_hash,
                    record.size,
                    files,
                    record.description,
                    record.created_at,
                    record.site,
                ),
            )
        return record

    def dataset(self, name: str, version: int | None = None) -> DatasetRecord:
        """A dataset version; the latest when ``version`` is None. Raises :class:`NotFound`."""
        with self._lock:
            if version is None:
                row = self._conn.execute(
                    "SELECT * FROM datasets WHERE name = ? ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = self._conn.execute(
                    "SELECT * FROM datasets WHERE name = ? AND version = ?", (name, version)
                ).fetchone()
        if row is None:
            which = "" if version is None else f" v{version}"
            raise NotFound(f"no dataset {name}{which}")
        return dataset_from_row(row)

    def datasets(self) -> list[DatasetRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM datasets ORDER BY name, version").fetchall()
        return [dataset_from_row(r) for r in rows]

    # -- policies ---------------------------------------------------------------------------

    def add_policy(
        self,
        *,
        dataset: str,
        document: str,
        sha256: str,
        author: str,
        version: int | None = None,
        signature: str = "",
        signer_cert: str = "",
    ) -> PolicyRecord:
        """Store the next policy version of ``dataset``; ``version`` (when given) must be that
        next one, else InvalidState and nothing is stored."""
        with self._tx() as c:
            row = c.execute(
                "SELECT MAX(version) FROM policies WHERE dataset = ?", (dataset,)
            ).fetchone()
            latest = int(row[0] or 0)
            if version is not None and version != latest + 1:
                raise InvalidState(
                    f"policy {dataset} is at version {latest}: the owner signed it as version "
                    f"{version}, not {latest + 1} (another version was written meanwhile); "
                    "sign it again"
                )
            version = latest + 1
            record = PolicyRecord(
                dataset, version, document, sha256, author, utcnow(), signature, signer_cert
            )
            c.execute(
                "INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset,
                    version,
                    document,
                    sha256,
                    author,
                    record.created_at,
                    signature,
                    signer_cert,
                ),
            )
        return record

    def policy(self, dataset: str, version: int | None = None) -> PolicyRecord:
        with self._lock:
            if version is None:
                row = self._conn.execute(
                    "SELECT * FROM policies WHERE dataset = ? ORDER BY version DESC LIMIT 1",
                    (dataset,),
                ).fetchone()
            else:
                row = self._conn.execute(
                    "SELECT * FROM policies WHERE dataset = ? AND version = ?", (dataset, version)
                ).fetchone()
        if row is None:
            raise NotFound(f"no policy for dataset {dataset}" + (f" v{version}" if version else ""))
        return PolicyRecord(*row)

    def policies(self, dataset: str) -> list[PolicyRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM policies WHERE dataset = ? ORDER BY version", (dataset,)
            ).fetchall()
        return [PolicyRecord(*r) for r in rows]

    # -- jobs ---------------------------------------------------------------------------------

    def add_job(self, job: JobRecord) -> JobRecord:
        now = utcnow()
        job = replace(job, created_at=now, updated_at=now)
        with self._tx() as c:
            self._write_job(c, None, job)
        return job

    def job(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return job_from_row(row)

    def jobs(self, *, state: JobState | None = None) -> list[JobRecord]:
        with self._lock:
            if state is None:
                rows = self._conn.execute(
                    "SELECT * FROM jobs ORDER BY created_at, rowid"
                ).fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY created_at, rowid", (state.value,)
                ).fetchall()
        return [job_from_row(r) for r in rows]

    def jobs_of_team(
        self, *, submitter: str, team: str, state: JobState | None = None
    ) -> list[JobRecord]:
        """The jobs ``submitter`` submitted or, when ``team`` is not empty, its team did (by
        index: what a model team may list, without reading every job)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE (submitter = ? OR (? != '' AND team = ?)) "
                "AND (? IS NULL OR state = ?) ORDER BY created_at, rowid",
                (submitter, team, team, *[None if state is None else state.value] * 2),
            ).fetchall()
        return [job_from_row(r) for r in rows]

    # -- the leakage ledger -----------------------------------------------------------------

    def spent(self, kind: str, names: Iterable[str]) -> dict[str, float]:
        """Per dataset of ``names``, its tally of ``kind`` (:func:`gateway._ledger.spent`)."""
        with self._lock:
            return _ledger.spent(self._conn, kind, names)

    def charges(self, job_id: str) -> dict[tuple[str, str], float]:
        """What ``job_id`` has charged: (dataset, kind) -> amount."""
        with self._lock:
            return _ledger.charges(self._conn, job_id)

    def _write_job(self, c: sqlite3.Connection, before: JobRecord | None, after: JobRecord) -> None:
        """Write ``after`` (in place of ``before``, if any) and charge what the change incurred,
        in the caller's transaction: no change without its charge."""
        if before is not None:
            c.execute("DELETE FROM jobs WHERE id = ?", (before.id,))
        c.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            job_row(after),
        )
        _ledger.charge(c, before, after, self._release_charges)

    def transition(
        self,
        job_id: str,
        new: JobState,
        *,
        expect: frozenset[JobState] | None = None,
        **changes: Any,
    ) -> tuple[JobRecord, JobRecord]:
        """Move a job to ``new`` (and set ``changes``) in one transaction.

        Returns (before, after). Raises :class:`InvalidState` for an edge the lifecycle does not
        have, or when ``expect`` is given and the job is in none of those states.
        """
        with self._tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            before = job_from_row(row)
            if expect is not None and before.state not in expect:
                raise InvalidState(
                    f"job {job_id} is {before.state}; expected one of "
                    + ", ".join(sorted(s.value for s in expect))
                )
            check_transition(before.state, new)
            after = replace(before, state=new, updated_at=utcnow(), **changes)
            self._write_job(c, before, after)
        return before, after

    def update_job(self, job_id: str, **changes: Any) -> JobRecord:
        """Change fields other than the state (the state only moves via :meth:`transition`)."""
        if "state" in changes:
            raise ValueError("use transition() to change a job's state")
        with self._tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            before = job_from_row(row)
            after = replace(before, updated_at=utcnow(), **changes)
            self._write_job(c, before, after)
        return after

    # -- approvals ----------------------------------------------------------------------------

    def add_approval(self, record: ApprovalRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.job_id,
                    record.owner,
                    record.decision,
                    record.reason,
                    record.binding,
                    record.created_at,
                    record.signature,
                    record.signer_cert,
                ),
            )

    def approvals(self, job_id: str) -> list[ApprovalRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM approvals WHERE job_id = ? ORDER BY created_at", (job_id,)
            ).fetchall()
        return [ApprovalRecord(*r) for r in rows]

    def approvals_of(self, job_ids: Iterable[str]) -> dict[str, list[ApprovalRecord]]:
        """The approvals of each job (every id a key, oldest first), in one query."""
        out: dict[str, list[ApprovalRecord]] = {job_id: [] for job_id in job_ids}
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM approvals WHERE job_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY created_at",
                (json.dumps(list(out)),),
            ).fetchall()
        for r in rows:
            out[r[0]].append(ApprovalRecord(*r))
        return out


__all__ = [
    "ApprovalRecord",
    "DatasetFileRecord",
    "DatasetRecord",
    "JobRecord",
    "PinnedDataset",
    "PolicyRecord",
    "Store",
    "utcnow",
]
