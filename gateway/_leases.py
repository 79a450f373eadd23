"""The gateway's record of remote leases: one SQLite row per lease ever granted (WAL,
synchronous=FULL), written before a lease is handed out and at each report applied, before it
is acknowledged (:mod:`gateway._sitelink` says why). A job id is on record at most once: it is
never leased again, by this process or a later one on the same home.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from policies.errors import InvalidState, SiteError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    job_id   TEXT PRIMARY KEY,
    site     TEXT NOT NULL,
    state    TEXT NOT NULL CHECK (state IN ('leased', 'ended')),
    next_seq INTEGER NOT NULL CHECK (next_seq >= 0),
    bundle   TEXT NOT NULL DEFAULT '',
    release  TEXT NOT NULL DEFAULT ''
)
"""


class LeaseBook:
    """The leases on disk, one row each (see the module). Raises :class:`SiteError` when the
    file cannot be written: the call that needed it fails ``UNAVAILABLE`` and is repeated."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self._conn.execute(sql, args)
            except sqlite3.Error as e:
                raise SiteError(f"the lease book could not be written: {e}") from e

    def live(self) -> list[tuple[str, str, int, str, str]]:
        """(job, site, next report number, bundle path, accepted release path) of each live
        lease."""
        with self._lock:
            return self._conn.execute(
                "SELECT job_id, site, next_seq, bundle, release FROM leases "
                "WHERE state = 'leased' ORDER BY rowid"
            ).fetchall()

    def find(self, job_id: str) -> tuple[str, str, int] | None:
        """(site, state, next report number) of a lease ever granted, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT site, state, next_seq FROM leases WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def grant(self, job_id: str, site: str, bundle: Path | None) -> None:
        """Record a new lease; a job id already on record is never granted again."""
        try:
            self._write(
                "INSERT INTO leases (job_id, site, state, next_seq, bundle) "
                "VALUES (?, ?, 'leased', 0, ?)",
                (job_id, site, str(bundle) if bundle is not None else ""),
            )
        except SiteError as e:
            if isinstance(e.__cause__, sqlite3.IntegrityError):
                raise InvalidState(f"job {job_id} was leased before: never again") from e
            raise

    def advance(self, job_id: str, next_seq: int, *, ended: bool) -> None:
        self._write(
            "UPDATE leases SET next_seq = ?, state = ? WHERE job_id = ?",
            (next_seq, "ended" if ended else "leased", job_id),
        )

    def accept(self, job_id: str, release: Path) -> None:
        self._write("UPDATE leases SET release = ? WHERE job_id = ?", (str(release), job_id))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
