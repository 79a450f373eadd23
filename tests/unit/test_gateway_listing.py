"""ListJobs for a model team reads its own jobs by index (issue 15, item 3): exactly the jobs
it may see, the submitter's and its team's, in submission order, filtered by state, and no
other team's."""

from __future__ import annotations

from pathlib import Path

from gateway.core import Gateway
from gateway.store import JobRecord, PinnedDataset
from policies.identity import Principal, Role
from policies.lifecycle import JobState
from tests.unit.test_gateway_core import MALLORY, OLIVIA, THEO, ScriptedSite, _gateway

S = JobState
TEAMMATE = Principal("tina", Role.MODEL_TEAM, "model-team")
LONER = Principal("luke", Role.MODEL_TEAM, "")
CAROL = Principal("carol", Role.COMPLIANCE, "audit")


def _add(g: Gateway, job_id: str, who: Principal, state: JobState = S.SUBMITTED) -> None:
    g.store.add_job(
        JobRecord(
            id=job_id,
            name="t",
            state=S.SUBMITTED,
            submitter=who.name,
            team=who.team,
            spec="{}",
            spec_sha256="s",
            bundle_sha256="",
            datasets=(PinnedDataset("books", 1, "h"),),
            policy_versions={},
        )
    )
    if state is not S.SUBMITTED:
        g.store.transition(job_id, state)


def test_a_model_team_lists_exactly_what_it_may_see(tmp_path: Path) -> None:
    g = _gateway(tmp_path, ScriptedSite(tmp_path))
    try:
        _add(g, "a", THEO)
        _add(g, "b", MALLORY)
        _add(g, "c", TEAMMATE, S.DENIED)
        _add(g, "d", LONER)
        _add(g, "e", Principal("other", Role.MODEL_TEAM, ""))  # empty team: not luke's team
        every = g.store.jobs()
        for who in (THEO, TEAMMATE, MALLORY, LONER):
            for state in (None, S.SUBMITTED, S.DENIED):
                listed = [j.id for j in g.jobs(principal=who, state=state)]
                expected = [
                    j.id
                    for j in every
                    if g._evaluator.may_see(who, j) and (state is None or j.state is state)
                ]
                assert listed == expected, (who, state)
        assert [j.id for j in g.jobs(principal=THEO, state=None)] == ["a", "c"]
        assert [j.id for j in g.jobs(principal=LONER, state=None)] == ["d"]
        assert len(g.jobs(principal=CAROL, state=None)) == 5
        assert [j.id for j in g.jobs(principal=OLIVIA, state=None)] == []  # owns no dataset yet
    finally:
        g.audit.close()
