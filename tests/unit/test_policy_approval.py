"""Approvals: quorum counting (one deny denies, a vote counts once, stale and foreign votes do
not count), the binding refuses anything changed after approval, expiry, and re-evaluation
when a new policy version arrives before the job starts."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from policies.access import ApprovalRequirement, Outcome, Rule, evaluate_submission
from policies.approval import (
    ApprovalBinding,
    ApprovalStatus,
    ApprovalVote,
    ReevaluationOutcome,
    Vote,
    approval_expiry,
    check_approver,
    job_approval_status,
    reevaluate_approval,
    tally,
    verify_binding,
)
from policies.document import PolicyDocument, PolicyRef
from policies.errors import InvalidInput, PermissionDenied, PolicyViolation
from policies.identity import Principal, Role
from tests.unit._policy_factory import ALICE, NOW, OLIVIA, OSCAR, OWNERS, make_policy, make_spec

BUNDLE = "b" * 64
OTHER_BUNDLE = "c" * 64


def requirement(quorum: int = 2, owners: frozenset[str] = OWNERS["books"]) -> ApprovalRequirement:
    return ApprovalRequirement(
        dataset="books", owners=owners, quorum=quorum, policy=make_policy().ref()
    )


def binding(**changes: Any) -> ApprovalBinding:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "spec_digest": make_spec().digest(),
        "bundle_digest": BUNDLE,
        "dataset_versions": {"books": 3},
        "policies": [make_policy().ref()],
    }
    values.update(changes)
    return ApprovalBinding.create(**values)


B = binding()
D = B.digest()


def vote(who: str, v: Vote = Vote.APPROVE, digest: str = D) -> ApprovalVote:
    return ApprovalVote(approver=who, vote=v, binding_digest=digest)


# --- tally --------------------------------------------------------------------------------------


def test_quorum_of_two_with_one_deny_is_denied() -> None:
    state = tally([vote("olivia"), vote("oscar", Vote.DENY)], requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.DENIED
    assert state.approved_by == {"olivia"} and state.denied_by == {"oscar"}
    assert not state.quorum_reached


def test_quorum_of_two_with_two_approvals_is_approved() -> None:
    state = tally([vote("olivia"), vote("oscar")], requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.APPROVED and state.quorum_reached


def test_one_owner_voting_twice_counts_once() -> None:
    state = tally([vote("olivia"), vote("olivia")], requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.PENDING
    assert state.approved_by == {"olivia"}


def test_deny_then_approve_by_the_same_owner_stays_denied() -> None:
    votes = [vote("oscar", Vote.DENY), vote("oscar"), vote("olivia")]
    state = tally(votes, requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.DENIED
    assert state.approved_by == {"olivia"}


def test_deny_wins_even_after_quorum() -> None:
    owners = frozenset({"olivia", "oscar", "otto"})
    votes = [vote("olivia"), vote("oscar"), vote("otto", Vote.DENY)]
    assert tally(votes, requirement(2, owners), binding_digest=D).status is ApprovalStatus.DENIED


def test_votes_by_non_owners_do_not_count_even_a_deny() -> None:
    votes = [vote("olivia"), vote("mallory"), vote("eve", Vote.DENY)]
    state = tally(votes, requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.PENDING
    assert state.ignored == {"mallory", "eve"}


def test_votes_for_another_binding_are_stale() -> None:
    old = binding(bundle_digest=OTHER_BUNDLE).digest()
    state = tally([vote("olivia", digest=old), vote("oscar")], requirement(), binding_digest=D)
    assert state.status is ApprovalStatus.PENDING
    assert state.stale == {"olivia"} and state.approved_by == {"oscar"}


def test_tally_refuses_a_malformed_binding_digest() -> None:
    with pytest.raises(InvalidInput):
        tally([], requirement(), binding_digest="")


def test_requirement_that_cannot_be_met_is_refused() -> None:
    with pytest.raises(InvalidInput, match="cannot be reached"):
        requirement(quorum=3)
    with pytest.raises(InvalidInput, match="at least 1"):
        requirement(quorum=0)


def test_job_status_combines_datasets() -> None:
    approved = tally([vote("olivia"), vote("oscar")], requirement(), binding_digest=D)
    pending = tally([vote("olivia")], requirement(), binding_digest=D)
    denied = tally([vote("olivia", Vote.DENY)], requirement(), binding_digest=D)
    assert job_approval_status([approved, approved]) is ApprovalStatus.APPROVED
    assert job_approval_status([approved, pending]) is ApprovalStatus.PENDING
    assert job_approval_status([approved, pending, denied]) is ApprovalStatus.DENIED
    with pytest.raises(InvalidInput):
        job_approval_status([])


def test_only_owning_data_owners_may_vote() -> None:
    check_approver(principal=OLIVIA, requirements=[requirement()])
    with pytest.raises(PermissionDenied, match="only data owners"):
        check_approver(
            principal=Principal("olivia", Role.MODEL_TEAM, "x"), requirements=[requirement()]
        )
    with pytest.raises(PermissionDenied, match="owns none"):
        check_approver(
            principal=Principal("mona", Role.DATA_OWNER, "m"), requirements=[requirement()]
        )


# --- the binding --------------------------------------------------------------------------------


def test_binding_digest_is_stable_and_order_free() -> None:
    two = [make_policy().ref(), make_policy("medical").ref()]
    a = binding(dataset_versions={"books": 3, "medical": 1}, policies=two)
    b = binding(dataset_versions={"medical": 1, "books": 3}, policies=list(reversed(two)))
    assert a == b and a.digest() == b.digest()


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"job_id": "job-2"}, "job:"),
        ({"spec_digest": make_spec(name="other").digest()}, "spec:"),
        ({"bundle_digest": OTHER_BUNDLE}, "bundle:"),
        ({"bundle_digest": None}, "bundle:"),
        ({"dataset_versions": {"books": 4}}, "dataset books: version changed"),
        ({"policies": [make_policy(version=2).ref()]}, "policy books:"),
    ],
)
def test_a_change_after_approval_is_refused_and_named(change: dict[str, Any], word: str) -> None:
    current = binding(**change)
    assert current.digest() != D
    with pytest.raises(PolicyViolation) as info:
        verify_binding(approved=B, current=current, expires_at=NOW + dt.timedelta(days=1), now=NOW)
    assert len(info.value.reasons) == 1
    assert info.value.reasons[0].startswith(word)


def test_changed_bundle_after_approval_is_refused() -> None:
    with pytest.raises(PolicyViolation, match="the code bundle changed"):
        verify_binding(
            approved=B,
            current=binding(bundle_digest=OTHER_BUNDLE),
            expires_at=NOW + dt.timedelta(days=1),
            now=NOW,
        )


def test_every_change_and_expiry_are_reported_together() -> None:
    current = binding(
        bundle_digest=OTHER_BUNDLE,
        dataset_versions={"books": 4},
        policies=[make_policy(version=2, base_models=["tiny-lm", "big-lm"]).ref()],
    )
    with pytest.raises(PolicyViolation) as info:
        verify_binding(approved=B, current=current, expires_at=NOW, now=NOW)
    prefixes = [r.split(":")[0].split(" ")[0] for r in info.value.reasons]
    assert prefixes == ["bundle", "dataset", "policy", "expired"]


def test_unchanged_binding_within_expiry_verifies() -> None:
    verify_binding(approved=B, current=binding(), expires_at=NOW + dt.timedelta(seconds=1), now=NOW)


def test_expired_approval_is_refused() -> None:
    with pytest.raises(PolicyViolation, match="expired: the approval expired"):
        verify_binding(approved=B, current=B, expires_at=NOW - dt.timedelta(seconds=1), now=NOW)


def test_naive_times_are_refused() -> None:
    with pytest.raises(InvalidInput):
        verify_binding(approved=B, current=B, expires_at=dt.datetime(2030, 1, 1), now=NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"job_id": "../etc"},
        {"spec_digest": "abc"},
        {"bundle_digest": ""},
        {"dataset_versions": {}},
        {"dataset_versions": {"books": -1}},
        {"dataset_versions": {"books": True}},
        {"policies": []},
        {"policies": [make_policy("medical").ref()]},
        {"policies": [PolicyRef("books", 1, "not-hex")]},
    ],
)
def test_malformed_bindings_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        binding(**change)


def test_approval_expiry_is_the_earliest_of_validity_and_policy_expiry() -> None:
    week = make_policy(approval={"mode": "manual"})  # valid_for_hours defaults to 168
    day = make_policy("medical", approval={"mode": "manual", "valid_for_hours": 24})
    assert approval_expiry(policies=[week, day], approved_at=NOW) == NOW + dt.timedelta(hours=24)
    late = dt.datetime(2026, 12, 31, 12, tzinfo=dt.UTC)
    assert approval_expiry(policies=[week], approved_at=late) == week.expires
    with pytest.raises(InvalidInput):
        approval_expiry(policies=[], approved_at=NOW)


# --- re-evaluation on a new policy version ------------------------------------------------------

MANUAL: dict[str, Any] = {"approval": {"mode": "manual"}}


def approved_job(policy: PolicyDocument) -> tuple[ApprovalBinding, list[ApprovalVote]]:
    spec = make_spec()
    decision = evaluate_submission(
        spec=spec,
        principal=ALICE,
        policies={"books": policy},
        dataset_owners=OWNERS,
        epsilon_spent={},
        now=NOW,
    )
    assert decision.outcome is Outcome.NEEDS_APPROVAL
    bound = binding(policies=decision.policies)
    votes = [vote("olivia", digest=bound.digest())]
    state = tally(votes, decision.approvals[0], binding_digest=bound.digest())
    assert state.status is ApprovalStatus.APPROVED
    return bound, votes


def reevaluate(bound: ApprovalBinding, votes: list[ApprovalVote], new: PolicyDocument) -> Any:
    return reevaluate_approval(
        binding=bound,
        spec=make_spec(),
        principal=ALICE,
        policies={"books": new},
        dataset_owners=OWNERS,
        votes=votes,
        epsilon_spent={},
        now=NOW,
    )


def test_new_policy_version_invalidates_the_binding_and_reevaluation_rebinds() -> None:
    old = make_policy(version=1, **MANUAL)
    bound, votes = approved_job(old)
    new = make_policy(version=2, base_models=["tiny-lm", "other-lm"], **MANUAL)
    current = binding(policies=[new.ref()])
    # The start-time check sees the policy version changed and refuses the old approval...
    with pytest.raises(PolicyViolation, match="policy books: the policy changed"):
        verify_binding(approved=bound, current=current, expires_at=NOW + dt.timedelta(1), now=NOW)
    # ...the re-evaluation finds the approval still applies and re-binds it to v2.
    result = reevaluate(bound, votes, new)
    assert result.outcome is ReevaluationOutcome.STILL_APPROVED
    assert result.changed == ("books",)
    assert result.binding is not None and result.binding == current
    verify_binding(
        approved=result.binding, current=current, expires_at=NOW + dt.timedelta(1), now=NOW
    )


def test_new_policy_that_denies_revokes_the_approval() -> None:
    bound, votes = approved_job(make_policy(version=1, **MANUAL))
    new = make_policy(version=2, base_models=["other-lm"], **MANUAL)
    result = reevaluate(bound, votes, new)
    assert result.outcome is ReevaluationOutcome.DENIED
    assert result.decision.rules == {Rule.BASE_MODEL}
    assert result.binding is None
    assert any("base model 'tiny-lm' is not allowed" in r for r in result.reasons)


def test_raised_quorum_needs_another_approval() -> None:
    bound, votes = approved_job(make_policy(version=1, **MANUAL))
    new = make_policy(version=2, approval={"mode": "quorum", "quorum": 2})
    result = reevaluate(bound, votes, new)
    assert result.outcome is ReevaluationOutcome.NEEDS_APPROVAL
    assert result.binding is None
    assert result.reasons == ("books: pending with 1 of 2 approval(s)",)
    # The second owner approves the (old) binding: the approval now stands under v2.
    result = reevaluate(bound, [*votes, vote("oscar", digest=bound.digest())], new)
    assert result.outcome is ReevaluationOutcome.STILL_APPROVED


def test_approver_removed_from_owners_no_longer_counts() -> None:
    bound, votes = approved_job(make_policy(version=1, **MANUAL))
    result = reevaluate_approval(
        binding=bound,
        spec=make_spec(),
        principal=ALICE,
        policies={"books": make_policy(version=2, **MANUAL)},
        dataset_owners={"books": frozenset({"oscar"})},
        votes=votes,
        epsilon_spent={},
        now=NOW,
    )
    assert result.outcome is ReevaluationOutcome.NEEDS_APPROVAL


def test_policy_relaxed_to_automatic_keeps_the_approval() -> None:
    bound, votes = approved_job(make_policy(version=1, **MANUAL))
    result = reevaluate(bound, votes, make_policy(version=2))
    assert result.outcome is ReevaluationOutcome.STILL_APPROVED
    assert result.approvals == ()


def test_same_policy_same_binding() -> None:
    policy = make_policy(version=1, **MANUAL)
    bound, votes = approved_job(policy)
    result = reevaluate(bound, votes, policy)
    assert result.outcome is ReevaluationOutcome.STILL_APPROVED
    assert result.changed == () and result.binding == bound


def test_reevaluation_refuses_a_different_spec() -> None:
    bound, votes = approved_job(make_policy(**MANUAL))
    with pytest.raises(PolicyViolation, match="not the approved one"):
        reevaluate_approval(
            binding=bound,
            spec=make_spec(purpose="research", hyperparameters={"max_steps": 11}),
            principal=ALICE,
            policies={"books": make_policy(**MANUAL)},
            dataset_owners=OWNERS,
            votes=votes,
            epsilon_spent={},
            now=NOW,
        )


def test_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        B.bundle_digest = OTHER_BUNDLE  # type: ignore[misc]
    state = tally([vote("olivia")], requirement(), binding_digest=D)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.status = ApprovalStatus.APPROVED  # type: ignore[misc]
    assert OSCAR.role is Role.DATA_OWNER
