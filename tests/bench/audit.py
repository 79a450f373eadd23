"""Bench entries for the audit log: durable append rate, and verify rate against SHA-256."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import AuditEvent, AuditLog, verify_export

GOAL_APPENDS = 20_000


def _event(i: int) -> AuditEvent:
    return AuditEvent(principal="theo", role="model-team", action="rpc.GetJob",
                      outcome="allowed", job_id=f"job-{i % 97:04d}",
                      details={"i": i, "reason": "bench"})


def bench_append(tmp: Path, *, quick: bool) -> dict[str, Any]:
    """Durable appends per second from 64 threads (each ``append`` waits for its fsync)."""
    log = AuditLog(tmp / "a.db", signing_key=ed25519.Ed25519PrivateKey.generate(),
                   checkpoint_interval_s=0)
    per_thread, threads = (100 if quick else 600), 64
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for i in range(per_thread):
            log.append(_event(i))

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    rate = per_thread * threads / (time.perf_counter() - t0)
    log.close()
    return {"name": "audit: durable appends (64 threads, fsync before ack)",
            "value": round(rate), "limit": GOAL_APPENDS, "unit": "events/s",
            "ratio": round(rate / GOAL_APPENDS, 3), "goal": 1.0,
            "note": "limit = the issue's target of 20k durable events/s"}


def bench_verify(tmp: Path, *, quick: bool) -> dict[str, Any]:
    """Offline verification of an export (leaf hashes, chain, checkpoints) in leaves/s, against
    SHA-256 over the same leaves in the same run (two hashes a leaf: leaf and chain)."""
    n = 20_000 if quick else 200_000
    key = ed25519.Ed25519PrivateKey.generate()
    log = AuditLog(tmp / "a.db", signing_key=key, checkpoint_interval_s=0)
    batch = 1000

    def fill(lo: int) -> None:
        for i in range(lo, n, 16):
            log.append(_event(i))

    ts = [threading.Thread(target=fill, args=(k,)) for k in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.export(tmp / "x.jsonl")
    leaves = [r.event for r in log.query(limit=batch)]
    log.close()
    t0 = time.perf_counter()
    verify_export(tmp / "x.jsonl", public_key=key.public_key())
    verify_s = time.perf_counter() - t0
    # The limit: hashing what verification must hash, with nothing else — each leaf's bytes
    # once (leaf hash), a 64-byte chain node, and about one 64-byte tree node a leaf.
    sample = (tmp / "x.jsonl").read_bytes().splitlines()[:batch]
    data = [os.urandom(64) for _ in range(batch)]
    t0 = time.perf_counter()
    for _ in range(n // batch):
        for leaf, node in zip(sample, data, strict=False):
            hashlib.sha256(b"\x00" + leaf).digest()
            hashlib.sha256(b"\x01" + node).digest()
            hashlib.sha256(b"\x01" + node).digest()
    hash_s = time.perf_counter() - t0
    del leaves
    return {"name": "audit: offline verify of an export vs SHA-256 of the same bytes",
            "value": round(n / verify_s), "limit": round(n / hash_s), "unit": "leaves/s",
            "ratio": round(hash_s / verify_s, 3), "goal": 0.5, "leaves": n}
