"""Bench entry: decrypt-and-stage throughput against AES-GCM ``decrypt_into``, taken in turns.

Each pair is one raw AES-GCM pass over the staged byte count (one thread, one chunk buffer,
cache-hot: the limit the issue's table names) and then one fresh staging of the same bytes (a new
job, so a new tmpfs, as a real job gets). The figure is the median per-pair ratio with its spread
(:mod:`tests.bench._stats`). Beside it: the streaming AES-GCM figure (distinct buffers, as today),
the first staging of the run on its own (on whatever memory the machine had free), and what the
kernel did for the stagings (huge pages given and fallen back from, page faults, CPU time split
into user and system), so that a figure that falls short says why.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from enclave.vault._bench import StageBench
from enclave.vault._staging import WORKERS
from tests.bench._stats import interleave


def bench_staging(tmp: Path, *, quick: bool) -> dict[str, Any]:
    total = (32 if quick else 256) << 20
    runs = 3 if quick else 9
    with StageBench(total_bytes=total, files=4, work_dir=tmp) as bench:
        paired = interleave(bench.stage_mb_s, bench.aesgcm_mb_s, runs=runs)
        stream = statistics.median(bench.aesgcm_stream_mb_s() for _ in range(3))
        samples = bench.samples
        return paired.result(
            "staging: decrypt and stage vs AES-GCM decrypt_into",
            unit="MB/s",
            goal=0.8,
            digits=1,
            aesgcm_stream_mb_s=round(stream, 1),
            first_mb_s=round(samples[0].mb_s, 1),
            workers=WORKERS,
            total_bytes=bench.total_bytes,
            user_ms=round(statistics.median(s.user_ms for s in samples), 1),
            system_ms=round(statistics.median(s.system_ms for s in samples), 1),
            system_ms_values=[round(s.system_ms, 1) for s in samples],
            kernel={
                k: sum(s.counters.get(k, 0) for s in samples)
                for k in ("thp_file_alloc", "thp_file_fallback", "pgfault", "compact_stall")
            },
        )
