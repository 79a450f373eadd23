"""The load run in a bounded form, so that it cannot rot: every check it makes must hold.

``python -m tests.bench.load`` runs 50 clients, 1,000 fast-site jobs and 50 container jobs; here
8 clients, 80 fast jobs, a back-pressure phase and 3 real container jobs make the same checks
(no job lost or run twice, every one audited, queue-full refusals clear and harmless, memory
flat, no container left).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bench.load import run_load

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_the_bounded_load_run_holds_every_check(
    tmp_path: Path, runtime_image: str, docker_client: Any
) -> None:
    report = run_load(tmp_path, clients=8, jobs=80, containers=3, backpressure_jobs=40)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    assert {"fast", "back-pressure", "containers"} <= set(report["phases"])
    assert report["phases"]["fast"]["jobs"] == 80
    assert report["phases"]["back-pressure"]["refusals"] > 0  # the queue limit was hit
