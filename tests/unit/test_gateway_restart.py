"""Start-up's recovery marks only runs a previous gateway left mid-way: a job queued before
start() (approved while the gateway was built) is not taken for one, however fast a worker is
(the workers start after the recovery scan)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.store import JobRecord, Store
from policies.lifecycle import JobState
from tests.unit.test_gateway_core import OLIVIA, THEO, ScriptedSite, _gateway, _register, _wait
from tests.unit.test_gateway_core import spec as job_spec


def test_a_job_queued_before_start_is_not_ended_as_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = ScriptedSite(tmp_path)
    g = _gateway(tmp_path, site)
    _register(g, tmp_path)
    job = g.submit(principal=THEO, spec_text=job_spec(), bundle=None, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="ok")
    assert g.store.job(job.id).state is JobState.QUEUED
    scan = Store.jobs

    def slow_scan(store: Store, *, state: JobState | None = None) -> list[JobRecord]:
        # The recovery scan looks for RUNNING jobs: let a worker (if one was started) get there.
        deadline = time.monotonic() + 2.0
        while state is JobState.RUNNING and time.monotonic() < deadline:
            if store.job(job.id).state is not JobState.QUEUED:
                break
            time.sleep(0.01)
        return scan(store, state=state)

    monkeypatch.setattr(Store, "jobs", slow_scan)
    g.start()
    try:
        assert _wait(g, job.id) is JobState.RELEASED, g.store.job(job.id).details
    finally:
        g.stop()
        g.audit.close()
