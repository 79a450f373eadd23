"""``make bench``: what the enclave costs, each figure beside its limit measured in the same run.

Every entry returns one or more results ``{"name", "value", "unit", "limit", "ratio", "goal",
"higher_is_better", ...}``: ``limit`` is the best the machine does without Sealroom in the way
(raw AES-GCM, bare ``docker run``, raw TLS, a bare gRPC echo, SHA-256, the same training script
on the host), measured here and now, so the ratio means the same on any machine. Each entry
takes its figure and its limit in turns and reports the median of the per-pair ratios and their
spread (:mod:`tests.bench._stats`), so that one busy minute cannot decide a figure; "met" is
judged on the median. The table goes to the terminal and everything to a JSON file. ``--quick``
runs every entry in a reduced form (CI runs it so that the benchmarks cannot rot); an entry that
fails is reported and makes the run exit non-zero — a missing figure is never shown as a pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Entry:
    module: str
    function: str
    """Called as ``fn(tmp: Path, *, quick: bool) -> dict | list[dict]``."""


ENTRIES = (
    Entry("tests.bench.training", "bench_training"),
    Entry("tests.bench.staging", "bench_staging"),
    Entry("tests.bench.audit", "bench_append"),
    Entry("tests.bench.audit", "bench_verify"),
    Entry("tests.bench.gate", "bench_gate"),
    Entry("tests.bench.gateway", "bench_rpc"),
    Entry("tests.bench.gateway", "bench_transfers"),
    Entry("tests.bench.gateway", "bench_launch"),
    Entry("tests.bench.sitelink", "bench_site_link"),
    Entry("tests.bench.first_step", "bench_first_step"),
    Entry("tests.bench.federated", "bench_federated_round"),
)


def _met(r: dict[str, Any]) -> bool | None:
    """Judged on the median of the per-pair figures (see :mod:`tests.bench._stats`)."""
    if r.get("max_overhead") is not None:  # e.g. launch: at most bare + 0.3 s
        overhead = r.get("overhead", r["value"] - r["limit"])
        return bool(overhead <= r["max_overhead"])
    goal, ratio = r.get("goal"), r.get("ratio")
    if goal is None or ratio is None:
        return None
    return bool(ratio >= goal) if r.get("higher_is_better", True) else bool(ratio <= goal)


def run(entries: tuple[Entry, ...], *, quick: bool, only: set[str]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for e in entries:
        if only and e.function not in only:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"sealroom-bench-{e.function}-"))
        t0 = time.monotonic()
        try:
            fn: Callable[..., Any] = getattr(importlib.import_module(e.module), e.function)
            out = fn(tmp, quick=quick)
            for r in out if isinstance(out, list) else [out]:
                r.setdefault("entry", e.function)
                r["met"] = _met(r)
                results.append(r)
        except Exception as ex:  # reported, and the run fails: never a silent gap
            failures.append(
                {
                    "entry": e.function,
                    "error": f"{type(ex).__name__}: {ex}",
                    "traceback": traceback.format_exc(),
                }
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"  {e.function}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": _cpus(),
        },
        "quick": quick,
        "results": results,
        "failures": failures,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def show(report: dict[str, Any], console: Console) -> None:
    t = Table(
        "figure", "value", "limit (same run)", "unit", "ratio", "spread", "runs", "goal", "met"
    )
    for r in report["results"]:
        goal = r.get("goal")
        goal_s = (
            "" if goal is None else ("≥ " if r.get("higher_is_better", True) else "≤ ") + _fmt(goal)
        )
        spread = r.get("ratio_spread")
        if r.get("max_overhead") is not None:
            goal_s = f"≤ limit + {_fmt(r['max_overhead'])}"
            spread = r.get("overhead_spread", spread)
        spread_s = "" if spread is None else f"{_fmt(spread[0])} to {_fmt(spread[1])}"
        ratio = r.get("overhead") if r.get("max_overhead") is not None else r.get("ratio")
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r["met"]]
        t.add_row(
            r["name"],
            _fmt(r["value"]),
            _fmt(r.get("limit")),
            r.get("unit", ""),
            ("+" if r.get("max_overhead") is not None else "") + _fmt(ratio),
            spread_s,
            _fmt(r.get("runs")),
            goal_s,
            met,
        )
    console.print(t)
    for f in report["failures"]:
        console.print(f"[red]{f['entry']} failed[/]: {f['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="reduced sizes (what CI runs)")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    p.add_argument("--only", action="append", default=[], help="run only this entry")
    args = p.parse_args(argv)
    report = run(ENTRIES, quick=args.quick, only=set(args.only))
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    show(report, Console())
    print(f"written to {args.out}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
