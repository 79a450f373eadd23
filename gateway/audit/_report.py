"""The compliance report for one dataset, computed from audit records (no I/O of its own).

It answers a takedown request: who touched the dataset (every principal, role, action and
outcome, with counts and the first and last time), which jobs read which of its files (from the
host-side access ledger's ``data.read`` events), and which releases derive from it (the
``release.sign`` events of every job that staged or read it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.audit._log import AuditRecord


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


def dataset_report(dataset: str, about: Iterable[AuditRecord],
                   releases: Iterable[AuditRecord]) -> DatasetReport:
    """``about``: the records naming the dataset; ``releases``: every ``release.sign`` record."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    reads: dict[str, set[str]] = {}
    jobs: set[str] = set()
    for r in about:
        e = r.event
        groups.setdefault((e.principal, e.role, e.action, e.outcome), []).append(r.time)
        if e.job_id and e.action.startswith("data."):
            jobs.add(e.job_id)
        if e.action == "data.read" and e.job_id and e.file:
            reads.setdefault(e.job_id, set()).add(e.file)
    accesses = tuple(
        Access(p, role, action, outcome, len(times), min(times), max(times))
        for (p, role, action, outcome), times in sorted(groups.items())
    )
    derived = tuple(
        DerivedRelease(r.event.job_id or "", str(r.event.details.get("manifest_sha256", "")),
                       r.time)
        for r in releases if r.event.job_id in jobs
    )
    return DatasetReport(dataset, accesses, {j: tuple(sorted(f)) for j, f in
                                             sorted(reads.items())}, derived)
