"""The job state machine: only the documented edges exist; terminal states are final."""

from __future__ import annotations

import itertools

import pytest

from policies.errors import InvalidState
from policies.lifecycle import TERMINAL, TRANSITIONS, JobState, check_transition

HAPPY = [
    JobState.SUBMITTED,
    JobState.PENDING_APPROVAL,
    JobState.APPROVED,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.CHECKING,
    JobState.RELEASED,
]


def test_happy_path_is_allowed() -> None:
    for a, b in itertools.pairwise(HAPPY):
        check_transition(a, b)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_have_no_exit(state: JobState) -> None:
    for other in JobState:
        with pytest.raises(InvalidState):
            check_transition(state, other)


def test_no_skipping_approval_or_checks() -> None:
    for a, b in [
        (JobState.PENDING_APPROVAL, JobState.RUNNING),
        (JobState.SUBMITTED, JobState.QUEUED),
        (JobState.RUNNING, JobState.RELEASED),
        (JobState.QUEUED, JobState.CHECKING),
    ]:
        with pytest.raises(InvalidState, match=f"{a} cannot move to {b}"):
            check_transition(a, b)


def test_every_state_is_terminal_or_has_edges() -> None:
    for state in JobState:
        assert state in TERMINAL or TRANSITIONS[state]
