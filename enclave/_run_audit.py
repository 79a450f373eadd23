"""What the site says of a run once its container stopped, to the audit and to the team.

:func:`report_stop` audits the data the job read (each file's first open, with its own time,
sent only now: sent as they happened, their timing would reach the team through the audit
log's lock), a ledger that lost events, and the container's end in the runtime's words.
:func:`failure_phrase` is the team's side of an end that was not clean: a fixed phrase, never
a number.
"""

from __future__ import annotations

from typing import Any

from enclave.contract import Report, SiteReport
from enclave.ledger import AccessRecord, LedgerSummary
from enclave.runtime import ContainerStatus, RunState


def report_stop(
    job: str,
    report: Report,
    reads: list[AccessRecord],
    summary: LedgerSummary,
    status: ContainerStatus,
) -> None:
    """Audit the run's reads, a lossy ledger, and the container's end (``container.stop``)."""
    for record in reads:
        report(
            SiteReport(
                job,
                audit_action="data.read",
                audit_dataset=record.dataset,
                audit_file=record.path,
                details={"first_open": record.first_open.isoformat()},
            )
        )
    if not summary.complete:
        report(
            SiteReport(
                job,
                audit_action="data.read",
                audit_outcome="error",
                details={
                    "reason": "the access ledger lost events (queue overflow): reads may be missing"
                },
            )
        )
    report(
        SiteReport(
            job,
            audit_action="container.stop",
            details={
                "state": status.state.value,
                "exit_code": status.exit_code,
                "reason": status.reason,
            },
        )
    )


def failure_phrase(status: Any) -> str:
    """The team's reason for a job that did not exit cleanly: a fixed phrase, never a number
    (exit code, forks refused) nor the runtime's words; those go to the container.stop audit."""
    if status.state is RunState.KILLED_OOM or status.oom_killed:
        return "failed: out of memory"
    if getattr(status, "at_pids_limit", False):
        return "failed: resource limit"
    if status.state is RunState.KILLED_TIMEOUT:
        return "failed: timeout"
    if status.state is RunState.EXITED:
        return "failed: non-zero exit"
    return "failed: stopped"
