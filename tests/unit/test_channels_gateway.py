"""The gateway's side of the account: the dataset budget across jobs, and each role's view."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditLog
from enclave.contract import RunOrder, SiteReport
from gateway.core import Gateway
from gateway.store import Store
from policies.channels import TeamReason
from policies.lifecycle import JobState
from tests.unit.test_gateway_core import OLIVIA, THEO, ScriptedSite, _register, _wait, spec

DETAIL = "release refused: books: weights: tensor 'model.secret' has shape [51, 7]"
BITS = 300.0


class RefusingSite(ScriptedSite):
    """Each run starts (charging BITS) and is refused, with details for the owners."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.script = self._refuse

    def _refuse(self, order: RunOrder) -> list[SiteReport]:
        job = order.job_id
        return [
            SiteReport(job, state=JobState.RUNNING, reason=TeamReason.RUNNING, channel_bits=BITS),
            SiteReport(job, owner_progress=(7, 100, 3.14159)),
            SiteReport(job, progress=(10, 100, 3.1)),
            SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING),
            SiteReport(
                job, state=JobState.REJECTED, reason=TeamReason.REJECTED_WEIGHTS, detail=DETAIL
            ),
        ]


def _policy(budget: float) -> str:
    from tests.integration._deployment import policy

    text = policy("books", mode="automatic", memorization=False)
    return text.replace(
        "channels: {time_quantum_s: 1}",
        f"channels: {{time_quantum_s: 30, dataset_budget_bits: {budget}}}",
    )


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    home = tmp_path / "gw"
    home.mkdir()
    audit = AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate())
    g = Gateway(home=home, store=Store(home / "state.db"), audit=audit, site=RefusingSite(tmp_path))
    _register(g, tmp_path, mode="automatic")
    g.put_policy(principal=OLIVIA, dataset="books", text=_policy(budget=2 * BITS + 310))
    g.start()
    yield g
    g.stop()
    g.audit.close()


def _submit(g: Gateway) -> str:
    job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    return job.id


def test_the_dataset_budget_counts_every_job_that_ran(gw: Gateway) -> None:
    """Two jobs that ran spent 600 bits of 910; the next one's account (~290 bits) still fits,
    the one after does not, and it is denied before anything runs, naming the budget."""
    for _ in range(3):
        job_id = _submit(gw)
        assert _wait(gw, job_id) is JobState.REJECTED
        assert gw.store.job(job_id).channel_bits == BITS
    denied = gw.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    assert denied.state is JobState.DENIED
    assert any("channel budget" in r for r in denied.reasons), denied.reasons
    assert len(gw.site.orders) == 3  # type: ignore[attr-defined]


def test_the_team_sees_the_vocabulary_and_the_grid_the_owner_sees_the_details(
    gw: Gateway,
) -> None:
    job_id = _submit(gw)
    assert _wait(gw, job_id) is JobState.REJECTED
    team = gw.job(principal=THEO, job_id=job_id)
    owner = gw.job(principal=OLIVIA, job_id=job_id)
    assert team.reasons == (TeamReason.REJECTED_WEIGHTS,) and team.details == ()
    assert owner.details == (DETAIL,)
    for stamp in (team.created_at, team.updated_at):
        assert dt.datetime.fromisoformat(stamp).timestamp() % 30 == 0, stamp
    assert [j.details for j in gw.jobs(principal=THEO, state=None)] == [()]
    team_events = list(gw.watch(principal=THEO, job_id=job_id))
    owner_events = list(gw.watch(principal=OLIVIA, job_id=job_id))
    # Watching a finished job gives its end; the history as it happened is checked below.
    assert all(e.reason != DETAIL for e in team_events + owner_events)


def test_a_live_watch_shows_the_team_only_scheduled_points(gw: Gateway) -> None:
    gw.site.gate.clear()  # type: ignore[attr-defined]
    job_id = _submit(gw)
    seen_team: list[object] = []
    seen_owner: list[object] = []
    import threading

    def follow(principal: object, into: list[object]) -> None:
        into.extend(gw.watch(principal=principal, job_id=job_id, poll_s=0.05))  # type: ignore[arg-type]

    threads = [
        threading.Thread(target=follow, args=(THEO, seen_team)),
        threading.Thread(target=follow, args=(OLIVIA, seen_owner)),
    ]
    for t in threads:
        t.start()
    gw.site.gate.set()  # type: ignore[attr-defined]
    for t in threads:
        t.join(10)
    team_progress = [e.progress for e in seen_team if e.progress is not None]  # type: ignore[attr-defined]
    owner_progress = [e.progress for e in seen_owner if e.progress is not None]  # type: ignore[attr-defined]
    assert team_progress == [(10, 100, 3.1)]
    assert (7, 100, 3.14159) in owner_progress
    assert seen_team[-1].state is JobState.REJECTED  # type: ignore[attr-defined]
