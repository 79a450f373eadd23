"""The job lifecycle as a pure state machine (no I/O).

    SUBMITTED → PENDING_APPROVAL → APPROVED → QUEUED → RUNNING → CHECKING → RELEASED
                     │  (automatic approval skips PENDING_APPROVAL)   │          ↑
                     │                                                └→ AWAITING_REVIEW
                     │  (custom code under ``custom_code: reviewed``: the gate passed, the
                     │   owner reviews what the weights can carry, approves → RELEASED or
                     │   rejects → REJECTED)
    exits: DENIED (a decision), CANCELLED (the submitter), FAILED (the job's fault),
           ERROR (the system's fault), REJECTED (the release checks failed)

The store persists every transition (and its audit event) before the caller acts on it;
:func:`check_transition` is what the store asks first. A transition to the state a job is
already in is refused too, so that retries are explicit, not silent.
"""

from __future__ import annotations

import enum

from policies.errors import InvalidState


class JobState(enum.StrEnum):
    SUBMITTED = "SUBMITTED"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    APPROVED = "APPROVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CHECKING = "CHECKING"
    AWAITING_REVIEW = "AWAITING_REVIEW"
    RELEASED = "RELEASED"
    DENIED = "DENIED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    ERROR = "ERROR"
    REJECTED = "REJECTED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        JobState.RELEASED,
        JobState.DENIED,
        JobState.CANCELLED,
        JobState.FAILED,
        JobState.ERROR,
        JobState.REJECTED,
    }
)

_S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.SUBMITTED: frozenset({_S.PENDING_APPROVAL, _S.APPROVED, _S.DENIED, _S.CANCELLED, _S.ERROR}),
    _S.PENDING_APPROVAL: frozenset({_S.APPROVED, _S.DENIED, _S.CANCELLED, _S.ERROR}),
    # A new policy version re-evaluates jobs not yet started: back to PENDING_APPROVAL or DENIED.
    _S.APPROVED: frozenset({_S.QUEUED, _S.PENDING_APPROVAL, _S.DENIED, _S.CANCELLED, _S.ERROR}),
    _S.QUEUED: frozenset({_S.RUNNING, _S.PENDING_APPROVAL, _S.DENIED, _S.CANCELLED, _S.ERROR}),
    _S.RUNNING: frozenset({_S.CHECKING, _S.FAILED, _S.CANCELLED, _S.ERROR}),
    _S.CHECKING: frozenset({_S.RELEASED, _S.AWAITING_REVIEW, _S.REJECTED, _S.ERROR}),
    # Not CANCELLED: the run is over and what it wrote is the owner's to release or not.
    _S.AWAITING_REVIEW: frozenset({_S.RELEASED, _S.REJECTED}),
}


def check_transition(current: JobState, new: JobState) -> None:
    """Raise :class:`InvalidState` unless ``current → new`` is a lifecycle edge."""
    if new not in TRANSITIONS.get(current, frozenset()):
        raise InvalidState(f"a job in state {current} cannot move to {new}")
