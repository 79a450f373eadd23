"""The compliance report for one dataset, computed from audit records (no I/O of its own).

It answers a takedown request: who touched the dataset (every principal, role, action and
outcome, with counts and the first and last time: registration, policy changes, submissions and
approvals of jobs against it, staging, reads, downloads of what derives from it), which jobs
read which of its files (from the host-side access ledger's ``data.read`` events), and which
releases derive from it (the ``release.sign`` events of every job submitted against it or that
touched its data).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enclave.audit._model import AuditRecord


@dataclass(frozen=True)
class Access:
    principal: str
    role: str
    action: str
    outcome: str
    count: int
    first: str
    last: str


@dataclass(frozen=True)
class DerivedRelease:
    job_id: str
    manifest_sha256: str
    time: str


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    accesses: tuple[Access, ...]
    reads: dict[str, tuple[str, ...]]  # job -> files read, sorted
    releases: tuple[DerivedRelease, ...]


def names(dataset: str, value: object) -> bool:
    """Whether ``value`` (a dataset reference or a list of them) names ``dataset``: its
    exact version if ``dataset`` is ``name@vN``, any version if it is a bare name."""
    refs = value if isinstance(value, list) else [value]
    return any(
        isinstance(x, str)
        and (x == dataset or ("@" not in dataset and x.startswith(dataset + "@v")))
        for x in refs
    )


def dataset_report(
    dataset: str,
    about: Iterable[AuditRecord],
    decisions: Iterable[AuditRecord],
    releases: Iterable[AuditRecord],
) -> DatasetReport:
    """``about``: the records naming the dataset; ``decisions``: the ``job.submit``,
    ``job.approve`` and ``job.deny`` records (a job names its datasets in their details);
    ``releases``: every ``release.sign`` and ``release.download`` record.

    A job derives from the dataset if it was submitted against it or touched its data; its
    signed releases are listed, and who submitted, approved or downloaded it counts among
    the accesses (a takedown must reach every copy)."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    reads: dict[str, set[str]] = {}
    jobs: set[str] = set()

    def access(r: AuditRecord) -> None:
        e = r.event
        groups.setdefault((e.principal, e.role, e.action, e.outcome), []).append(r.time)

    for r in about:
        access(r)
        e = r.event
        if e.job_id and e.action.startswith("data."):
            jobs.add(e.job_id)
        if e.action == "data.read" and e.job_id and e.file:
            reads.setdefault(e.job_id, set()).add(e.file)
    for r in decisions:
        if r.event.job_id and names(dataset, r.event.details.get("datasets")):
            access(r)
            if r.event.action == "job.submit":
                jobs.add(r.event.job_id)
    derived = []
    for r in releases:
        if r.event.job_id not in jobs:
            continue
        if r.event.action == "release.sign":
            derived.append(
                DerivedRelease(
                    r.event.job_id or "", str(r.event.details.get("manifest_sha256", "")), r.time
                )
            )
        else:
            access(r)
    accesses = tuple(
        Access(p, role, action, outcome, len(times), min(times), max(times))
        for (p, role, action, outcome), times in sorted(groups.items())
    )
    return DatasetReport(
        dataset, accesses, {j: tuple(sorted(f)) for j, f in sorted(reads.items())}, tuple(derived)
    )
