"""The gateway's dispatcher: approved jobs wait in a bounded queue and worker threads hand them
to the site one at a time each, after checking that the approval still binds the job as it is
now; the site's reports come back here and become audit records, watch events and state changes
(a release is copied into the release store, or held for review). A new policy version sends the
jobs it touches that have not started back through the decision (re-evaluation). Every state
change goes through the façade, which persists it, audits it and tells the watchers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

from enclave.audit import AuditLog
from enclave.contract import RunOrder, Site, SiteReport
from gateway._bundles import BundleStore
from gateway._evaluate import Evaluator, binding
from gateway._events import EventHub
from gateway._facade import SYSTEM, Facade
from gateway._federation import Sites
from gateway._releases import ReleaseStore
from gateway._views import JobEvent
from gateway.store import Store, utcnow
from policies import access
from policies.channels import TeamReason
from policies.errors import (
    InvalidInput,
    InvalidState,
    NotFound,
    PolicyViolation,
    ResourceExhausted,
    SealroomError,
)
from policies.identity import Principal, Role
from policies.lifecycle import TERMINAL, JobState
from policies.spec import parse_spec


class Dispatcher:
    """The queue of approved jobs and the ``workers`` threads that run them at ``site``."""

    def __init__(
        self,
        facade: Facade,
        *,
        store: Store,
        audit: AuditLog,
        site: Site,
        events: EventHub,
        evaluator: Evaluator,
        bundles: BundleStore,
        releases: ReleaseStore,
        workers: int,
        max_queued: int,
    ) -> None:
        self._g = facade
        self.store = store
        self.audit = audit
        self.site = site
        self._events = events
        self._evaluator = evaluator
        self._bundles = bundles
        self._releases = releases
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queued)
        self._workers = [
            threading.Thread(target=self._work, name=f"dispatch-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = False
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._waiting: dict[str, None] = {}  # approved jobs that found the queue full, in order

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; re-queue approved jobs left by a previous run."""
        if self._started:
            return
        self._started = True
        # Runs left mid-way by a previous gateway end in ERROR before any worker starts: a
        # worker started first could take a job queued before start() and be seen RUNNING here.
        # A remote site's run goes on without the gateway: its lease is on record, and it is
        # taken up again (its reports carry on where they stopped).
        held = set(self.site.held()) if isinstance(self.site, Sites) else set()
        for job in self.store.jobs(state=JobState.RUNNING) + self.store.jobs(
            state=JobState.CHECKING
        ):
            if job.id in held:
                threading.Thread(
                    target=self._resume, args=(job.id,), name=f"resume-{job.id}", daemon=True
                ).start()
                continue
            self._g._transition(
                job.id,
                JobState.ERROR,
                reason=TeamReason.ERROR,
                details=("the gateway restarted mid-run",),
            )
        for t in self._workers:
            t.start()
        for job in self.store.jobs(state=JobState.QUEUED):
            self._queue.put(job.id)
        for job in self.store.jobs(state=JobState.APPROVED):
            self.enqueue(job.id)

    def stop(self) -> None:
        if not self._started:
            return
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout=5)
        self._started = False

    # -- the queue ---------------------------------------------------------------------------

    def admit(self) -> None:
        """Back-pressure: refuse a new submission while the site's queue is full."""
        if self._queue.full():
            raise ResourceExhausted(
                f"the site queue is full ({self._queue.maxsize} jobs waiting); submit again "
                "when some have run"
            )

    def enqueue(self, job_id: str) -> None:
        """Queue an approved job for the site. When the queue is full the job stays APPROVED
        (nothing is lost) and a worker queues it as soon as a slot frees up.

        QUEUED is persisted before the id is in the queue: a worker that took the id first
        would find the job still APPROVED, skip it as re-evaluated, and lose it. Only this
        method puts ids in the queue, under the lock, so a queue seen with room keeps it."""
        with self._lock:
            if self._queue.full():
                self._waiting[job_id] = None
                return
            self._g._transition(job_id, JobState.QUEUED, reason="waiting for the site")
            # Only stop()'s sentinels take room without the lock; a job they crowd out stays
            # QUEUED in the store, and start() queues every QUEUED job again.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(job_id)

    def at_site(self, job_id: str) -> bool:
        """Whether a worker has handed the job to the site and the run has not returned."""
        with self._lock:
            return job_id in self._inflight

    def _refill(self) -> None:
        """Queue approved jobs that found the queue full, oldest first, while there is room."""
        while True:
            with self._lock:
                if not self._waiting or self._queue.full():
                    return
                job_id = next(iter(self._waiting))
                del self._waiting[job_id]
            try:
                job = self.store.job(job_id)
            except NotFound:
                continue
            if job.state is JobState.APPROVED:
                self.enqueue(job_id)

    # -- re-evaluation -----------------------------------------------------------------------

    def reevaluate(self, dataset: str) -> None:
        """A new policy version re-evaluates every job naming ``dataset`` not yet started:
        denied if it no longer passes, otherwise back to waiting for (re)approval under the
        new version."""
        for state in (JobState.PENDING_APPROVAL, JobState.APPROVED, JobState.QUEUED):
            for job in self.store.jobs(state=state):
                if dataset not in {d.name for d in job.datasets}:
                    continue
                policies = self._evaluator.current_policies([d.name for d in job.datasets])
                decision = self._evaluator.decide_again(job, policies)
                versions = {n: r.version for n, (r, _) in policies.items()}
                bound = binding(job, (doc for _, doc in policies.values())).digest()
                self._g.record(
                    SYSTEM,
                    "policy.reevaluate",
                    job_id=job.id,
                    outcome=decision.outcome.value,
                    details=decision.to_dict(),
                )
                auto = decision.outcome is access.Outcome.AUTO_APPROVE
                if decision.outcome is access.Outcome.DENY:
                    self._g._transition(
                        job.id, JobState.DENIED, reason="; ".join(str(r) for r in decision.reasons)
                    )
                elif auto and state is JobState.PENDING_APPROVAL:
                    # Approved under the new version by the policy itself: it goes ahead.
                    self._g._transition(
                        job.id,
                        JobState.APPROVED,
                        reason=f"approved under the new policy of {dataset}",
                        policy_versions=versions,
                        binding=bound,
                    )
                    self.enqueue(job.id)
                elif not auto and state is not JobState.PENDING_APPROVAL:
                    self._g._transition(
                        job.id,
                        JobState.PENDING_APPROVAL,
                        reason=f"the policy of {dataset} changed: approve again",
                        policy_versions=versions,
                        binding=bound,
                    )
                else:  # keeps its state (still waiting, or approved by the policy itself)
                    self.store.update_job(job.id, policy_versions=versions, binding=bound)

    # -- the workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            self._refill()
            try:
                self._dispatch(job_id)
            except Exception as e:  # a worker must survive any one job
                self._end_unfinished(job_id, str(e))

    def _resume(self, job_id: str) -> None:
        """Take up a remote run a previous gateway process dispatched (see :meth:`start`)."""
        assert isinstance(self.site, Sites)
        with self._lock:
            self._inflight.add(job_id)
        try:
            if not self.site.resume(job_id, self._on_site_report):
                self._end_unfinished(job_id, "the gateway restarted mid-run")
        except Exception as e:  # as a worker does: the run's ERROR
            self._end_unfinished(job_id, str(e))
        finally:
            with self._lock:
                self._inflight.discard(job_id)

    def _end_unfinished(self, job_id: str, detail: str) -> None:
        try:
            if self.store.job(job_id).state not in TERMINAL:
                self._g._transition(
                    job_id, JobState.ERROR, reason=TeamReason.ERROR, details=(detail,)
                )
        except SealroomError:
            pass

    def _dispatch(self, job_id: str) -> None:
        job = self.store.job(job_id)
        if job.state is not JobState.QUEUED:
            return  # cancelled or re-evaluated while waiting
        spec = parse_spec(job.spec)
        policies = self._evaluator.current_policies([d.name for d in job.datasets])
        bundle = self._bundles.path(job.bundle_sha256) if job.bundle_sha256 else None
        try:
            self._evaluator.verify_binding(job, bundle=bundle, policies=policies)
        except PolicyViolation as e:
            self._g.record(
                SYSTEM, "job.binding", job_id=job_id, outcome="denied", details={"reason": str(e)}
            )
            self._g._transition(
                job_id, JobState.ERROR, reason=f"the approval no longer applies: {e}"
            )
            return
        approvals = self.store.approvals(job_id)
        order = RunOrder(
            job_id=job_id,
            spec=spec,
            spec_sha256=job.spec_sha256,
            bundle=bundle,
            bundle_sha256=job.bundle_sha256,
            datasets=tuple((d.name, d.version) for d in job.datasets),
            policy_versions=dict(job.policy_versions),
            policy_documents={n: r.document for n, (r, _) in policies.items()},
            approval_binding=job.binding,
            approvals=tuple(a.owner for a in approvals if a.decision == "approve"),
            audit_root=self.audit.root().hex(),
            epsilon_spent=self._evaluator.epsilon_spent([d.name for d in job.datasets]),
            dataset_owners={d.name: self._evaluator.owner(d.name) for d in job.datasets},
            approval_signatures={
                a.owner: (a.signer_cert, a.signature)
                for a in approvals
                if a.decision == "approve" and a.signature
            },
            policy_signatures={
                n: (r.signer_cert, r.signature) for n, (r, _) in policies.items() if r.signature
            },
        )
        with self._lock:
            self._inflight.add(job_id)
        try:
            self.site.run(order, self._on_site_report)
        finally:
            with self._lock:
                self._inflight.discard(job_id)

    def _on_site_report(self, report: SiteReport) -> None:
        job_id = report.job_id
        if report.audit_action:
            site = Principal(name=report.site or self.site.name, role=Role.SITE)
            self._g.record(
                site,
                report.audit_action,
                outcome=report.audit_outcome,
                job_id=job_id,
                dataset=report.audit_dataset or None,
                file=report.audit_file or None,
                details=report.details,
            )
        for progress, owners_only in ((report.progress, False), (report.owner_progress, True)):
            if progress is not None:
                job = self.store.job(job_id)
                self._events.publish(
                    JobEvent(
                        job_id, job.state, progress=progress, time=utcnow(), owners_only=owners_only
                    )
                )
        if report.state is None:
            return
        changes: dict[str, Any] = {}
        if report.detail:
            changes["details"] = (report.detail,)
        if report.channel_bits is not None:
            changes["channel_bits"] = report.channel_bits
        if report.image_id:
            changes["image_id"] = report.image_id
        if report.state is JobState.RELEASED:
            if report.release_dir is None:
                raise InvalidInput("a RELEASED report must carry the release directory")
            changes["release_id"] = self._releases.accept(job_id, report.release_dir)
            changes["metrics"] = dict(report.metrics)
        state, reason = self._releases.held_for_review(job_id, report.state, report.reason, changes)
        try:
            self._g._transition(job_id, state, reason=reason, **changes)
        except InvalidState as e:  # e.g. a late report for a job that has already ended
            self._g.record(
                SYSTEM,
                "site.report",
                outcome="error",
                job_id=job_id,
                details={"state": report.state.value, "error": str(e)},
            )
