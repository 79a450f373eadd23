"""Bench entry: decrypt-and-stage throughput against AES-GCM measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enclave.vault._bench import measure_stage_throughput


def bench_staging(tmp: Path, *, quick: bool) -> dict[str, Any]:
    r = measure_stage_throughput(
        total_bytes=(32 if quick else 256) << 20, files=4, repeat=2 if quick else 3, work_dir=tmp
    )
    return {
        "name": "staging: decrypt and stage vs AES-GCM decrypt_into",
        "value": round(r.stage_mb_s, 1),
        "limit": round(r.aesgcm_mb_s, 1),
        "unit": "MB/s",
        "ratio": round(r.ratio, 3),
        "goal": 0.8,
        "aesgcm_stream_mb_s": round(r.aesgcm_stream_mb_s, 1),
        "workers": r.workers,
        "total_bytes": r.total_bytes,
    }
