"""Bench entry for a federated round: what a round costs beyond its slowest site's training.

``bench_federated_round``: a gateway (``sealroom up``) and three site processes (``sealroom site
join``) on this machine, each with its own home and dataset, run a federated LoRA job of R rounds
over the real Docker engine. For each round after the first (round 0 also builds the start),
its time at the gateway (from one ``federated.round`` record to the next) is set against the
limit: the slowest site's local training for that round (its container's start to stop, from
each site's own audit log) plus moving the round's bytes (each site's start down, its masked
update up) at the raw TLS rate measured in the same run. Goal: ratio ≤ 1.2.

What the gap holds: each site's staging of its data, the gate on its update, the five steps of
secure aggregation over the link, and the mean applied. Sites share the machine's cores, so their
training runs side by side.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import ssl
import statistics
from pathlib import Path
from typing import Any

from enclave.federated import update_layout, update_length
from tests.bench._proc import Served
from tests.bench.gateway import MB, _tls_context, _tls_put
from tests.integration._federated_procs import SITES, Federation


def _records(db: Path, action: str) -> list[tuple[float, dict[str, Any]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute(
            "SELECT time, leaf FROM records WHERE action = ? ORDER BY seq", (action,)
        ).fetchall()
    return [(_when(t), json.loads(bytes(leaf))) for t, leaf in rows]


def _when(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _raw_tls_mb_s(fed: Federation, tmp: Path, size: int) -> float:
    source = tmp / "payload.bin"
    with source.open("wb") as f:
        f.write(b"\x5a" * size)
    data = tmp / "sink"
    data.mkdir()
    sink = Served("tls", fed.gw_home, "--dir", str(data), "--source", str(source),
                  log=tmp / "tls.log")  # fmt: skip
    try:
        ctx: ssl.SSLContext = _tls_context(fed.people["theo"])
        took = min(_tls_put(sink.port, ctx, source, size) for _ in range(3))
    finally:
        sink.stop()
    return size / MB / took


def bench_federated_round(tmp: Path, *, quick: bool) -> dict[str, Any]:
    rounds, local_steps = (3, 6) if quick else (5, 30)
    fed = Federation(tmp / "fed")
    try:
        fed.start_gateway()
        fed.start_sites()
        job_id = fed.submit(rounds=rounds, local_steps=local_steps)
        ended = fed.wait_state(job_id, timeout=1800)
        if getattr(ended, "state", None) != "RELEASED":
            raise RuntimeError(f"the federated job ended {getattr(ended, 'state', '?')}")
        tls_mb_s = _raw_tls_mb_s(fed, tmp, 64 * MB)
    finally:
        fed.close()
    gw_audit = fed.gw_home / "gateway" / "audit.db"
    marks = [t for t, leaf in _records(gw_audit, "federated.round") if leaf["job_id"] == job_id]
    local: dict[int, float] = {}
    for site in SITES:
        db = fed.homes[site] / "audit" / "audit.db"
        starts = {
            leaf["details"]["run"]: t
            for t, leaf in _records(db, "container.start")
            if leaf["job_id"] == job_id
        }
        for t, leaf in _records(db, "container.stop"):
            run = leaf["details"].get("run", "")
            if leaf["job_id"] == job_id and run in starts:
                r = int(run.rsplit("-", 1)[1])
                local[r] = max(local.get(r, 0.0), t - starts[run])
    start = fed.gw_home / "gateway" / "federated" / job_id / "round-0.safetensors"
    numbers = update_length(update_layout(start))
    per_round_bytes = len(SITES) * (start.stat().st_size + 8 * (numbers + 2))
    wire_s = per_round_bytes / MB / tls_mb_s
    ratios = [
        (marks[r] - marks[r - 1]) / (local[r] + wire_s) for r in range(1, rounds) if r in local
    ]
    if not ratios:
        raise RuntimeError("no round's local training was found in the sites' logs")
    ratio = statistics.median(ratios)
    round_s = statistics.median(marks[r] - marks[r - 1] for r in range(1, rounds))
    return {
        "name": "federated round / (slowest site's training + wire)",
        "value": round(round_s, 3),
        "unit": "s per round",
        "limit": round(statistics.median(local[r] for r in range(1, rounds)) + wire_s, 3),
        "ratio": round(ratio, 3),
        "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "runs": len(ratios),
        "goal": 1.2,
        "higher_is_better": False,
        "rounds": rounds,
        "local_steps": local_steps,
        "sites": len(SITES),
        "update_numbers": numbers,
        "raw_tls_mb_s": round(tls_mb_s, 1),
        "per_round": [
            {
                "round": r,
                "round_s": round(marks[r] - marks[r - 1], 3),
                "local_s": round(local[r], 3),
            }
            for r in range(1, rounds)
            if r in local
        ],
    }
