"""The benchmarks in their reduced form, so that they cannot rot: every entry gives figures, each
the median of interleaved runs with its spread."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_every_bench_entry_reports_a_value_its_limit_and_the_ratio(
    tmp_path: Path, runtime_image: str
) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text())
    assert report["failures"] == [], proc.stderr[-4000:]
    assert proc.returncode == 0
    from tests.bench.__main__ import ENTRIES

    assert {r["entry"] for r in report["results"]} == {e.function for e in ENTRIES}
    for r in report["results"]:
        for key in ("value", "limit", "ratio"):
            assert isinstance(r[key], int | float), (r["name"], key, r[key])
        assert r["limit"] > 0, (r["name"], r["limit"])
        # A rate is never zero; a cost (memory growth) may be.
        positive = r.get("higher_is_better", True)
        assert (r["value"] > 0 and r["ratio"] > 0) if positive else r["value"] >= 0, r
        # Interleaved runs, never one: each figure carries how many and their spread.
        assert isinstance(r.get("runs"), int) and r["runs"] >= 2, (r["name"], r.get("runs"))
        low, high = r["ratio_spread"]
        assert 0 <= low <= r["ratio"] <= high, (r["name"], r["ratio_spread"], r["ratio"])
        assert isinstance(r["met"], bool), (r["name"], r["met"])
