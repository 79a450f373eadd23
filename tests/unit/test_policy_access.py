"""Submission decisions: passing cases, each failing rule on its own, every reason collected at
once, fail-closed on missing policies, and who may read a job's logs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest

from policies.access import (
    Decision,
    Outcome,
    Principal,
    Role,
    Rule,
    check_log_access,
    evaluate_submission,
)
from policies.document import PolicyDocument
from policies.errors import InvalidInput, PermissionDenied, PolicyViolation
from policies.spec import JobSpec
from tests.unit._policy_factory import (
    ALICE,
    MALLORY,
    NOW,
    OLIVIA,
    OWNERS,
    make_policy,
    make_spec,
)


def decide(
    spec: JobSpec | None = None,
    *,
    principal: Principal = ALICE,
    policies: dict[str, PolicyDocument] | None = None,
    owners: dict[str, frozenset[str]] | None = None,
    spent: dict[str, float] | None = None,
    now: dt.datetime = NOW,
) -> Decision:
    return evaluate_submission(
        spec=spec or make_spec(),
        principal=principal,
        policies={"books": make_policy()} if policies is None else policies,
        dataset_owners=OWNERS if owners is None else owners,
        epsilon_spent=spent or {},
        now=now,
    )


DP: dict[str, Any] = {
    "release": {"differential_privacy": {"epsilon_per_job": 2.0, "epsilon_budget": 5.0}}
}


# --- passing ------------------------------------------------------------------------------------


def test_automatic_policy_auto_approves_and_records_what_it_used() -> None:
    spec = make_spec()
    policy = make_policy(version=7)
    decision = decide(spec, policies={"books": policy})
    assert decision.outcome is Outcome.AUTO_APPROVE
    assert decision.reasons == () and decision.approvals == ()
    assert decision.policies == (policy.ref(),)
    assert decision.policies[0].version == 7
    assert decision.spec_digest == spec.digest()
    assert decision.principal == ALICE and decision.evaluated_at == NOW
    decision.raise_if_denied()  # does not raise
    json.dumps(decision.to_dict())  # the record is JSON-ready


def test_manual_policy_needs_one_owner() -> None:
    decision = decide(policies={"books": make_policy(approval={"mode": "manual"})})
    assert decision.outcome is Outcome.NEEDS_APPROVAL
    (req,) = decision.approvals
    assert (req.dataset, req.quorum, req.owners) == ("books", 1, OWNERS["books"])


def test_quorum_policy_names_owners_and_quorum() -> None:
    policy = make_policy(approval={"mode": "quorum", "quorum": 2})
    (req,) = decide(policies={"books": policy}).approvals
    assert (req.quorum, req.owners, req.policy) == (2, OWNERS["books"], policy.ref())


def test_named_principal_outside_the_team_is_allowed() -> None:
    policy = make_policy(access={"principals": ["mallory"]})
    assert decide(principal=MALLORY, policies={"books": policy}).outcome is Outcome.AUTO_APPROVE


def test_purposes_absent_means_any_purpose() -> None:
    policy = make_policy(access={"purposes": None})
    assert decide(make_spec(purpose="anything"), policies={"books": policy}).outcome is (
        Outcome.AUTO_APPROVE
    )


def test_custom_code_where_allowed() -> None:
    policy = make_policy(trainers={"custom_code": True})
    spec = make_spec(trainer="custom", entrypoint="train:Module")
    # Allowed, but (custom_code: true is now `reviewed`) an owner approves it even though
    # the policy's approval is automatic: its weights can carry the data.
    assert decide(spec, policies={"books": policy}).outcome is Outcome.NEEDS_APPROVAL


def test_two_datasets_only_the_manual_one_needs_approval() -> None:
    policies = {
        "books": make_policy(),
        "medical": make_policy("medical", approval={"mode": "manual"}),
    }
    decision = decide(make_spec(datasets=["medical", "books@v3"]), policies=policies)
    assert decision.outcome is Outcome.NEEDS_APPROVAL
    assert [a.dataset for a in decision.approvals] == ["medical"]
    assert [p.dataset for p in decision.policies] == ["books", "medical"]


def test_dp_within_budget_and_a_smaller_asked_epsilon() -> None:
    policy = make_policy(**DP)
    assert decide(policies={"books": policy}, spent={"books": 3.0}).outcome is (
        Outcome.AUTO_APPROVE
    )
    # 4.5 spent: the full per-job cap (2) no longer fits, but asking for 0.5 does.
    assert Rule.DP_BUDGET in decide(policies={"books": policy}, spent={"books": 4.5}).rules
    spec = make_spec(hyperparameters={"dp_epsilon": 0.5})
    decision = decide(spec, policies={"books": policy}, spent={"books": 4.5})
    assert decision.outcome is Outcome.AUTO_APPROVE
    assert decision.epsilon_spent == (("books", 4.5),)


# --- each failing rule on its own ---------------------------------------------------------------

Case = Callable[[], dict[str, Any]]

FAILING: dict[Rule, Case] = {
    Rule.ROLE: lambda: {"principal": Principal("alice", Role.COMPLIANCE, "model-team")},
    Rule.NO_POLICY: lambda: {"policies": {}},
    Rule.POLICY_MISMATCH: lambda: {"policies": {"books": make_policy("medical")}},
    Rule.EXPIRED: lambda: {"now": dt.datetime(2027, 1, 1, tzinfo=dt.UTC)},
    Rule.PRINCIPAL: lambda: {"principal": MALLORY},
    Rule.PURPOSE: lambda: {"spec": make_spec(purpose="marketing")},
    Rule.BASE_MODEL: lambda: {"spec": make_spec(base_model="huge-lm")},
    Rule.TRAINER: lambda: {"spec": make_spec(trainer="seq2seq")},
    Rule.CUSTOM_CODE: lambda: {"spec": make_spec(trainer="custom", entrypoint="m:C")},
    Rule.GPUS: lambda: {"spec": make_spec(resources={"gpus": 2})},
    Rule.CPUS: lambda: {"spec": make_spec(resources={"cpus": 4.5})},
    Rule.MEMORY: lambda: {"spec": make_spec(resources={"memory_mb": 8193})},
    Rule.TIMEOUT: lambda: {"spec": make_spec(resources={"timeout_s": 3601})},
    Rule.DP_CUSTOM_CODE: lambda: {
        "spec": make_spec(trainer="custom", entrypoint="m:C"),
        "policies": {"books": make_policy(trainers={"custom_code": True}, **DP)},
    },
    Rule.DP_EPSILON: lambda: {
        "spec": make_spec(hyperparameters={"dp_epsilon": 2.5}),
        "policies": {"books": make_policy(**DP)},
    },
    Rule.DP_BUDGET: lambda: {"policies": {"books": make_policy(**DP)}, "spent": {"books": 3.5}},
    Rule.APPROVERS: lambda: {
        "policies": {"books": make_policy(approval={"mode": "quorum", "quorum": 3})}
    },
    # 20 progress points with 4-digit losses on a 1 s grid, and 4 metrics of 6 digits, carry
    # more than the default 512 bits.
    Rule.CHANNELS: lambda: {
        "policies": {
            "books": make_policy(
                channels={"progress_points": 20, "loss_digits": 4, "time_quantum_s": 1},
                release={
                    "metrics": {
                        "allowed": ["train_loss", "eval_loss", "perplexity", "accuracy"],
                        "significant_digits": 6,
                    }
                },
            )
        }
    },
}


def test_every_rule_has_a_failing_case() -> None:
    assert set(FAILING) == set(Rule)


@pytest.mark.parametrize("rule", list(FAILING), ids=str)
def test_each_rule_alone_denies_with_exactly_that_reason(rule: Rule) -> None:
    decision = decide(**FAILING[rule]())
    assert decision.outcome is Outcome.DENY
    assert decision.rules == {rule}
    assert decision.approvals == ()
    with pytest.raises(PolicyViolation) as info:
        decision.raise_if_denied()
    assert info.value.reasons == tuple(str(r) for r in decision.reasons)


def test_every_failing_rule_is_reported_at_once() -> None:
    policy = make_policy(approval={"mode": "quorum", "quorum": 3}, **DP)
    spec = make_spec(
        purpose="marketing",
        base_model="huge-lm",
        hyperparameters={"dp_epsilon": 9},
        resources={"gpus": 2, "cpus": 8, "memory_mb": 9000, "timeout_s": 7200},
    )
    decision = decide(
        spec,
        principal=Principal("eve", Role.OPERATOR, "ops"),
        policies={"books": policy},
        spent={"books": 4.9},
        now=dt.datetime(2028, 1, 1, tzinfo=dt.UTC),
    )
    assert decision.rules == {
        Rule.ROLE,
        Rule.EXPIRED,
        Rule.PRINCIPAL,
        Rule.PURPOSE,
        Rule.BASE_MODEL,
        Rule.GPUS,
        Rule.CPUS,
        Rule.MEMORY,
        Rule.TIMEOUT,
        Rule.DP_EPSILON,
        Rule.DP_BUDGET,
        Rule.APPROVERS,
    }
    assert len(decision.reasons) == 12


def test_a_dataset_without_policy_denies_even_if_the_others_allow() -> None:
    decision = decide(make_spec(datasets=["books", "unknown"]))
    assert decision.outcome is Outcome.DENY
    assert [(r.rule, r.dataset) for r in decision.reasons] == [(Rule.NO_POLICY, "unknown")]


def test_expiry_is_exclusive_at_the_instant() -> None:
    expires = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert decide(now=expires - dt.timedelta(microseconds=1)).outcome is Outcome.AUTO_APPROVE
    assert decide(now=expires).rules == {Rule.EXPIRED}


def test_no_self_approval_even_by_an_owner_named_like_the_submitter() -> None:
    policy = make_policy(approval={"mode": "manual"}, access={"principals": ["olivia"]})
    olivia_as_team = Principal("olivia", Role.MODEL_TEAM, "model-team")
    decision = decide(principal=olivia_as_team, policies={"books": policy})
    assert decision.approvals[0].owners == frozenset({"oscar"})
    only_olivia = {"books": frozenset({"olivia"})}
    assert decide(
        principal=olivia_as_team, policies={"books": policy}, owners=only_olivia
    ).rules == {Rule.APPROVERS}


def test_manual_approval_without_owners_denies() -> None:
    policy = make_policy(approval={"mode": "manual"})
    assert decide(policies={"books": policy}, owners={}).rules == {Rule.APPROVERS}


def test_non_numeric_dp_epsilon_is_a_reason_not_a_crash() -> None:
    for bad in ("lots", True, -1, 0):
        spec = make_spec(hyperparameters={"dp_epsilon": bad})
        assert Rule.DP_EPSILON in decide(spec, policies={"books": make_policy(**DP)}).rules


@pytest.mark.parametrize("now", [dt.datetime(2026, 6, 1), "2026-06-01"])
def test_naive_or_non_datetime_now_is_refused(now: Any) -> None:
    with pytest.raises(InvalidInput, match="time zone"):
        decide(now=now)


@pytest.mark.parametrize("spent", [float("nan"), -1.0, "2"])
def test_malformed_epsilon_spent_is_refused(spent: Any) -> None:
    with pytest.raises(InvalidInput, match="epsilon spent"):
        decide(spent={"books": spent})


def test_to_dict_records_reasons() -> None:
    record = decide(make_spec(base_model="huge-lm")).to_dict()
    assert record["outcome"] == "deny"
    assert record["reasons"][0]["rule"] == "base-model"
    assert "huge-lm" in record["reasons"][0]["message"]


# --- log access ---------------------------------------------------------------------------------


def logs(
    principal: Principal, *, visible_to: str = "data-owner", datasets: Any = ("books",)
) -> None:
    check_log_access(
        principal=principal,
        submitter=ALICE,
        datasets=datasets,
        policies={
            "books": make_policy(logs={"visible_to": visible_to}),
            "medical": make_policy("medical", logs={"visible_to": visible_to}),
        },
        dataset_owners=OWNERS,
    )


def test_owner_reads_logs_model_team_does_not_by_default() -> None:
    logs(OLIVIA)
    with pytest.raises(PermissionDenied, match="books: logs are visible to data-owner only"):
        logs(ALICE)


def test_model_team_reads_logs_where_the_policy_says_so() -> None:
    logs(ALICE, visible_to="model-team")
    logs(Principal("bob", Role.MODEL_TEAM, "model-team"), visible_to="model-team")
    with pytest.raises(PermissionDenied):
        logs(MALLORY, visible_to="model-team")  # another team
    with pytest.raises(PermissionDenied):
        logs(Principal("carol", Role.COMPLIANCE, "model-team"), visible_to="model-team")


def test_owner_of_one_dataset_cannot_read_logs_that_touched_another() -> None:
    with pytest.raises(PermissionDenied) as info:
        logs(OLIVIA, datasets=("books", "medical"))
    assert "medical" in str(info.value) and "books:" not in str(info.value)


def test_logs_of_a_dataset_without_policy_are_refused() -> None:
    with pytest.raises(PermissionDenied, match="no policy"):
        logs(OLIVIA, datasets=("books", "unknown"))
    with pytest.raises(InvalidInput):
        logs(OLIVIA, datasets=())


# --- the demo's example policy ------------------------------------------------------------------

DEMO_SPEC = """\
name: books-finetune
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: style adaptation research
hyperparameters: {max_steps: 40, learning_rate: 0.002, batch_size: 8, block_size: 64, seed: 0}
resources: {cpus: 2, memory_mb: 4096, timeout_s: 900}
"""


def test_books_example_asks_an_owner_to_approve_the_demo_job() -> None:
    from importlib.resources import files

    from policies.document import parse_policy
    from policies.spec import parse_spec

    books = parse_policy((files("policies") / "examples" / "books.yaml").read_text(), version=1)
    decision = decide(parse_spec(DEMO_SPEC), policies={"books": books})
    assert decision.outcome is Outcome.NEEDS_APPROVAL, decision.reasons
    (req,) = decision.approvals
    assert (req.quorum, req.owners) == (1, OWNERS["books"])
    custom = parse_spec(DEMO_SPEC.replace("trainer: causal-lm", "trainer: custom\nentrypoint: m:C"))
    assert decide(custom, policies={"books": books}).rules == {Rule.CUSTOM_CODE}
