"""The 10,000-job form of the load run in a bounded form, so that it cannot rot: every check it
makes must hold and every figure it reports must be there. (Its goal, a ratio of times, is the
load run's to judge, never a test's.)

``python -m tests.bench.load --form 10k`` runs 50 clients and 10,000 fast-site jobs against one
gateway, 1,000 against another, then 10 rounds of 40 probe submissions against each in turn; here
4 clients, 60 and 20 jobs, 2 rounds of 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.load import run_scale

pytestmark = pytest.mark.slow


def test_the_bounded_10k_form_holds_every_check_and_reports_every_figure(tmp_path: Path) -> None:
    report = run_scale(tmp_path, clients=4, jobs=60, small=20, rounds=2, per_round=3)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert any("memory flat" in n for n in names)
    assert any("run twice" in n for n in names) and any("audited" in n for n in names)
    # Both gateways are checked, the probes' jobs with the load's (60 + 1 + 2 * 3 = 67).
    assert {c["phase"] for c in report["checks"]} == {"fast-60", "fast-20"}
    assert any(c["detail"].startswith("67/67") for c in report["checks"])
    figures = report["phases"]["fast-60"]
    for key in (
        "jobs_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "rss_end_mb",
        "rss_growth_mb",
        "store_mb",
        "state_db_mb",
        "audit_db_mb",
    ):
        assert key in figures, key
    assert figures["jobs"] == 60 and figures["store_mb"] > 0
    cost = report["submission_cost"]
    assert cost["runs"] == 2 and len(cost["values"]) == len(cost["limits"]) == 2
    assert cost["goal"] == 1.2 and cost["higher_is_better"] is False
    assert cost["jobs_in_store"] == {"small": 27, "large": 67}
    assert isinstance(cost["met"], bool) and report["goals_met"] is cost["met"]
