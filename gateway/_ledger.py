"""The gateway's leakage ledger, in the store's SQLite database: what each job has charged each
dataset (``charges``: the ε of its release, the channel bits of its run) and, per dataset, the
running exact sum (``tallies``). :class:`gateway.store.Store` writes both in the transaction of
the change that incurs the charge, so that no state change is ever persisted without its charge,
and a policy decision reads a tally in one indexed lookup however many jobs the store holds
(rather than every released job's manifest, or every job row). Every function here runs inside
the caller's transaction or under its lock.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from policies.errors import InvalidState
from policies.lifecycle import JobState


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class LedgerJob(Protocol):
    """What the ledger reads of a job (a :class:`gateway.store.JobRecord`)."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> JobState: ...
    @property
    def datasets(self) -> Sequence[_Named]: ...
    @property
    def channel_bits(self) -> float: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    job_id TEXT NOT NULL, dataset TEXT NOT NULL, kind TEXT NOT NULL, amount REAL NOT NULL,
    PRIMARY KEY (job_id, dataset, kind));
CREATE INDEX IF NOT EXISTS charges_by_dataset ON charges (dataset, kind);
CREATE TABLE IF NOT EXISTS tallies (
    dataset TEXT NOT NULL, kind TEXT NOT NULL, units TEXT NOT NULL,
    PRIMARY KEY (dataset, kind));
CREATE TABLE IF NOT EXISTS ledger (kind TEXT PRIMARY KEY, built_at TEXT NOT NULL);
"""

EPSILON = "epsilon"
"""Ledger kind: the privacy budget a released job's signed manifest charged a dataset."""
BITS = "bits"
"""Ledger kind: the channel capacity of a started job, charged to each of its datasets."""
WORST = sys.float_info.max
"""What an unreadable or non-finite charge counts as (fail closed), and the cap of a tally."""

