"""ListJobs answers with every job's approvals from one store query, not one per job."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import _servicer
from gateway._servicer import GatewayServicer
from tests.unit.test_gateway_core import OLIVIA, THEO, ScriptedSite, _gateway, _register, spec


@pytest.fixture
def site(tmp_path: Path) -> ScriptedSite:
    return ScriptedSite(tmp_path)


def test_the_approvals_of_many_jobs_come_from_one_query(
    tmp_path: Path, site: ScriptedSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealroom.v1 import gateway_pb2 as pb

    g = _gateway(tmp_path, site)
    _register(g, tmp_path)
    jobs = [
        g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="").id
        for _ in range(3)
    ]
    g.decide(principal=OLIVIA, job_id=jobs[0], approve=True, reason="")
    g.decide(principal=OLIVIA, job_id=jobs[2], approve=False, reason="no")
    statements: list[str] = []
    g.store._conn.set_trace_callback(statements.append)
    try:
        batch = g.approvals_of([*jobs, "job-none"])
        assert len([s for s in statements if "FROM approvals" in s]) == 1
        statements.clear()
        monkeypatch.setattr(_servicer, "principal_of", lambda context: OLIVIA)
        listed = GatewayServicer(g).ListJobs(pb.ListJobsRequest(), None)  # type: ignore[arg-type]
        assert len([s for s in statements if "FROM approvals" in s]) == 1
    finally:
        g.store._conn.set_trace_callback(None)
    assert batch == {j: g.approvals(j) for j in jobs} | {"job-none": []}
    assert [(a.owner, a.decision) for a in batch[jobs[0]]] == [("olivia", "approve")]
    assert [(a.owner, a.decision) for a in batch[jobs[2]]] == [("olivia", "deny")]
    shown = {j.id: [(a.owner, a.decision) for a in j.approvals] for j in listed.jobs}
    assert shown == {j: [(a.owner, a.decision) for a in batch[j]] for j in jobs}
    g.audit.close()
