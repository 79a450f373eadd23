"""The many-sites form of the load run in a bounded form, so that it cannot rot: every check it
makes must hold and every figure it reports must be there.

``python -m tests.bench.load_sites`` runs 20 site processes and 2,000 jobs through one gateway;
here 3 sites and 30 jobs (each site its own process, dialling in over the real site link).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.load_sites import run_sites

pytestmark = pytest.mark.slow


def test_the_bounded_sites_form_holds_every_check_and_reports_every_figure(
    tmp_path: Path,
) -> None:
    report = run_sites(tmp_path, sites=3, jobs=30, clients=3)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    names = " | ".join(c["name"] for c in report["checks"])
    for words in (
        "connected",
        "no job lost",
        "run twice",
        "audited",
        "site's own log",
        "checkpointed",
        "memory flat",
    ):
        assert words in names, words
    figures = report["phases"]["3 sites"]
    assert figures["jobs"] == 30 and figures["runs_per_site_min"] == 10
    for key in ("jobs_per_s", "latency_p50_s", "latency_p95_s", "latency_p99_s", "rss_end_mb"):
        assert key in figures, key