_SCALE = 1 << 1074  # every finite double is a whole number of 2**-1074
_WORST_UNITS = WORST.as_integer_ratio()[0] * (_SCALE // WORST.as_integer_ratio()[1])

ReleaseCharges = Callable[[Any], Mapping[str, float]]
"""The ε a released job charged each of its datasets, read from its signed release."""


def build_bits(c: sqlite3.Connection, now: str) -> None:
    """A store from before the ledger: charge every job's channel bits, once."""
    if _built(c, BITS):
        return
    rows = c.execute("SELECT id, datasets, owner_record FROM jobs").fetchall()
    charged = []
    for job_id, datasets, owner_record in rows:
        bits = float(json.loads(owner_record).get("channel_bits", 0.0))
        charged.append((job_id, _bits_charges(json.loads(datasets), bits)))
    _rebuild(c, BITS, charged, now)


def build_epsilon(
    c: sqlite3.Connection, released: Iterable[LedgerJob], charges: ReleaseCharges, now: str
) -> None:
    """A store from before the ledger: charge the ε of every job already released, once."""
    if not _built(c, EPSILON):
        _rebuild(c, EPSILON, [(j.id, charges(j)) for j in released], now)


def spent(c: sqlite3.Connection, kind: str, names: Iterable[str]) -> dict[str, float]:
    """Per dataset of ``names``, the sum of its ``kind`` charges (the exact sum rounded once to
    the nearest float, at most :data:`WORST`): one indexed lookup per dataset."""
    out = dict.fromkeys(names, 0.0)
    rows = c.execute(
        "SELECT dataset, units FROM tallies WHERE kind = ? "
        "AND dataset IN (SELECT value FROM json_each(?))",
        (kind, json.dumps(list(out))),
    ).fetchall()
    for name, units in rows:
        out[name] = _float(int(units))
    return out


def charges(c: sqlite3.Connection, job_id: str) -> dict[tuple[str, str], float]:
    """What ``job_id`` has charged: (dataset, kind) -> amount."""
    rows = c.execute(
        "SELECT dataset, kind, amount FROM charges WHERE job_id = ?", (job_id,)
    ).fetchall()
    return {(d, k): float(a) for d, k, a in rows}


def charge(
    c: sqlite3.Connection,
    before: LedgerJob | None,
    after: LedgerJob,
    release_charges: ReleaseCharges | None,
) -> None:
    """Within the transaction that wrote ``after``: charge what the change incurred."""
    if before is None or before.channel_bits != after.channel_bits:
        if before is not None:
            _uncharge(c, after.id, BITS)
        names = [[d.name] for d in after.datasets]
        _add(c, after.id, BITS, _bits_charges(names, after.channel_bits))
    if after.state is JobState.RELEASED and (before is None or before.state != after.state):
        if release_charges is None:
            raise InvalidState(
                f"job {after.id}: no ledger to charge its release to (keep_ledger first)"
            )
        _add(c, after.id, EPSILON, release_charges(after))


# -- the arithmetic -----------------------------------------------------------------------------


def _units(amount: float) -> int:
    """``amount`` (finite, >= 0) as a whole number of 2**-1074: sums of these are exact, so a
    tally does not depend on the order of its charges, and taking one back leaves no residue."""
    num, den = amount.as_integer_ratio()
    return num * (_SCALE // den)


def _float(units: int) -> float:
    """A tally as a float: the exact sum rounded once, capped at :data:`WORST`."""
    return WORST if units >= _WORST_UNITS else units / _SCALE


def _amount(value: float) -> float:
    """A charge as recorded: a finite number >= 0; anything else counts as :data:`WORST`."""
    ok = math.isfinite(value) and value >= 0
    return min(float(value), WORST) if ok else WORST


def _bits_charges(datasets: Iterable[list[Any]], bits: float) -> dict[str, float]:
    """A job's channel bits, charged once per dataset it names (nothing when it has none);
    bits that are not a finite number count as :data:`WORST` (fail closed)."""
    if math.isfinite(bits) and bits <= 0:
        return {}
    charged: dict[str, float] = {}
    for entry in datasets:
        charged[entry[0]] = charged.get(entry[0], 0.0) + _amount(bits)
    return charged


def _add(c: sqlite3.Connection, job_id: str, kind: str, charged: Mapping[str, float]) -> None:
    for dataset, value in charged.items():
        amount = _amount(value)
        c.execute("INSERT INTO charges VALUES (?, ?, ?, ?)", (job_id, dataset, kind, amount))
        _tally(c, dataset, kind, _units(amount))


def _uncharge(c: sqlite3.Connection, job_id: str, kind: str) -> None:
    rows = c.execute(
        "DELETE FROM charges WHERE job_id = ? AND kind = ? RETURNING dataset, amount",
        (job_id, kind),
    ).fetchall()
    for dataset, amount in rows:
        _tally(c, dataset, kind, -_units(float(amount)))


def _tally(c: sqlite3.Connection, dataset: str, kind: str, delta: int) -> None:
    row = c.execute(
        "SELECT units FROM tallies WHERE dataset = ? AND kind = ?", (dataset, kind)
    ).fetchone()
    units = (int(row[0]) if row else 0) + delta
    c.execute("INSERT OR REPLACE INTO tallies VALUES (?, ?, ?)", (dataset, kind, str(units)))


def _built(c: sqlite3.Connection, kind: str) -> bool:
    return c.execute("SELECT 1 FROM ledger WHERE kind = ?", (kind,)).fetchone() is not None


def _rebuild(
    c: sqlite3.Connection,
    kind: str,
    charged: Iterable[tuple[str, Mapping[str, float]]],
    now: str,
) -> None:
    """Charge ``kind`` afresh from ``charged`` (job id, its charges) and mark it built: the
    migration of a store from before the ledger, in the caller's transaction."""
    c.execute("DELETE FROM charges WHERE kind = ?", (kind,))
    c.execute("DELETE FROM tallies WHERE kind = ?", (kind,))
    for job_id, per_dataset in charged:
        _add(c, job_id, kind, per_dataset)
    c.execute("INSERT INTO ledger VALUES (?, ?)", (kind, now))
