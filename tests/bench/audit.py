"""Bench entries for the audit log: durable append rate, and verify rate against SHA-256.

``bench_append``: events per second from 64 threads, each ``append`` returning only once its
event is committed and fsynced (group commit). The goal is the issue's absolute 20k events/s;
beside it, the storage's own limit measured here: the same rows inserted into SQLite (WAL,
``synchronous=FULL``) by one thread in batches of 64 with nothing else in the way.

``bench_verify``: an export's offline verification in leaves per second, against the hashing it
cannot avoid measured in the same run with hashlib over the same bytes: per record, SHA-256 of
``0x00 || leaf``, of one chain link (65 bytes) and of about one tree node (65 bytes).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import AuditEvent, AuditLog, verify_export

GOAL_APPENDS = 20_000
THREADS = 64
ROUNDS = 3


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        principal="theo",
        role="model-team",
        action="rpc.GetJob",
        outcome="allowed",
        job_id=f"job-{i % 97:04d}",
        details={"i": i, "reason": "bench"},
    )


def _fill(log: AuditLog, n: int, threads: int) -> float:
    """Append ``n`` events from ``threads`` threads; returns the seconds it took."""
    per = n // threads
    start = threading.Barrier(threads + 1)

    def work(k: int) -> None:
        start.wait()
        for i in range(k * per, (k + 1) * per):
            log.append(_event(i))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def _storage_limit(tmp: Path, source: Path, rows: list[tuple[Any, ...]]) -> float:
    db = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    src = sqlite3.connect(source)
    for (sql,) in src.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'checkpoints%'"
    ):
        db.execute(sql)
    src.close()
    sql = "INSERT INTO records VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * THREADS)
    t0 = time.perf_counter()
    for i in range(0, len(rows) - THREADS + 1, THREADS):
        db.execute(sql, [v for r in rows[i : i + THREADS] for v in r])
    rate = (len(rows) // THREADS * THREADS) / (time.perf_counter() - t0)
    db.close()
    return rate


def bench_append(tmp: Path, *, quick: bool = False) -> dict[str, Any]:
    """Durable appends per second from 64 threads (each ``append`` waits for its fsync): the
    best of three runs, each on a fresh log (noise on a shared machine only slows a run)."""
    n = THREADS * (100 if quick else 600)
    rates = []
    for run in range(ROUNDS):
        log = AuditLog(
            tmp / f"a{run}.db",
            signing_key=ed25519.Ed25519PrivateKey.generate(),
            checkpoint_interval_s=0,
        )
        rates.append(n / _fill(log, n, THREADS))
        log.close()
    rate = max(rates)
    rows = sqlite3.connect(tmp / "a0.db").execute("SELECT * FROM records ORDER BY seq").fetchall()
    storage = _storage_limit(tmp, tmp / "a0.db", rows)
    return {
        "name": f"audit: durable appends ({THREADS} threads, fsync before ack)",
        "value": round(rate),
        "limit": GOAL_APPENDS,
        "unit": "events/s",
        "ratio": round(rate / GOAL_APPENDS, 3),
        "goal": 1.0,
        "events": n,
        "runs": [round(r) for r in rates],
        "storage_limit": round(storage),
        "note": f"best of {ROUNDS} runs; limit = the issue's target of 20k durable events/s; "
        "storage_limit = the same rows inserted by one thread into bare SQLite (WAL, fsync) "
        f"in batches of {THREADS}, measured in this run",
    }


def bench_verify(tmp: Path, *, quick: bool = False) -> dict[str, Any]:
    """Offline verification of an export in leaves/s, against SHA-256 of the same bytes."""
    n = 20_000 if quick else 200_000
    key = ed25519.Ed25519PrivateKey.generate()
    log = AuditLog(tmp / "a.db", signing_key=key, checkpoint_interval_s=0)
    _fill(log, n, 16)
    log.export(tmp / "x.jsonl")
    log.close()
    leaves = [
        json.dumps(json.loads(line)["leaf"], sort_keys=True, separators=(",", ":")).encode()
        for line in (tmp / "x.jsonl").read_bytes().splitlines()[:n]
    ]
    node = bytes(64)
    sha256 = hashlib.sha256
    verify_s = hash_s = float("inf")
    for _ in range(ROUNDS):  # each side's best of three, taken in turns
        t0 = time.perf_counter()
        result = verify_export(tmp / "x.jsonl", public_key=key.public_key())
        verify_s = min(verify_s, time.perf_counter() - t0)
        assert result.size == n
        t0 = time.perf_counter()
        for leaf in leaves:
            sha256(b"\x00" + leaf).digest()
            sha256(b"\x01" + node).digest()
            sha256(b"\x01" + node).digest()
        hash_s = min(hash_s, time.perf_counter() - t0)
    return {
        "name": "audit: offline verify of an export vs SHA-256 of the same bytes",
        "value": round(n / verify_s),
        "limit": round(n / hash_s),
        "unit": "leaves/s",
        "ratio": round(hash_s / verify_s, 3),
        "goal": 0.5,
        "leaves": n,
        "note": f"best of {ROUNDS} each, taken in turns; limit = hashlib over what verifying "
        "must hash: each leaf, one chain link and one tree node per record",
    }
