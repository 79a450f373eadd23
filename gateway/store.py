"""The gateway's state: datasets, policy versions, jobs, approvals and releases, in SQLite.

Every write is one transaction, so a failed call leaves nothing half-written. Job state changes
go through :meth:`Store.transition`, which checks the lifecycle edge under the store's lock
and persists the new state before the caller acts on it. Rows come back as frozen values; the
store hands out no cursors or connections.

The leakage ledger (:mod:`gateway._ledger`) is written in the transaction of the change that
incurs each charge.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway import _ledger
from gateway._ledger import ReleaseCharges
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


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DatasetFileRecord:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    version: int
    owner: str
    root_hash: str
    size: int
    files: tuple[DatasetFileRecord, ...]
    description: str
    created_at: str
    site: str = ""
    """The remote site that keeps it (its bytes never reach the gateway); empty: the gateway's
    own local site."""


@dataclass(frozen=True)
class PolicyRecord:
    dataset: str
    version: int
    document: str
    sha256: str
    author: str
    created_at: str
    signature: str = ""
    """The author's signature (base64, ECDSA P-256) over :func:`policies.signing.policy_message`
    of this text; empty for a version stored before policies were signed."""
    signer_cert: str = ""
    """The PEM certificate whose key made ``signature``."""


@dataclass(frozen=True)
class PinnedDataset:
    """A dataset version a job is bound to."""

    name: str
    version: int
    root_hash: str


@dataclass(frozen=True)
class ApprovalRecord:
    job_id: str
    owner: str
    decision: str  # "approve" | "deny"
    reason: str
    binding: str
    created_at: str
    signature: str = ""
    """The owner's signature (base64, ECDSA P-256) over :func:`policies.signing.
    approval_message` of ``binding`` and ``decision``, made in the owner's client."""
    signer_cert: str = ""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: JobState
    submitter: str
    team: str
    spec: str  # canonical JSON of the parsed spec
    spec_sha256: str
    bundle_sha256: str
    datasets: tuple[PinnedDataset, ...]
    policy_versions: Mapping[str, int]
    reasons: tuple[str, ...] = ()
    image_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    release_id: str = ""
    binding: str = ""
    created_at: str = ""
    updated_at: str = ""
    details: tuple[str, ...] = ()
    """What the site said to the owners about the run (which check, which exit code): never
    shown to the model team, whose ``reasons`` come from a fixed vocabulary."""
    channel_bits: float = 0.0
    """The capacity of what the team could observe of the run, charged when it started."""


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
            _ledger.build_epsilon(c, (_job(r) for r in rows), release_charges, utcnow())

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
        return _dataset(row)

    def datasets(self) -> list[DatasetRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM datasets ORDER BY name, version").fetchall()
        return [_dataset(r) for r in rows]

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
        return _job(row)

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
        return [_job(r) for r in rows]

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
        return [_job(r) for r in rows]

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
            _job_row(after),
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
            before = _job(row)
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
            before = _job(row)
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


def _dataset(row: tuple[Any, ...]) -> DatasetRecord:
    name, version, owner, root_hash, size, files, description, created_at, site = row
    return DatasetRecord(
        name=name,
        version=int(version),
        owner=owner,
        root_hash=root_hash,
        size=int(size),
        files=tuple(DatasetFileRecord(p, int(s), h) for p, s, h in json.loads(files)),
        description=description,
        created_at=created_at,
        site=site,
    )


def _job_row(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.name,
        job.state.value,
        job.submitter,
        job.team,
        job.spec,
        job.spec_sha256,
        job.bundle_sha256,
        json.dumps([[d.name, d.version, d.root_hash] for d in job.datasets]),
        json.dumps(dict(job.policy_versions), sort_keys=True),
        json.dumps(list(job.reasons)),
        job.image_id,
        json.dumps(dict(job.metrics), sort_keys=True),
        job.release_id,
        job.binding,
        job.created_at,
        job.updated_at,
        json.dumps({"details": list(job.details), "channel_bits": job.channel_bits}),
    )


def _job(row: tuple[Any, ...]) -> JobRecord:
    (
        id_,
        name,
        state,
        submitter,
        team,
        spec,
        spec_sha,
        bundle_sha,
        datasets,
        policy_versions,
        reasons,
        image_id,
        metrics,
        release_id,
        binding,
        created_at,
        updated_at,
        owner_record,
    ) = row
    owner = json.loads(owner_record)
    return JobRecord(
        id=id_,
        name=name,
        state=JobState(state),
        submitter=submitter,
        team=team,
        spec=spec,
        spec_sha256=spec_sha,
        bundle_sha256=bundle_sha,
        datasets=tuple(PinnedDataset(n, int(v), h) for n, v, h in json.loads(datasets)),
        policy_versions={k: int(v) for k, v in json.loads(policy_versions).items()},
        reasons=tuple(json.loads(reasons)),
        image_id=image_id,
        metrics={k: float(v) for k, v in json.loads(metrics).items()},
        release_id=release_id,
        binding=binding,
        created_at=created_at,
        updated_at=updated_at,
        details=tuple(owner.get("details", ())),
        channel_bits=float(owner.get("channel_bits", 0.0)),
    )
