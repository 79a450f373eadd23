"""The gateway's job façade, callable without a server: datasets, policies, jobs, approvals,
releases.

Every public method takes the authenticated :class:`Principal` as the keyword ``principal``
and checks ownership itself (the RPC layer has already checked the role). Every state change is
persisted, then recorded in the audit log, before the method returns or acts on it. Methods
raise only :mod:`policies.errors` classes; the RPC layer maps them to status codes.

Jobs move through :mod:`policies.lifecycle`. The façade delegates to the gateway's rooms: the
policy side (:mod:`gateway._evaluate`, with the leakage tallies of :mod:`gateway._leakage`), the
dispatcher that queues approved jobs and hands them to the site (:mod:`gateway._dispatch`), the
event hub watchers read (:mod:`gateway._events`), and the bundle and release stores
(:mod:`gateway._bundles`, :mod:`gateway._releases`, with the owners' review of held releases).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from enclave.audit import AuditEvent, AuditLog
from enclave.contract import Site, StoredDataset
from enclave.signatures import verify
from gateway._bundles import BundleStore, sha256_file
from gateway._catalog import Catalog
from gateway._dispatch import Dispatcher
from gateway._evaluate import Evaluator, binding, check_trainer
from gateway._events import EventHub
from gateway._facade import SYSTEM
from gateway._leakage import release_charges
from gateway._releases import ReleaseStore
from gateway._spool import SealedSpool
from gateway._views import JobEvent, job_for, job_summary
from gateway.store import (
    ApprovalRecord,
    DatasetRecord,
    JobRecord,
    PolicyRecord,
    Store,
    utcnow,
)
from policies import access, approval, review
from policies.errors import InvalidInput, InvalidState, NotFound, PermissionDenied
from policies.identity import Principal, Role
from policies.lifecycle import TERMINAL, JobState
from policies.signing import approval_message, policy_message
from policies.spec import parse_spec

__all__ = ["SYSTEM", "Gateway", "check_trainer", "job_summary", "sha256_file"]


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
        ca_cert_pem: bytes | None = None,
    ) -> None:
        self.home = home
        # With the deployment CA's certificate, every decision and policy must come signed by
        # its owner (the sites check the signatures again; here a bad one is refused early).
        self.ca_cert_pem = ca_cert_pem
        self.store = store
        self.audit = audit
        self.site = site
        self.max_bundle_bytes = max_bundle_bytes
        self._events = EventHub()
        # Each release's ε is charged from its signed manifest as the job becomes RELEASED (the
        # first time, every release already in the store is charged so: the migration).
        store.keep_ledger(release_charges(home / "releases"))
        # The clock is looked up in this module at each call, so a test can move it.
        self._evaluator = Evaluator(store, clock=lambda: _now())
        self._bundles = BundleStore(home / "bundles")
        self._releases = ReleaseStore(
            self, home / "releases", store=store, audit=audit, evaluator=self._evaluator
        )
        self._dispatcher = Dispatcher(
            self,
            store=store,
            audit=audit,
            site=site,
            events=self._events,
            evaluator=self._evaluator,
            bundles=self._bundles,
            releases=self._releases,
            workers=workers,
            max_queued=max_queued,
        )
        self._catalog = Catalog(
            self, store=store, site=site, reevaluate=self._dispatcher.reevaluate
        )

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch workers; re-queue approved jobs left by a previous run."""
        self._dispatcher.start()

    def stop(self) -> None:
        """Stop dispatching (runs in progress end first), then let the site go of what it
        holds while idle (its warm containers)."""
        self._dispatcher.stop()
        self.site.close()

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
        return self._catalog.register_dataset(
            principal=principal,
            name=name,
            description=description,
            archive=archive,
            archive_sha256=archive_sha256,
        )

    def push_dataset(
        self,
        *,
        site: Principal,
        owner: str,
        stored: StoredDataset,
        description: str,
        is_owner: Callable[[str], bool],
    ) -> DatasetRecord:
        """Record a dataset version remote site ``site`` stored for ``owner``: its metadata
        only (the bytes stay at the site); audited. See
        :meth:`gateway._catalog.Catalog.push_dataset`."""
        return self._catalog.push_dataset(
            site=site, owner=owner, stored=stored, description=description, is_owner=is_owner
        )

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

    def put_policy(
        self,
        *,
        principal: Principal,
        dataset: str,
        text: str,
        version: int | None = None,
        signature: str = "",
        signer_cert: str = "",
    ) -> PolicyRecord:
        """Store ``text`` as the next policy version of ``principal``'s ``dataset`` and decide
        again every job it touches that has not started. ``version``, which the owner signs,
        must be that next version (None: whichever it is, for a gateway without a CA). Raises
        NotFound for an unregistered dataset, PermissionDenied for another owner's,
        InvalidInput for a document naming another dataset (and what
        :func:`policies.document.parse_policy` raises), SignatureError for a signature that is
        missing or not the owner's over the text and version, InvalidState for a version that
        is not the next one."""
        if self.ca_cert_pem is not None and not version:
            raise InvalidInput(f"policy {dataset}: the version the owner signs is missing")
        self._check_signed(
            principal,
            signature,
            signer_cert,
            policy_message(dataset, version or 0, text),
            f"policy {dataset}",
        )
        return self._catalog.put_policy(
            principal=principal,
            dataset=dataset,
            text=text,
            version=version,
            signature=signature,
            signer_cert=signer_cert,
        )

    def _check_signed(
        self, principal: Principal, signature: str, signer_cert: str, message: bytes, what: str
    ) -> None:
        if self.ca_cert_pem is None and not signature:
            return  # a gateway without a CA (tests of the control plane alone)
        if self.ca_cert_pem is None:
            raise InvalidInput(f"{what}: this gateway cannot check signatures (no CA)")
        verify(
            cert_pem=signer_cert,
            signature=signature,
            message=message,
            ca_cert_pem=self.ca_cert_pem,
            name=principal.name,
            role=Role.DATA_OWNER,
            what=what,
        )

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
        self._dispatcher.admit()
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
        pinned = self._evaluator.pin(spec)
        policies = self._evaluator.current_policies([d.name for d in pinned])
        decision = self._evaluator.decide(spec, principal, pinned, policies)
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        if bundle is not None:
            self._bundles.put(bundle, sha256=bundle_sha256, tag=job_id, move=received)
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
        )
        bound = binding(job, (doc for _, doc in policies.values())).digest()
        job = self.store.add_job(dataclasses.replace(job, binding=bound))
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
            self._dispatcher.enqueue(job_id)
            return self.store.job(job_id)
        return self._transition(job_id, JobState.PENDING_APPROVAL, reason="waiting for owners")

    def decide(
        self,
        *,
        principal: Principal,
        job_id: str,
        approve: bool,
        reason: str,
        signature: str = "",
        signer_cert: str = "",
    ) -> JobRecord:
        job = self.store.job(job_id)
        owned = [d.name for d in job.datasets if self._evaluator.owner(d.name) == principal.name]
        if not owned:
            raise PermissionDenied(f"{principal.name} owns none of the datasets job {job_id} names")
        if job.state is not JobState.PENDING_APPROVAL:
            raise InvalidState(f"job {job_id} is {job.state}, not waiting for approval")
        requirements = self._evaluator.requirements(job)
        approval.check_approver(principal=principal, requirements=requirements)
        decision = "approve" if approve else "deny"
        self._check_signed(
            principal,
            signature,
            signer_cert,
            approval_message(job.binding, decision),
            f"the {decision} of job {job_id}",
        )
        self.store.add_approval(
            ApprovalRecord(
                job_id=job_id,
                owner=principal.name,
                decision=decision,
                reason=reason,
                binding=job.binding,
                created_at=utcnow(),
                signature=signature,
                signer_cert=signer_cert,
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
        status = self._evaluator.approval_status(job, requirements)
        if status is approval.ApprovalStatus.APPROVED:
            self._transition(job_id, JobState.APPROVED, reason="approved by the owners")
            self._dispatcher.enqueue(job_id)
        return self.store.job(job_id)

    def cancel(self, *, principal: Principal, job_id: str, reason: str) -> JobRecord:
        job = self.job(principal=principal, job_id=job_id)
        if principal.name != job.submitter and principal.role is not Role.OPERATOR:
            raise PermissionDenied("only the submitter or an operator can cancel a job")
        if job.state in TERMINAL:
            raise InvalidState(f"job {job_id} has already ended ({job.state})")
        at_site = self._dispatcher.at_site(job_id)
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
        if not self._evaluator.may_see(principal, job):
            # Same answer as a missing job: do not confirm that someone else's job exists.
            raise NotFound(f"no job {job_id}")
        return job_for(principal, job, quantum_s=self._evaluator.quantum(job))

    def jobs(self, *, principal: Principal, state: JobState | None) -> list[JobRecord]:
        if principal.role is Role.MODEL_TEAM:  # its own and its team's, by index
            candidates = self.store.jobs_of_team(
                submitter=principal.name, team=principal.team, state=state
            )
        else:
            candidates = self.store.jobs(state=state)
        return [
            job_for(principal, j, quantum_s=self._evaluator.quantum(j))
            for j in candidates
            if self._evaluator.may_see(principal, j)
        ]

    def approvals(self, job_id: str) -> list[ApprovalRecord]:
        return self.store.approvals(job_id)

    def approvals_of(self, job_ids: Iterable[str]) -> dict[str, list[ApprovalRecord]]:
        """The approvals of each of ``job_ids`` (every id a key), in one store query."""
        return self.store.approvals_of(job_ids)

    def watch(
        self,
        *,
        principal: Principal,
        job_id: str,
        poll_s: float = 1.0,
        alive: Callable[[], bool] = lambda: True,
    ) -> Iterator[JobEvent]:
        """Events of a job from its start, until it ends, as ``principal`` may see them (the
        model team: scheduled progress points, vocabulary reasons, coarse times). Blocks
        between events; ends within ``poll_s`` once ``alive()`` is false."""
        job = self.job(principal=principal, job_id=job_id)
        yield from self._events.watch(
            principal,
            job,
            store=self.store,
            quantum_s=self._evaluator.quantum(job),
            poll_s=poll_s,
            alive=alive,
        )

    def logs(self, *, principal: Principal, job_id: str) -> bytes:
        job = self.job(principal=principal, job_id=job_id)
        self._evaluator.check_log_access(principal, job)
        self.record(principal, "job.logs", job_id=job_id)
        return self.site.logs(job_id)

    # -- releases ---------------------------------------------------------------------------

    def release_dir(self, *, principal: Principal, job_id: str) -> Path:
        job = self.job(principal=principal, job_id=job_id)
        path = self._releases.released(job)
        self.record(
            principal, "release.download", job_id=job_id, details={"release_id": job.release_id}
        )
        return path

    def release_review(self, *, principal: Principal, job_id: str) -> review.ReviewReport:
        """The report an owner decides a held release on: the weights channel's capacity in
        bits and the gate's check results, from the site-signed release. Owners of a dataset
        whose policy asks for review only; audited."""
        return self._releases.review_report(principal, job_id)

    def decide_release(
        self, *, principal: Principal, job_id: str, approve: bool, reason: str
    ) -> JobRecord:
        """An owner's verdict on a held release. One rejection rejects (REJECTED; the staged
        release is deleted); it is RELEASED once every reviewing owner has approved this very
        release (its manifest's hash). Audited, with the capacity the owner accepted."""
        return self._releases.decide(principal, job_id, approve=approve, reason=reason)

    # -- internals --------------------------------------------------------------------------

    def _epsilon_spent(self, names: list[str]) -> dict[str, float]:
        """Privacy budget already released per dataset (see :mod:`gateway._leakage`)."""
        return self._evaluator.epsilon_spent(names)

    def _transition(
        self, job_id: str, new: JobState, *, reason: str = "", **changes: Any
    ) -> JobRecord:
        """Persist a state change, audit it, then tell the watchers. The one way a job's state
        changes (the dispatcher's too)."""
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
