"""The event hub keeps the histories of the last jobs to end, not of every job the gateway ever
ran (issue 15, item 3: the gateway's memory at 10,000 jobs), and a watcher whose job's history
was dropped is told the job's stored end, as after a restart."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from gateway._events import EventHub
from gateway._views import JobEvent
from gateway.store import JobRecord, PinnedDataset, Store
from policies.identity import Principal, Role
from policies.lifecycle import JobState

S = JobState
CAROL = Principal("carol", Role.COMPLIANCE, "audit")


def _run(hub: EventHub, job_id: str) -> None:
    for state in (S.QUEUED, S.RUNNING, S.CHECKING, S.RELEASED):
        hub.publish(JobEvent(job_id, state, time="2026-01-01T00:00:00.000+00:00"))


def test_only_the_last_ended_jobs_histories_are_kept() -> None:
    hub = EventHub(keep_ended=3)
    hub.publish(JobEvent("live", S.RUNNING))
    for i in range(10):
        _run(hub, f"j{i}")
    assert [j for j in (f"j{i}" for i in range(10)) if hub.holds(j)] == ["j7", "j8", "j9"]
    assert hub.holds("live")  # a job that has not ended keeps its history, however old
    assert len(hub._events) == len(hub._next) == 4
    assert [e.state for _, e in hub.follow("j9")][-1] is S.RELEASED


def test_a_watcher_behind_a_dropped_history_is_told_the_stored_end(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    job = JobRecord(
        id="j",
        name="t",
        state=S.SUBMITTED,
        submitter="theo",
        team="model-team",
        spec="{}",
        spec_sha256="s",
        bundle_sha256="",
        datasets=(PinnedDataset("books", 1, "h"),),
        policy_versions={"books": 1},
    )
    store.add_job(job)
    for state in (S.PENDING_APPROVAL, S.DENIED):
        store.transition("j", state)
    hub = EventHub(keep_ended=1)
    hub.publish(JobEvent("j", S.PENDING_APPROVAL))
    seen: list[JobEvent] = []
    started = threading.Event()

    def watch() -> None:
        for event in hub.watch(
            CAROL, replace(job, state=S.PENDING_APPROVAL), store=store, quantum_s=1.0, poll_s=0.05
        ):
            seen.append(event)
            started.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert started.wait(5)
    hub.publish(JobEvent("other", S.RUNNING))
    # The job ends and another ends after it before the watcher reads on: "j" is dropped.
    with hub._cond:
        hub.publish(JobEvent("j", S.DENIED))
        hub.publish(JobEvent("other", S.CANCELLED))
    t.join(5)
    assert not t.is_alive()
    assert not hub.holds("j")
    assert seen[0].state is S.PENDING_APPROVAL
    assert seen[-1].state is S.DENIED  # told from the store: its history was dropped
    store.close()
