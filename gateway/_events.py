"""The gateway's job event hub: each job's state changes and progress, kept in memory, and the
stream a watcher reads from them (WatchJob). Events carry absolute positions, so a reader never
loses its place when old progress is dropped; what a watcher is shown of each event is decided by
:mod:`gateway._views` for its role. The history is not persisted: after a restart a watcher is
told the stored state of a job that has ended. Nor is it kept for ever: the histories of the last
``keep_ended`` jobs to end are kept (for watchers still reading them), older ones are dropped, so
that the hub's memory does not grow with the number of jobs the gateway has run; a watcher whose
job's history was dropped is told the job's stored state, as after a restart.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

from gateway._views import JobEvent, event_for, job_for
from gateway.store import JobRecord, Store
from policies.identity import Principal
from policies.lifecycle import TERMINAL


class EventHub:
    """Per-job event history with blocking readers, for WatchJob.

    Progress is capped apart from state changes (the owners' full progress comes once a second
    for as long as the job likes): state changes are never dropped, and how much progress a job
    writes decides nothing about what a watcher of its states sees.
    """

    def __init__(self, *, keep_progress: int = 1000, keep_ended: int = 1000) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, list[tuple[int, JobEvent]]] = {}
        self._next: dict[str, int] = {}
        self._keep = keep_progress
        self._keep_ended = keep_ended
        self._ended: OrderedDict[str, None] = OrderedDict()  # ended jobs, the oldest first

    def publish(self, event: JobEvent) -> None:
        with self._cond:
            events = self._events.setdefault(event.job_id, [])
            position = self._next.get(event.job_id, 0)
            self._next[event.job_id] = position + 1
            events.append((position, event))
            if event.progress is not None:
                progress = [i for i, (_, e) in enumerate(events) if e.progress is not None]
                if len(progress) > self._keep:
                    del events[progress[0]]
            if event.terminal:
                self._ended[event.job_id] = None
                while len(self._ended) > self._keep_ended:
                    old, _ = self._ended.popitem(last=False)
                    self._events.pop(old, None)
                    self._next.pop(old, None)
            self._cond.notify_all()

    def holds(self, job_id: str) -> bool:
        """Whether the hub holds the job's history (it has events, and they were not dropped)."""
        with self._cond:
            return job_id in self._next

    def follow(
        self, job_id: str, *, start: int = 0, timeout_s: float = 1.0
    ) -> list[tuple[int, JobEvent]]:
        """Events at positions ``start`` and after (waiting up to ``timeout_s`` for one)."""
        with self._cond:
            self._cond.wait_for(lambda: self._next.get(job_id, 0) > start, timeout=timeout_s)
            return [(p, e) for p, e in self._events.get(job_id, ()) if p >= start]

    def watch(
        self,
        principal: Principal,
        job: JobRecord,
        *,
        store: Store,
        quantum_s: float,
        poll_s: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> Iterator[JobEvent]:
        """Events of ``job`` (as ``principal`` may already see it) from its start until it
        ends, each as ``principal`` may see it. Blocks between events, and stops within
        ``poll_s`` once ``alive()`` is false (the watcher went away: its thread is not held
        until the job's next event)."""
        job_id = job.id
        if job.state in TERMINAL:
            yield JobEvent(job_id, job.state, reason="; ".join(job.reasons), time=job.updated_at)
            return
        seen = 0
        while alive():
            events = self.follow(job_id, start=seen, timeout_s=poll_s)
            for position, event in events:
                seen = position + 1
                shown = event_for(principal, event, quantum_s=quantum_s)
                if shown is not None:
                    yield shown
                if event.terminal:
                    return
            if seen == 0 or (not events and not self.holds(job_id)):
                # History lost (a restart) or dropped (the job ended long ago): report the
                # stored state once it has ended.
                current = store.job(job_id)
                if current.state in TERMINAL:
                    shown_job = job_for(principal, current, quantum_s=quantum_s)
                    yield JobEvent(job_id, current.state, time=shown_job.updated_at)
                    return
