"""The leakage account: what the team observes is coarse, counted, and held to a budget."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import channels
from policies.access import Rule
from policies.channels import (
    LOSS_MAX,
    ChannelRules,
    TeamReason,
    account,
    check_account,
    coarse_loss,
    progress_schedule,
    strictest,
)
from policies.errors import InvalidInput, PolicyViolation
from tests.unit._policy_factory import make_policy


def test_the_default_policy_fits_the_default_budget() -> None:
    policy = make_policy()
    acct = account(policy.channels, [policy.release], timeout_s=3600)
    assert acct.budget == 512
    assert 0 < acct.total <= acct.budget
    check_account(acct)  # does not raise


def test_full_precision_progress_would_not_fit() -> None:
    """The channel the reviewers measured (one 4-digit loss a second) is refused as a policy."""
    rules = ChannelRules(progress_points=20, loss_digits=4, time_quantum_s=1)
    policy = make_policy()
    acct = account(rules, [policy.release], timeout_s=3600)
    with pytest.raises(PolicyViolation, match="per-job budget"):
        check_account(acct)


def test_dataset_budget_counts_earlier_jobs() -> None:
    policy = make_policy()
    acct = account(policy.channels, [policy.release], timeout_s=600)
    check_account(acct, spent={"books": 0}, dataset_budgets={"books": acct.total})
    with pytest.raises(PolicyViolation, match="books"):
        check_account(acct, spent={"books": 1}, dataset_budgets={"books": acct.total})
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(InvalidInput):
            check_account(acct, spent={"books": bad}, dataset_budgets={"books": 1e9})


def test_no_rules_is_no_job() -> None:
    with pytest.raises(InvalidInput):
        strictest([])
    with pytest.raises(InvalidInput):
        account(ChannelRules(), [], timeout_s=10)


def test_strictest_takes_the_tightest_of_each() -> None:
    a = ChannelRules(job_budget_bits=300, progress_points=5, time_quantum_s=10)
    b = ChannelRules(job_budget_bits=900, progress_points=15, time_quantum_s=60, loss_digits=1)
    s = strictest([a, b])
    assert (s.job_budget_bits, s.progress_points, s.time_quantum_s, s.loss_digits) == (
        300,
        5,
        60,
        1,
    )


@given(
    total=st.integers(min_value=1, max_value=10**6),
    points=st.integers(min_value=1, max_value=channels.MAX_PROGRESS_POINTS),
)
@settings(max_examples=200, deadline=None)
def test_schedule_is_fixed_in_advance_and_bounded(total: int, points: int) -> None:
    steps = progress_schedule(total, points)
    assert 1 <= len(steps) <= points
    assert list(steps) == sorted(set(steps))
    assert steps[-1] == total
    assert all(1 <= s <= total for s in steps)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_coarse_loss_takes_only_the_counted_values(loss: float) -> None:
    shown = coarse_loss(loss, 2)
    if shown in (0.0, LOSS_MAX):
        return
    assert channels.LOSS_MIN <= shown < LOSS_MAX
    assert len(f"{shown:.6e}".split("e")[0].replace(".", "").rstrip("0")) <= 2


def test_coarse_loss_value_count_matches_the_account() -> None:
    """Every value coarse_loss can show is counted: 6 decades x 90 mantissas, 0 and LOSS_MAX."""
    seen = set()
    for exponent in range(-4, 5):
        for mantissa in range(100, 1000):
            seen.add(coarse_loss(mantissa / 100 * 10.0**exponent, 2))
    seen.update({coarse_loss(math.nan, 2), coarse_loss(-1, 2)})
    assert len(seen) == 6 * 90 + 2


def test_progress_time_capacity_is_the_count_of_monotone_placements() -> None:
    """The binomial in the account equals a brute-force count on a small grid."""
    points, timeout = 3, 4
    ticks = math.ceil(timeout + channels.STOP_GRACE_S) + 1  # grid points on a 1 s grid
    slots = ticks + 1  # a tick, or never
    count = sum(
        1
        for placement in itertools.product(range(slots), repeat=points)
        if list(placement) == sorted(placement)
    )
    rules = ChannelRules(progress_points=points, time_quantum_s=1)
    acct = account(rules, [make_policy().release], timeout_s=timeout)
    assert acct.items["progress.time"] == pytest.approx(math.log2(count))


def test_outcome_vocabulary_is_fixed_texts() -> None:
    for reason in TeamReason:
        assert not any(ch.isdigit() for ch in reason.value)
    acct = account(ChannelRules(), [make_policy().release], timeout_s=60)
    assert acct.items["outcome"] == pytest.approx(math.log2(len(channels.OUTCOMES)))


def test_metric_bits_follow_the_policy() -> None:
    few = make_policy(release={"metrics": {"allowed": ["train_loss"], "significant_digits": 2}})
    many = make_policy(
        release={"metrics": {"allowed": ["train_loss", "eval_loss"], "significant_digits": 4}}
    )
    a = account(ChannelRules(), [few.release], timeout_s=60).items["metrics"]
    b = account(ChannelRules(), [many.release], timeout_s=60).items["metrics"]
    assert 0 < a < b


def test_channel_rule_is_a_decision_reason() -> None:
    assert Rule.CHANNELS.value == "channels"
