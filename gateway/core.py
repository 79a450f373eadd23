"""The gateway's logic, callable without a server: datasets, policies, jobs, approvals, releases.

Every public method takes the authenticated :class:`Principal` as the keyword ``principal``
and checks ownership itself (the RPC layer has already checked the role). Every state change is
persisted, then recorded in the audit log, before the method returns or acts on it. Methods
raise only :mod:`policies.errors` classes; the RPC layer maps them to status codes.

Jobs move through :mod:`policies.lifecycle`. Approved jobs wait in a bounded queue; worker
threads hand them to the site one at a time each, after checking that the approval still binds
the job as it is now (spec, bundle, dataset versions, policy versions).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from enclave.contract import RunOrder, Site, SiteReport
from gateway._spool import SealedSpool
from gateway._views import JobEvent, event_for, job_for
from gateway.audit import AuditEvent, AuditLog
from gateway.store import (
    ApprovalRecord,
    DatasetFileRecord,
    DatasetRecord,
    JobRecord,
    PinnedDataset,
    PolicyRecord,
    Store,
    utcnow,
)
from policies import access, approval, channels, document, review
from policies.channels import TeamReason
from policies.errors import (
    InvalidInput,
    InvalidState,
    NotFound,
    PermissionDenied,
    PolicyViolation,
    ResourceExhausted,
    SealroomError,
    SpecError,
)
from policies.identity import Principal, Role
from policies.lifecycle import TERMINAL, JobState
from policies.spec import NAME_RE, JobSpec, parse_spec

SYSTEM = Principal(name="gateway", role=Role.OPERATOR, team="")
"""The principal recorded for what the gateway does on its own (transitions, dispatch)."""


class _EventHub:
    """Per-job event history with blocking readers, for WatchJob.

    Events have absolute positions, so a reader never loses its place when old ones are
    dropped. Progress is capped apart from state changes (the owners' full progress comes
    once a second for as long as the job likes): state changes are never dropped, and how
    much progress a job writes decides nothing about what a watcher of its states sees.
    """

    def __init__(self, *, keep_progress: int = 1000) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, list[tuple[int, JobEvent]]] = {}
        self._next: dict[str, int] = {}
        self._keep = keep_progress

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
            self._cond.notify_all()

    def follow(
        self, job_id: str, *, start: int = 0, timeout_s: float = 1.0
    ) -> list[tuple[int, JobEvent]]:
        """Events at positions ``start`` and after (waiting up to ``timeout_s`` for one)."""
        with self._cond:
            self._cond.wait_for(lambda: self._next.get(job_id, 0) > start, timeout=timeout_s)
            return [(p, e) for p, e in self._events.get(job_id, ()) if p >= start]


class Gateway:
    """The control plane. ``home`` holds bundles and releases; state is in ``store``."""

    def __init__(
        self,
        *,
        home: Path,
        store: Store,
        audit: AuditLog,
        site: Site,
        workers: int = 1,
        max_queued: int = 100,
        max_bundle_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.home = home
        self.store = store
        self.audit = audit
        self.site = site
        self.max_bundle_bytes = max_bundle_bytes
        self._bundles = home / "bundles"
        self._releases = home / "releases"
        self._bundles.mkdir(parents=True, exist_ok=True)
        self._releases.mkdir(parents=True, exist_ok=True)
        self._events = _EventHub()
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queued)
        self._workers = [
            threading.Thread(target=self._work, name=f"dispatch-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = False
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._waiting: dict[str, None] = {}  # approved jobs that found the queue full, in order
        self._quanta: dict[tuple[tuple[str, int], ...], float] = {}

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch workers; re-queue approved jobs left by a previous run."""
        if self._started:
            return
        self._started = True
        for t in self._workers:
            t.start()
        for job in self.store.jobs(state=JobState.RUNNING) + self.store.jobs(
            state=JobState.CHECKING
        ):
            self._transition(
                job.id,
                JobState.ERROR,
                reason=TeamReason.ERROR,
                details=("the gateway restarted mid-run",),
            )
        for job in self.store.jobs(state=JobState.QUEUED):
            self._queue.put(job.id)
        for job in self.store.jobs(state=JobState.APPROVED):
            self._enqueue(job.id)

    def stop(self) -> None:
        if not self._started:
            return
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout=5)
        self._started = False

    # -- audit ------------------------------------------------------------------------------

    def record(
        self,
        principal: Principal,
        action: str,
        *,
        outcome: str = "ok",
        job_id: str | None = None,
        dataset: str | None = None,
        file: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one durable audit event; returns its sequence number."""
        rec = self.audit.append(
            AuditEvent(
                principal=principal.name,
                role=principal.role.value,
                action=action,
                outcome=outcome,
                job_id=job_id,
                dataset=dataset,
                file=file,
                details=dict(details or {}),
            )
        )
        return int(rec.seq)

    # -- datasets ---------------------------------------------------------------------------

    def register_dataset(
        self,
        *,
        principal: Principal,
        name: str,
        description: str,
        archive: SealedSpool,
        archive_sha256: str,
    ) -> DatasetRecord:
        """Store the tar archive in ``archive`` (spooled sealed: its plaintext is on no disk)
        as the next version of ``name`` in the site's vault. Raises InvalidInput for a bad
        name, a hash other than the one the client announced, or an archive the vault
        refuses; PermissionDenied for another owner's dataset. A failure stores nothing."""
        if not NAME_RE.match(name):
            raise InvalidInput(f"dataset name {name!r}: use lowercase letters, digits, . _ -")
        owner = self.store.dataset_owner(name)
        if owner is not None and owner != principal.name:
            raise PermissionDenied(f"dataset {name} belongs to {owner}")
        actual = archive.seal()
        if archive_sha256 and actual != archive_sha256:
            raise InvalidInput(
                f"dataset archive hash mismatch: header says {archive_sha256}, got {actual}"
            )
        with archive.reader() as stream:
            stored = self.site.store_dataset(name, archive=stream)
        try:
            existing = self.store.dataset(name, stored.version)
        except NotFound:
            existing = None
        if existing is not None:  # the vault found identical content: same version
            return existing
        record = self.store.add_dataset(
            DatasetRecord(
                name=name,
                version=stored.version,
                owner=principal.name,
                root_hash=stored.root_hash,
                size=stored.size,
                files=tuple(DatasetFileRecord(p, s, h) for p, s, h in stored.files),
                description=description,
                created_at=utcnow(),
            )
        )
        self.record(
            principal,
            "dataset.register",
            dataset=f"{name}@v{record.version}",
            details={
                "root_hash": record.root_hash,
                "files": len(record.files),
                "size": record.size,
            },
        )
        return record

    def rotate_site_key(self, *, principal: Principal) -> tuple[str, int]:
        """Re-wrap the site's data keys under a new site key (operator); audited with the new
        key's id and how many data keys were re-wrapped."""
        key_id, count = self.site.rotate_key()
        self.record(
            principal,
            "site.key_rotated",
            details={"site": self.site.name, "key_id": key_id, "dataset_versions": count},
        )
        return key_id, count

    def datasets(self, *, principal: Principal) -> list[DatasetRecord]:
        return self.store.datasets()

    # -- policies ---------------------------------------------------------------------------

    def put_policy(self, *, principal: Principal, dataset: str, text: str) -> PolicyRecord:
        owner = self.store.dataset_owner(dataset)
        if owner is None:
            raise NotFound(f"no dataset {dataset}: register it before writing its policy")
        if owner != principal.name:
            raise PermissionDenied(f"dataset {dataset} belongs to {owner}")
        doc = document.parse_policy(text)
        if doc.dataset != dataset:
            raise InvalidInput(f"policy names dataset {doc.dataset!r}, not {dataset!r}")
        record = self.store.add_policy(
            dataset=dataset,
            document=text,
            sha256=doc.digest(),
            author=principal.name,
        )
        self.record(
            principal,
            "policy.put",
            dataset=dataset,
            details={"version": record.version, "sha256": record.sha256},
        )
        self._reevaluate(dataset)
        return record

    def policy(self, *, principal: Principal, dataset: str, version: int | None) -> PolicyRecord:
        return self.store.policy(dataset, version)

    def policy_versions(self, *, principal: Principal, dataset: str) -> list[PolicyRecord]:
        return self.store.policies(dataset)

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        *,
        principal: Principal,
        spec_text: str,
        bundle: Path | None,
        bundle_sha256: str,
        received: bool = False,
    ) -> JobRecord:
        """Validate, pin and decide a submission. A refused spec leaves no job behind; a
        policy denial is a decision and is kept, in state DENIED, with every reason.

        ``received``: ``bundle`` is the servicer's own spool of the upload and
        ``bundle_sha256`` the hash it computed while receiving it; the file is then moved
        into the bundle store rather than hashed and copied again."""
        spec = parse_spec(spec_text)
        check_trainer(spec, has_bundle=bundle is not None)
        self._admit()
        if bundle is not None:
            actual = bundle_sha256 if received else sha256_file(bundle)
            if bundle_sha256 and actual != bundle_sha256:
                raise InvalidInput(
                    f"bundle hash mismatch: header says {bundle_sha256}, got {actual}"
                )
            bundle_sha256 = actual
        elif spec.is_custom:
            raise InvalidInput("trainer 'custom' needs a code bundle")
        else:
            bundle_sha256 = ""
        pinned = self._pin(spec)
        policies = self._current_policies([d.name for d in pinned])
        decision = self._decide(spec, principal, pinned, policies)
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        if bundle is not None:
            dest = self._bundles / f"{bundle_sha256}.tar.gz"
            if not dest.exists():
                tmp = dest.with_suffix(f".{job_id}.tmp")
                if received:
                    bundle.replace(tmp)
                else:
                    shutil.copyfile(bundle, tmp)
                tmp.replace(dest)
        policy_versions = {name: rec.version for name, (rec, _) in policies.items()}
        job = JobRecord(
            id=job_id,
            name=spec.name,
            state=JobState.SUBMITTED,
            submitter=principal.name,
            team=principal.team,
            spec=spec.canonical_json().decode(),
            spec_sha256=spec.digest(),
            bundle_sha256=bundle_sha256,
            datasets=pinned,
            policy_versions=policy_versions,
            reasons=tuple(str(r) for r in decision.reasons),
            binding=self._binding(
                job_id,
                spec.digest(),
                bundle_sha256,
                pinned,
                [doc.ref() for _, doc in policies.values()],
            ).digest(),
        )
        job = self.store.add_job(job)
        self.record(
            principal,
            "job.submit",
            job_id=job_id,
            details={
                "spec_sha256": job.spec_sha256,
                "bundle_sha256": bundle_sha256,
                "datasets": [f"{d.name}@v{d.version}" for d in pinned],
                "policy_versions": policy_versions,
            },
        )
        self._events.publish(JobEvent(job_id, JobState.SUBMITTED, time=job.created_at))
        self.record(
            SYSTEM,
            "policy.decision",
            job_id=job_id,
            outcome=decision.outcome.value,
            details=decision.to_dict(),
        )
        if decision.outcome is access.Outcome.DENY:
            return self._transition(
                job_id, JobState.DENIED, reason="; ".join(str(r) for r in decision.reasons)
            )
        if decision.outcome is access.Outcome.AUTO_APPROVE:
            self._transition(job_id, JobState.APPROVED, reason="approved under the policy")
            self._enqueue(job_id)
            return self.store.job(job_id)
        return self._transition(job_id, JobState.PENDING_APPROVAL, reason="waiting for owners")

    def decide(self, *, principal: Principal, job_id: str, approve: bool, reason: str) -> JobRecord:
        job = self.store.job(job_id)
        owned = [d.name for d in job.datasets if self._owner(d.name) == principal.name]
        if not owned:
            raise PermissionDenied(f"{principal.name} owns none of the datasets job {job_id} names")
        if job.state is not JobState.PENDING_APPROVAL:
            raise InvalidState(f"job {job_id} is {job.state}, not waiting for approval")
        requirements = self._requirements(job)
        approval.check_approver(principal=principal, requirements=requirements)
        self.store.add_approval(
            ApprovalRecord(
                job_id=job_id,
                owner=principal.name,
                decision="approve" if approve else "deny",
                reason=reason,
                binding=job.binding,
                created_at=utcnow(),
            )
        )
        self.record(
            principal,
            "job.approve" if approve else "job.deny",
            job_id=job_id,
            details={"binding": job.binding, "reason": reason, "datasets": owned},
        )
        if not approve:
            return self._transition(
                job_id,
                JobState.DENIED,
                reason=f"denied by {principal.name}" + (f": {reason}" if reason else ""),
            )
        if self._approval_status(job, requirements) is approval.ApprovalStatus.APPROVED:
            self._transition(job_id, JobState.APPROVED, reason="approved by the owners")
            self._enqueue(job_id)
        return self.store.job(job_id)

    def cancel(self, *, principal: Principal, job_id: str, reason: str) -> JobRecord:
        job = self.job(principal=principal, job_id=job_id)
        if principal.name != job.submitter and principal.role is not Role.OPERATOR:
            raise PermissionDenied("only the submitter or an operator can cancel a job")
        if job.state in TERMINAL:
            raise InvalidState(f"job {job_id} has already ended ({job.state})")
        with self._lock:
            at_site = job_id in self._inflight
        if at_site or job.state in (JobState.RUNNING, JobState.CHECKING):
            self.record(principal, "job.cancel", job_id=job_id, details={"reason": reason})
            self.site.cancel(job_id)  # the run ends with CANCELLED through the site's report
            # The run may have ended meanwhile: the caller's view, never the owners' details.
            return self.job(principal=principal, job_id=job_id)
        self.record(principal, "job.cancel", job_id=job_id, details={"reason": reason})
        self._transition(job_id, JobState.CANCELLED, reason=reason or "cancelled")
        return self.job(principal=principal, job_id=job_id)

    def job(self, *, principal: Principal, job_id: str) -> JobRecord:
        """The job as ``principal`` may see it (the model team: the coarse view)."""
        job = self.store.job(job_id)
        if not self._may_see(principal, job):
            # Same answer as a missing job: do not confirm that someone else's job exists.
            raise NotFound(f"no job {job_id}")
        return job_for(principal, job, quantum_s=self._quantum(job))

    def jobs(self, *, principal: Principal, state: JobState | None) -> list[JobRecord]:
        return [
            job_for(principal, j, quantum_s=self._quantum(j))
            for j in self.store.jobs(state=state)
            if self._may_see(principal, j)
        ]

    def approvals(self, job_id: str) -> list[ApprovalRecord]:
        return self.store.approvals(job_id)

    def watch(
        self, *, principal: Principal, job_id: str, poll_s: float = 1.0
    ) -> Iterator[JobEvent]:
        """Events of a job from its start, until it ends, as ``principal`` may see them (the
        model team: scheduled progress points, vocabulary reasons, coarse times). Blocks
        between events."""
        job = self.job(principal=principal, job_id=job_id)
        if job.state in TERMINAL:
            yield JobEvent(job_id, job.state, reason="; ".join(job.reasons), time=job.updated_at)
            return
        quantum = self._quantum(job)
        seen = 0
        while True:
            for position, event in self._events.follow(job_id, start=seen, timeout_s=poll_s):
                seen = position + 1
                shown = event_for(principal, event, quantum_s=quantum)
                if shown is not None:
                    yield shown
                if event.terminal:
                    return
            if seen == 0:  # history lost (restart): report the stored state once
                current = self.store.job(job_id)
                if current.state in TERMINAL:
                    shown_job = job_for(principal, current, quantum_s=quantum)
                    yield JobEvent(job_id, current.state, time=shown_job.updated_at)
                    return

    def logs(self, *, principal: Principal, job_id: str) -> bytes:
        job = self.job(principal=principal, job_id=job_id)
        if principal.role is not Role.OPERATOR:
            names = [d.name for d in job.datasets]
            access.check_log_access(
                principal=principal,
                submitter=Principal(job.submitter, Role.MODEL_TEAM, job.team),
                datasets=names,
                policies={n: doc for n, (_, doc) in self._current_policies(names).items()},
                dataset_owners={n: frozenset({self._owner(n)}) for n in names},
            )
        self.record(principal, "job.logs", job_id=job_id)
        return self.site.logs(job_id)

    def release_dir(self, *, principal: Principal, job_id: str) -> Path:
        job = self.job(principal=principal, job_id=job_id)
        if job.state is not JobState.RELEASED:
            raise InvalidState(f"job {job_id} is {job.state}: nothing has been released")
        path = self._releases / job_id
        if not path.is_dir():
            raise NotFound(f"the release of job {job_id} is missing from the release store")
        self.record(
            principal, "release.download", job_id=job_id, details={"release_id": job.release_id}
        )
        return path

    # -- review of reviewed custom code -----------------------------------------------------

    def release_review(self, *, principal: Principal, job_id: str) -> review.ReviewReport:
        """The report an owner decides a held release on: the weights channel's capacity in
        bits and the gate's check results, from the site-signed release. Owners of a dataset
        whose policy asks for review only; audited."""
        job, reviewers = self._reviewable(principal, job_id)
        report = self._review_report(job, reviewers)
        self.record(
            principal,
            "release.review",
            job_id=job_id,
            details={
                "release_id": report.release_id,
                "weights_capacity_bits": report.capacity.bits,
            },
        )
        return report

    def decide_release(
        self, *, principal: Principal, job_id: str, approve: bool, reason: str
    ) -> JobRecord:
        """An owner's verdict on a held release. One rejection rejects (REJECTED; the staged
        release is deleted); it is RELEASED once every reviewing owner has approved this very
        release (its manifest's hash). Audited, with the capacity the owner accepted."""
        job, reviewers = self._reviewable(principal, job_id)
        report = self._review_report(job, reviewers)
        self.record(
            principal,
            "release.approve" if approve else "release.reject",
            job_id=job_id,
            details={
                "release_id": report.release_id,
                "weights_capacity_bits": report.capacity.bits,
                "datasets": sorted(d for d, o in reviewers.items() if o == principal.name),
                "reason": reason,
            },
        )
        if not approve:
            shutil.rmtree(self._releases / job_id, ignore_errors=True)
            # The owner's words stay in the audit log: the team sees the verdict only.
            return self._transition(job_id, JobState.REJECTED, reason=TeamReason.REJECTED_BY_REVIEW)
        if set(reviewers.values()) <= self._release_approvers(job_id, report.release_id):
            metrics = json.loads((self._releases / job_id / "metrics.json").read_text())
            return self._transition(
                job_id,
                JobState.RELEASED,
                reason=TeamReason.RELEASED_AFTER_REVIEW,
                release_id=report.release_id,
                metrics={k: float(v) for k, v in metrics.items()},
            )
        return self.store.job(job_id)

    def _held_for_review(
        self, job_id: str, state: JobState, reason: str, changes: dict[str, Any]
    ) -> tuple[JobState, str]:
        """A passed release of reviewed custom code waits for its owners (AWAITING_REVIEW):
        staged in the release store, but neither its id nor its metrics reach the job record,
        so the team sees the state only until the owners approve. Edits ``changes``."""
        if state is not JobState.RELEASED or not self._reviewers(self.store.job(job_id)):
            return state, reason
        changes.pop("release_id", None)
        changes.pop("metrics", None)
        return JobState.AWAITING_REVIEW, TeamReason.AWAITING_REVIEW

    def _reviewers(self, job: JobRecord) -> dict[str, str]:
        """Dataset -> owner, for each dataset whose policy (the version the job ran under)
        makes the job's release wait for review."""
        spec = parse_spec(job.spec)
        return {
            name: self._owner(name)
            for name, doc in self._policies_at(job.policy_versions).items()
            if access.needs_review(spec, doc)
        }

    def _reviewable(self, principal: Principal, job_id: str) -> tuple[JobRecord, dict[str, str]]:
        job = self.store.job(job_id)
        if principal.role is not Role.DATA_OWNER or not self._may_see(principal, job):
            raise NotFound(f"no job {job_id}")  # the same answer as for someone else's job
        reviewers = self._reviewers(job)
        if principal.name not in reviewers.values():
            raise PermissionDenied(
                f"{principal.name} owns no dataset of job {job_id} whose policy asks for review"
            )
        if job.state is not JobState.AWAITING_REVIEW:
            raise InvalidState(f"job {job_id} is {job.state}, not waiting for review")
        return job, reviewers

    def _review_report(self, job: JobRecord, reviewers: Mapping[str, str]) -> review.ReviewReport:
        from enclave.provenance import MANIFEST, Manifest

        dest = self._releases / job.id
        raw = (dest / MANIFEST).read_bytes()
        manifest = Manifest.from_bytes(raw)
        release_id = hashlib.sha256(raw).hexdigest()
        tensors = [
            t
            for a in manifest.artifacts
            if a.path.endswith(".safetensors")
            for t in _safetensors_header(dest / a.path)
        ]
        docs = self._policies_at(job.policy_versions)
        return review.review_report(
            job_id=job.id,
            release_id=release_id,
            tensors=tensors,
            scrub_bits=[docs[d].release.scrub_bits for d in reviewers],
            checks=[
                review.CheckResult(g.dataset, c.name, c.passed, dict(c.figures))
                for g in manifest.gates
                for c in g.checks
            ],
            reviewers=reviewers.values(),
            approved_by=self._release_approvers(job.id, release_id),
        )

    def _release_approvers(self, job_id: str, release_id: str) -> set[str]:
        """Owners who approved this release: the audit log is the record of their verdicts."""
        return {
            r.event.principal
            for r in self.audit.query(job=job_id, action="release.approve")
            if r.event.details.get("release_id") == release_id
        }

    # -- internals --------------------------------------------------------------------------

    def _owner(self, dataset: str) -> str:
        owner = self.store.dataset_owner(dataset)
        if owner is None:
            raise NotFound(f"no dataset {dataset}")
        return owner

    def _may_see(self, principal: Principal, job: JobRecord) -> bool:
        if principal.role in (Role.COMPLIANCE, Role.OPERATOR):
            return True
        if principal.role is Role.MODEL_TEAM:
            return job.submitter == principal.name or (
                bool(principal.team) and job.team == principal.team
            )
        if principal.role is Role.DATA_OWNER:
            return any(self.store.dataset_owner(d.name) == principal.name for d in job.datasets)
        return False

    def _pin(self, spec: JobSpec) -> tuple[PinnedDataset, ...]:
        pinned = []
        for ref in spec.datasets:
            rec = self.store.dataset(ref.name, ref.version)
            pinned.append(PinnedDataset(rec.name, rec.version, rec.root_hash))
        return tuple(pinned)

    def _current_policies(
        self, names: list[str]
    ) -> dict[str, tuple[PolicyRecord, document.PolicyDocument]]:
        out = {}
        for name in names:
            try:
                rec = self.store.policy(name)
            except NotFound:
                continue  # the evaluator denies a dataset without a policy (fail closed)
            out[name] = (rec, document.parse_policy(rec.document, version=rec.version))
        return out

    def _policies_at(self, versions: Mapping[str, int]) -> dict[str, document.PolicyDocument]:
        return {
            name: document.parse_policy(self.store.policy(name, v).document, version=v)
            for name, v in versions.items()
        }

    def _epsilon_spent(self, names: list[str]) -> dict[str, float]:
        """Privacy budget already released per dataset: the sum, over released jobs, of the ε
        the site's accountant charged each in its signed release manifest (that dataset's DP
        check), never a metric the job wrote. A release whose gate ran no DP check on the
        dataset spent none of its DP budget; one whose record cannot be read, or reads as
        anything but a finite number >= 0, is charged the largest float (fail closed: later
        DP jobs on the dataset are refused by the budget, and the sum stays a finite number)."""
        spent = dict.fromkeys(names, 0.0)
        worst = sys.float_info.max
        for job in self.store.jobs(state=JobState.RELEASED):
            touched = {d.name for d in job.datasets if d.name in spent}
            if not touched:
                continue
            charged = dict.fromkeys(touched, 0.0)
            try:
                manifest = json.loads((self._releases / job.id / "manifest.json").read_bytes())
                for gate in manifest["gates"]:
                    if gate["dataset"] not in charged:
                        continue
                    for check in gate["checks"]:
                        if check["name"] == "dp":
                            eps = check["figures"].get("epsilon", worst)
                            ok = isinstance(eps, int | float) and not isinstance(eps, bool)
                            ok = ok and math.isfinite(eps) and eps >= 0
                            charged[gate["dataset"]] = float(eps) if ok else worst
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                charged = dict.fromkeys(touched, worst)
            for name, eps in charged.items():
                spent[name] = min(worst, spent[name] + eps)
        return spent

    def _decide(
        self,
        spec: JobSpec,
        principal: Principal,
        pinned: tuple[PinnedDataset, ...],
        policies: Mapping[str, tuple[PolicyRecord, document.PolicyDocument]],
    ) -> access.Decision:
        names = [d.name for d in pinned]
        return access.evaluate_submission(
            spec=spec,
            principal=principal,
            policies={name: doc for name, (_, doc) in policies.items()},
            dataset_owners={n: frozenset({self._owner(n)}) for n in names},
            epsilon_spent=self._epsilon_spent(names),
            now=_now(),
            bits_spent=self._bits_spent(names),
        )

    def _bits_spent(self, names: list[str]) -> dict[str, float]:
        """Channel capacity already used per dataset: every job that started on it."""
        used = self.store.channel_bits_spent()
        return {name: used.get(name, 0.0) for name in names}

    def _quantum(self, job: JobRecord) -> float:
        """The time grid of the job's channel rules (the strictest of its policies)."""
        key = tuple(sorted(job.policy_versions.items()))
        with self._lock:
            cached = self._quanta.get(key)
        if cached is None:
            docs = self._policies_at(job.policy_versions).values()
            cached = channels.job_channel_rules(docs).time_quantum_s if docs else 1.0
            with self._lock:
                self._quanta[key] = cached
        return cached

    def _requirements(self, job: JobRecord) -> tuple[access.ApprovalRequirement, ...]:
        spec = parse_spec(job.spec)
        submitter = Principal(job.submitter, Role.MODEL_TEAM, job.team)
        decision = self._decide(
            spec, submitter, job.datasets, self._current_policies([d.name for d in job.datasets])
        )
        if decision.outcome is access.Outcome.DENY:
            raise PolicyViolation(
                "the job is now denied by policy", reasons=tuple(str(r) for r in decision.reasons)
            )
        return decision.approvals

    def _approval_status(
        self, job: JobRecord, requirements: tuple[access.ApprovalRequirement, ...]
    ) -> approval.ApprovalStatus:
        votes = [
            approval.ApprovalVote(
                approver=a.owner,
                vote=approval.Vote.APPROVE if a.decision == "approve" else approval.Vote.DENY,
                binding_digest=a.binding,
                reason=a.reason,
            )
            for a in self.store.approvals(job.id)
        ]
        states = [approval.tally(votes, req, binding_digest=job.binding) for req in requirements]
        return approval.job_approval_status(states)

    def _binding(
        self,
        job_id: str,
        spec_sha256: str,
        bundle_sha256: str,
        pinned: tuple[PinnedDataset, ...],
        policies: list[document.PolicyRef],
    ) -> approval.ApprovalBinding:
        return approval.ApprovalBinding.create(
            job_id=job_id,
            spec_digest=spec_sha256,
            bundle_digest=bundle_sha256 or None,
            dataset_versions={d.name: d.version for d in pinned},
            policies=policies,
        )

    def _transition(
        self, job_id: str, new: JobState, *, reason: str = "", **changes: Any
    ) -> JobRecord:
        if reason:
            changes.setdefault("reasons", (reason,))
        before, after = self.store.transition(job_id, new, **changes)
        self.record(
            SYSTEM,
            "job.state",
            job_id=job_id,
            details={
                "from": before.state.value,
                "to": new.value,
                "reason": reason,
                **({"detail": list(after.details)} if "details" in changes else {}),
            },
        )
        self._events.publish(JobEvent(job_id, new, reason=reason, time=after.updated_at))
        return after

    def _enqueue(self, job_id: str) -> None:
        """Queue an approved job for the site. When the queue is full the job stays APPROVED
        (nothing is lost) and a worker queues it as soon as a slot frees up.

        QUEUED is persisted before the id is in the queue: a worker that took the id first
        would find the job still APPROVED, skip it as re-evaluated, and lose it. Only this
        method puts ids in the queue, under the lock, so a queue seen with room keeps it."""
        with self._lock:
            if self._queue.full():
                self._waiting[job_id] = None
                return
            self._transition(job_id, JobState.QUEUED, reason="waiting for the site")
            # Only stop()'s sentinels take room without the lock; a job they crowd out stays
            # QUEUED in the store, and start() queues every QUEUED job again.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(job_id)

    def _admit(self) -> None:
        """Back-pressure: refuse a new submission while the site's queue is full."""
        if self._queue.full():
            raise ResourceExhausted(
                f"the site queue is full ({self._queue.maxsize} jobs waiting); submit again "
                "when some have run"
            )

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
                self._enqueue(job_id)

    def _reevaluate(self, dataset: str) -> None:
        """A new policy version re-evaluates every job naming ``dataset`` not yet started:
        denied if it no longer passes, otherwise back to waiting for (re)approval under the
        new version."""
        for state in (JobState.PENDING_APPROVAL, JobState.APPROVED, JobState.QUEUED):
            for job in self.store.jobs(state=state):
                if dataset not in {d.name for d in job.datasets}:
                    continue
                submitter = Principal(job.submitter, Role.MODEL_TEAM, job.team)
                policies = self._current_policies([d.name for d in job.datasets])
                decision = self._decide(parse_spec(job.spec), submitter, job.datasets, policies)
                versions = {n: r.version for n, (r, _) in policies.items()}
                binding = self._binding(
                    job.id,
                    job.spec_sha256,
                    job.bundle_sha256,
                    job.datasets,
                    [doc.ref() for _, doc in policies.values()],
                ).digest()
                self.record(
                    SYSTEM,
                    "policy.reevaluate",
                    job_id=job.id,
                    outcome=decision.outcome.value,
                    details=decision.to_dict(),
                )
                auto = decision.outcome is access.Outcome.AUTO_APPROVE
                if decision.outcome is access.Outcome.DENY:
                    self._transition(
                        job.id, JobState.DENIED, reason="; ".join(str(r) for r in decision.reasons)
                    )
                elif auto and state is JobState.PENDING_APPROVAL:
                    # Approved under the new version by the policy itself: it goes ahead.
                    self._transition(
                        job.id,
                        JobState.APPROVED,
                        reason=f"approved under the new policy of {dataset}",
                        policy_versions=versions,
                        binding=binding,
                    )
                    self._enqueue(job.id)
                elif not auto and state is not JobState.PENDING_APPROVAL:
                    self._transition(
                        job.id,
                        JobState.PENDING_APPROVAL,
                        reason=f"the policy of {dataset} changed: approve again",
                        policy_versions=versions,
                        binding=binding,
                    )
                else:  # keeps its state (still waiting, or approved by the policy itself)
                    self.store.update_job(job.id, policy_versions=versions, binding=binding)

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            self._refill()
            try:
                self._dispatch(job_id)
            except Exception as e:  # a worker must survive any one job
                try:
                    job = self.store.job(job_id)
                    if job.state not in TERMINAL:
                        self._transition(
                            job_id, JobState.ERROR, reason=TeamReason.ERROR, details=(str(e),)
                        )
                except SealroomError:
                    pass

    def _dispatch(self, job_id: str) -> None:
        job = self.store.job(job_id)
        if job.state is not JobState.QUEUED:
            return  # cancelled or re-evaluated while waiting
        spec = parse_spec(job.spec)
        policies = self._current_policies([d.name for d in job.datasets])
        bundle = self._bundles / f"{job.bundle_sha256}.tar.gz" if job.bundle_sha256 else None
        try:
            approved_at = max(
                (
                    dt.datetime.fromisoformat(a.created_at)
                    for a in self.store.approvals(job_id)
                    if a.decision == "approve" and a.binding == job.binding
                ),
                default=dt.datetime.fromisoformat(job.created_at),
            )
            approved = self._binding(
                job.id,
                job.spec_sha256,
                job.bundle_sha256,
                job.datasets,
                [d.ref() for d in self._policies_at(job.policy_versions).values()],
            )
            current = self._binding(
                job.id,
                parse_spec(job.spec).digest(),
                sha256_file(bundle) if bundle is not None else "",
                job.datasets,
                [doc.ref() for _, doc in policies.values()],
            )
            if approved.digest() != job.binding:
                raise PolicyViolation("the job's recorded binding does not match its record")
            approval.verify_binding(
                approved=approved,
                current=current,
                now=_now(),
                expires_at=approval.approval_expiry(
                    policies=[doc for _, doc in policies.values()], approved_at=approved_at
                ),
            )
        except PolicyViolation as e:
            self.record(
                SYSTEM, "job.binding", job_id=job_id, outcome="denied", details={"reason": str(e)}
            )
            self._transition(job_id, JobState.ERROR, reason=f"the approval no longer applies: {e}")
            return
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
            approvals=tuple(
                a.owner for a in self.store.approvals(job_id) if a.decision == "approve"
            ),
            audit_root=self.audit.root().hex(),
            epsilon_spent=self._epsilon_spent([d.name for d in job.datasets]),
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
            site = Principal(name=self.site.name, role=Role.SITE)
            self.record(
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
            dest = self._releases / job_id
            tmp = self._releases / f".{job_id}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(report.release_dir, tmp, symlinks=True)
            tmp.replace(dest)
            manifest = (dest / "manifest.json").read_bytes()
            changes["release_id"] = hashlib.sha256(manifest).hexdigest()
            changes["metrics"] = dict(report.metrics)
        state, reason = self._held_for_review(job_id, report.state, report.reason, changes)
        try:
            self._transition(job_id, state, reason=reason, **changes)
        except InvalidState as e:  # e.g. a late report for a job that has already ended
            self.record(
                SYSTEM,
                "site.report",
                outcome="error",
                job_id=job_id,
                details={"state": report.state.value, "error": str(e)},
            )


def check_trainer(spec: JobSpec, *, has_bundle: bool) -> None:
    """Refuse at submission what the container would refuse after approval: an unknown
    built-in trainer, hyperparameters its rules reject (the same torch-free rules the
    harness applies, :mod:`trainers.hparams`; a private graph's ``dp_epsilon`` is required
    there), or a private graph without the bundle that holds it. Raises :class:`SpecError`
    naming the field."""
    from trainers.errors import ConfigError
    from trainers.harness import TRAINERS

    if spec.is_custom:
        return  # the team's own module takes its own keyword arguments
    if spec.trainer == access.PRIVATE_TRAINER and not has_bundle:
        raise SpecError(
            "bundle: trainer 'private' trains the team's graph, and no code bundle came with "
            "the spec (it must hold program.pt2, written by torch.export.save)"
        )
    entry = TRAINERS.get(spec.trainer)
    if entry is None:
        known = ", ".join(sorted(TRAINERS))
        raise SpecError(
            f"trainer: unknown trainer {spec.trainer!r}; built-in: {known}, or "
            "custom with an entrypoint"
        )
    try:
        entry.validate(spec.hyperparameters)
    except ConfigError as e:
        raise SpecError(str(e)) from e


def _safetensors_header(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each tensor of a site-signed safetensors file, from its header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return [
        (str(t["dtype"]), tuple(int(d) for d in t["shape"]))
        for name, t in header.items()
        if name != "__metadata__"
    ]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in blocks (a bundle or a release can be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def job_summary(job: JobRecord) -> dict[str, Any]:
    """A JSON-able view of a job (for the CLI's --json and for logs)."""
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,
        "submitter": job.submitter,
        "spec_sha256": job.spec_sha256,
        "bundle_sha256": job.bundle_sha256,
        "datasets": [f"{d.name}@v{d.version}" for d in job.datasets],
        "policy_versions": dict(job.policy_versions),
        "reasons": list(job.reasons),
        "image_id": job.image_id,
        "metrics": dict(job.metrics),
        "release_id": job.release_id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
