"""The benchmarks in their reduced form, so that they cannot rot: every entry gives figures."""

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
            assert isinstance(r[key], int | float) and r[key] > 0, (r["name"], key, r[key])
