"""What the site says of a run once its container stopped, to the audit and to the team.

:func:`report_stop` audits the data the job read (each file's first open, with its own time,
sent only now: sent as they happened, their timing would reach the team through the audit
log's lock), a ledger that lost events, and the container's end in the runtime's words.
:func:`failure_phrase` is the team's side of an end that was not clean: a fixed phrase, never
a number. :func:`report_error` audits a run the system failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from enclave import _channels
from enclave.contract import Report, SiteReport
from enclave.ledger import AccessRecord, LedgerSummary
from enclave.runtime import ContainerSpec, ContainerStatus, RunState
from enclave.vault import StagingEvent
from policies.channels import LeakageAccount, TeamReason
from policies.errors import SealroomError, SiteError
from policies.lifecycle import JobState


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


def report_error(job: str, e: Exception, report: Report) -> SiteReport:
    """Audit ``e``, the system's fault in ``job``'s run (never the job's), and return the
    run's ERROR end. The audit record keeps the third-party error under ours (the engine's
    URL, a container ID): the site's business, never in the team's reason. The end's detail,
    for the owners and operators only (the team gets the vocabulary's ERROR): our own errors
    say what went wrong, the site's own failures with the engine's words under them; anything
    else only its kind (its text may carry what the job wrote)."""
    report(
        SiteReport(
            job,
            audit_action="run.error",
            audit_outcome="error",
            details={
                "error": type(e).__name__,
                "message": str(e),
                "cause": repr(e.__cause__)[:2000] if e.__cause__ is not None else "",
            },
        )
    )
    if isinstance(e, SiteError):
        said = str(e) + (f" ({e.__cause__})" if e.__cause__ is not None else "")
    elif isinstance(e, SealroomError):
        said = str(e)
    else:
        said = f"unexpected {type(e).__name__}"
    return _channels.terminal(job, JobState.ERROR, TeamReason.ERROR, f"site: {said}")


def vault_events(run_id: str, report: Report) -> Callable[[StagingEvent], None]:
    """The vault's staging events of ``run_id`` (the data decrypted, then destroyed), audited
    per dataset version."""

    def on_event(event: StagingEvent) -> None:
        for ref in event.datasets:
            report(
                SiteReport(
                    run_id,
                    audit_action=f"data.{event.kind.value}",
                    audit_dataset=ref,
                    details={"total_bytes": event.total_bytes},
                )
            )

    return on_event


def report_start(
    run_id: str, image: str, cspec: ContainerSpec, acct: LeakageAccount, *, warm_container: bool
) -> SiteReport:
    """The run's RUNNING report: the team's state and the bits its channels may carry, and the
    audit record of the container's start (its image, limits and channel account)."""
    return SiteReport(
        run_id,
        state=JobState.RUNNING,
        image_id=image,
        reason=TeamReason.RUNNING,
        channel_bits=acct.total,
        audit_action="container.start",
        details={
            "image": image,
            "gpus": cspec.gpus,
            "memory_bytes": cspec.memory_bytes,
            "warm_container": warm_container,
            "channels": acct.to_dict(),
        },
    )
