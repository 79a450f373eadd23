"""The gateway's policy side, over the store: which policy versions apply to a job, who may see
it, what a submission is checked against, the decision under the current policies, the owners'
approvals tallied, and the approval binding (built here, one way, for submission, re-evaluation
and dispatch) with its check before a run. No state changes here: the callers persist and audit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gateway._bundles import sha256_file
from gateway._leakage import bits_spent, epsilon_spent
from gateway.store import JobRecord, PinnedDataset, PolicyRecord, Store
from policies import access, approval, channels, document
from policies.errors import InvalidInput, NotFound, PolicyViolation, SpecError
from policies.identity import Principal, Role
from policies.spec import JobSpec, parse_spec

Current = Mapping[str, tuple[PolicyRecord, document.PolicyDocument]]
"""Each dataset's current policy: its record and its parsed document."""


class Evaluator:
    """Decisions over ``store`` (whose ledger holds the ε and bit tallies); ``clock`` is the
    time decisions and approval expiry are judged at."""

    def __init__(self, store: Store, *, clock: Callable[[], dt.datetime]) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._quanta: dict[tuple[tuple[str, int], ...], float] = {}
        self._docs: dict[tuple[str, int, str], document.PolicyDocument] = {}

    # -- who ---------------------------------------------------------------------------------

    def owner(self, dataset: str) -> str:
        owner = self.store.dataset_owner(dataset)
        if owner is None:
            raise NotFound(f"no dataset {dataset}")
        return owner

    def may_see(self, principal: Principal, job: JobRecord) -> bool:
        if principal.role in (Role.COMPLIANCE, Role.OPERATOR):
            return True
        if principal.role is Role.MODEL_TEAM:
            return job.submitter == principal.name or (
                bool(principal.team) and job.team == principal.team
            )
        if principal.role is Role.DATA_OWNER:
            return any(self.store.dataset_owner(d.name) == principal.name for d in job.datasets)
        return False

    # -- which policies ----------------------------------------------------------------------

    def pin(self, spec: JobSpec) -> tuple[PinnedDataset, ...]:
        """The dataset versions the spec names: all kept at one site (a job runs at one
        site), or, for a federated job, at two or more (it runs at each, in rounds). Raises
        NotFound, or InvalidInput naming the sites."""
        pinned = []
        sites: dict[str, list[str]] = {}
        for ref in spec.datasets:
            rec = self.store.dataset(ref.name, ref.version)
            pinned.append(PinnedDataset(rec.name, rec.version, rec.root_hash))
            sites.setdefault(rec.site or "the gateway's local site", []).append(rec.name)
        where = "; ".join(f"{', '.join(names)} at {site}" for site, names in sites.items())
        if spec.federation is not None:
            if len(sites) < max(2, spec.federation.min_sites):
                raise InvalidInput(
                    f"a federated job runs at {max(2, spec.federation.min_sites)} sites or "
                    f"more, and its datasets are kept at {len(sites)}: {where}"
                )
        elif len(sites) > 1:
            raise InvalidInput(
                f"a job runs at one site, and its datasets are kept at several: {where}"
            )
        return tuple(pinned)

    def current_policies(self, names: list[str]) -> Current:
        out = {}
        for name in names:
            try:
                rec = self.store.policy(name)
            except NotFound:
                continue  # the evaluator denies a dataset without a policy (fail closed)
            out[name] = (rec, self._parsed(rec))
        return out

    def policies_at(self, versions: Mapping[str, int]) -> dict[str, document.PolicyDocument]:
        return {name: self._parsed(self.store.policy(name, v)) for name, v in versions.items()}

    def _parsed(self, rec: PolicyRecord) -> document.PolicyDocument:
        """The stored policy version parsed, once: a version's text never changes (the store
        only adds versions), and the parsed document is immutable. One entry per version."""
        key = (rec.dataset, rec.version, rec.document)
        with self._lock:
            doc = self._docs.get(key)
        if doc is None:
            doc = document.parse_policy(rec.document, version=rec.version)
            with self._lock:
                self._docs[key] = doc
        return doc

    def quantum(self, job: JobRecord) -> float:
        """The time grid of the job's channel rules (the strictest of its policies)."""
        key = tuple(sorted(job.policy_versions.items()))
        with self._lock:
            cached = self._quanta.get(key)
        if cached is None:
            docs = self.policies_at(job.policy_versions).values()
            cached = channels.job_channel_rules(docs).time_quantum_s if docs else 1.0
            with self._lock:
                self._quanta[key] = cached
        return cached

    # -- decisions ---------------------------------------------------------------------------

    def epsilon_spent(self, names: list[str]) -> dict[str, float]:
        return epsilon_spent(self.store, names)

    def decide(
        self,
        spec: JobSpec,
        principal: Principal,
        pinned: tuple[PinnedDataset, ...],
        policies: Current,
    ) -> access.Decision:
        names = [d.name for d in pinned]
        return access.evaluate_submission(
            spec=spec,
            principal=principal,
            policies={name: doc for name, (_, doc) in policies.items()},
            dataset_owners={n: frozenset({self.owner(n)}) for n in names},
            epsilon_spent=self.epsilon_spent(names),
            now=self._clock(),
            bits_spent=bits_spent(self.store, names),
        )

    def decide_again(self, job: JobRecord, policies: Current) -> access.Decision:
        """The decision on a stored job under ``policies``, as its submitter."""
        submitter = Principal(job.submitter, Role.MODEL_TEAM, job.team)
        return self.decide(parse_spec(job.spec), submitter, job.datasets, policies)

    def requirements(self, job: JobRecord) -> tuple[access.ApprovalRequirement, ...]:
        """The approvals the job needs under the current policies; raises PolicyViolation when
        they now deny it."""
        decision = self.decide_again(job, self.current_policies([d.name for d in job.datasets]))
        if decision.outcome is access.Outcome.DENY:
            raise PolicyViolation(
                "the job is now denied by policy", reasons=tuple(str(r) for r in decision.reasons)
            )
        return decision.approvals

    def approval_status(
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

    def check_log_access(self, principal: Principal, job: JobRecord) -> None:
        """Raise PermissionDenied unless ``principal`` may read the job's logs under the
        current policies of its datasets (an operator always may)."""
        if principal.role is Role.OPERATOR:
            return
        names = [d.name for d in job.datasets]
        access.check_log_access(
            principal=principal,
            submitter=Principal(job.submitter, Role.MODEL_TEAM, job.team),
            datasets=names,
            policies={n: doc for n, (_, doc) in self.current_policies(names).items()},
            dataset_owners={n: frozenset({self.owner(n)}) for n in names},
        )

    # -- the binding -------------------------------------------------------------------------

    def verify_binding(self, job: JobRecord, *, bundle: Path | None, policies: Current) -> None:
        """Check that the job's approval still binds it as it is now: the recorded binding
        matches the record, and the spec, the stored ``bundle`` (hashed again), the dataset
        versions and the current ``policies`` are those approved, before the approval expires.
        Raises PolicyViolation naming what differs."""
        approved_at = max(
            (
                dt.datetime.fromisoformat(a.created_at)
                for a in self.store.approvals(job.id)
                if a.decision == "approve" and a.binding == job.binding
            ),
            default=dt.datetime.fromisoformat(job.created_at),
        )
        approved = binding(job, self.policies_at(job.policy_versions).values())
        as_is = dataclasses.replace(
            job,
            spec_sha256=parse_spec(job.spec).digest(),
            bundle_sha256=sha256_file(bundle) if bundle is not None else "",
        )
        current = binding(as_is, (doc for _, doc in policies.values()))
        if approved.digest() != job.binding:
            raise PolicyViolation("the job's recorded binding does not match its record")
        approval.verify_binding(
            approved=approved,
            current=current,
            now=self._clock(),
            expires_at=approval.approval_expiry(
                policies=[doc for _, doc in policies.values()], approved_at=approved_at
            ),
        )


def binding(
    job: JobRecord, policies: Iterable[document.PolicyDocument]
) -> approval.ApprovalBinding:
    """What an approval of ``job`` binds: its id, spec, bundle, dataset versions and the given
    versions of its datasets' policies. The one place a binding is built."""
    return approval.ApprovalBinding.create(
        job_id=job.id,
        spec_digest=job.spec_sha256,
        bundle_digest=job.bundle_sha256 or None,
        dataset_versions={d.name: d.version for d in job.datasets},
        policies=[doc.ref() for doc in policies],
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
