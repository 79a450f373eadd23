"""Property tests for the submission evaluator (hypothesis).

1. For random policies and specs, the evaluator's set of failing rules equals the one an
   independent oracle written here computes, and it allows a job exactly when that set is empty.
2. Starting from a job the policy allows, breaking any single rule yields DENY naming that rule.
3. Decisions are deterministic: the same inputs (in any mapping order) give the same decision.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.access import (
    DP_EPSILON_HYPERPARAMETER,
    Decision,
    Outcome,
    Principal,
    Role,
    Rule,
    evaluate_submission,
)
from policies.document import policy_from_mapping
from policies.spec import spec_from_mapping
from tests.unit._policy_factory import NOW

TEAMS = ["model-team", "red-team", "blue-team"]
NAMES = ["alice", "bob", "mallory", "olivia"]
MODELS = ["tiny-lm", "small-lm", "big-lm"]
TRAINERS = ["causal-lm", "causal-lm-lora", "classification"]
PURPOSES = ["research", "demo", "ads"]
OWNER_NAMES = ["olivia", "oscar", "otto"]
CPUS = [0.5, 1.0, 2.0, 4.0]
MEMORY = [512, 1024, 4096, 8192]
TIMEOUTS = [60, 600, 3600]

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass
class World:
    policy: dict[str, Any]
    spec: dict[str, Any]
    principal: Principal
    owners: frozenset[str]
    spent: float
    now: dt.datetime

    def decide(self) -> Decision:
        return evaluate_submission(
            spec=spec_from_mapping(self.spec),
            principal=self.principal,
            policies={"books": policy_from_mapping(self.policy, version=1)},
            dataset_owners={"books": self.owners},
            epsilon_spent={"books": self.spent},
            now=self.now,
        )

    def copy(self) -> World:
        return dataclasses.replace(
            self, policy=copy.deepcopy(self.policy), spec=copy.deepcopy(self.spec)
        )


def subset(pool: list[Any], min_size: int = 0) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(pool), min_size=min_size, max_size=len(pool), unique=True)


@st.composite
def policies(draw: st.DrawFn, *, min_size: int = 0) -> dict[str, Any]:
    mode = draw(st.sampled_from(["automatic", "manual", "quorum"]))
    approval: dict[str, Any] = {"mode": mode}
    if mode == "quorum":
        approval["quorum"] = draw(st.integers(2, 3))
    release: dict[str, Any] = {
        "artifacts": ["weights", "metrics"],
        "metrics": {"allowed": ["train_loss"]},
    }
    if draw(st.booleans()):
        per_job = draw(st.sampled_from([0.5, 1.0, 2.0]))
        budget = per_job * draw(st.sampled_from([1, 2, 5]))
        release["differential_privacy"] = {"epsilon_per_job": per_job, "epsilon_budget": budget}
    purposes = draw(st.one_of(st.none(), subset(PURPOSES, 1)))
    return {
        "schema": "sealroom.policy/v1",
        "dataset": "books",
        "expires": draw(st.sampled_from(["2026-06-01", "2026-06-02", "2027-01-01"])),
        "access": {
            "teams": draw(subset(TEAMS, min_size)),
            "principals": draw(subset(NAMES)),
            "purposes": purposes,
        },
        "base_models": draw(subset(MODELS, min_size)),
        "trainers": {
            "builtin": draw(subset(TRAINERS, min_size)),
            "custom_code": draw(st.booleans()),
        },
        "resources": {
            "max_gpus": draw(st.integers(0, 2)),
            "max_cpus": draw(st.sampled_from(CPUS)),
            "max_memory_mb": draw(st.sampled_from(MEMORY)),
            "max_timeout_s": draw(st.sampled_from(TIMEOUTS)),
        },
        "approval": approval,
        "release": release,
    }


@st.composite
def worlds(draw: st.DrawFn) -> World:
    trainer = draw(st.sampled_from([*TRAINERS, "custom"]))
    spec: dict[str, Any] = {
        "name": "job",
        "datasets": ["books"],
        "base_model": draw(st.sampled_from(MODELS)),
        "trainer": trainer,
        "purpose": draw(st.sampled_from([*PURPOSES, ""])),
        "resources": {
            "gpus": draw(st.integers(0, 2)),
            "cpus": draw(st.sampled_from(CPUS)),
            "memory_mb": draw(st.sampled_from(MEMORY)),
            "timeout_s": draw(st.sampled_from(TIMEOUTS)),
        },
        "hyperparameters": {},
    }
    if trainer == "custom":
        spec["entrypoint"] = "train:Module"
    if draw(st.booleans()):
        spec["hyperparameters"][DP_EPSILON_HYPERPARAMETER] = draw(
            st.one_of(st.sampled_from([0.25, 0.5, 1.0, 3.0, 0, -1]), st.just("much"))
        )
    role = draw(st.sampled_from([Role.MODEL_TEAM, Role.MODEL_TEAM, Role.DATA_OWNER, Role.OPERATOR]))
    principal = Principal(draw(st.sampled_from(NAMES)), role, draw(st.sampled_from(TEAMS)))
    return World(
        policy=draw(policies()),
        spec=spec,
        principal=principal,
        owners=frozenset(draw(subset([*OWNER_NAMES, "alice"]))),
        spent=draw(st.sampled_from([0.0, 0.5, 1.0, 4.0, 9.5])),
        now=NOW + dt.timedelta(hours=draw(st.sampled_from([-1, 0, 12, 24]))),
    )


def oracle(w: World) -> set[Rule]:
    """The rules ``w`` breaks, written from the policy issue's words, not from the evaluator."""
    p, s, who = w.policy, w.spec, w.principal
    broken: set[Rule] = set()
    if who.role != Role.MODEL_TEAM:
        broken.add(Rule.ROLE)
    expires = dt.datetime.fromisoformat(p["expires"]).replace(tzinfo=dt.UTC)
    if w.now >= expires:
        broken.add(Rule.EXPIRED)
    if who.team not in p["access"]["teams"] and who.name not in p["access"]["principals"]:
        broken.add(Rule.PRINCIPAL)
    if p["access"]["purposes"] is not None and s["purpose"] not in p["access"]["purposes"]:
        broken.add(Rule.PURPOSE)
    if s["base_model"] not in p["base_models"]:
        broken.add(Rule.BASE_MODEL)
    custom = s["trainer"] == "custom"
    if custom and not p["trainers"]["custom_code"]:
        broken.add(Rule.CUSTOM_CODE)
    if not custom and s["trainer"] not in p["trainers"]["builtin"]:
        broken.add(Rule.TRAINER)
    caps, asked = p["resources"], s["resources"]
    for rule, key in ((Rule.GPUS, "gpus"), (Rule.CPUS, "cpus"), (Rule.MEMORY, "memory_mb")):
        if asked[key] > caps[f"max_{key}"]:
            broken.add(rule)
    if asked["timeout_s"] > caps["max_timeout_s"]:
        broken.add(Rule.TIMEOUT)
    dp = p["release"].get("differential_privacy")
    if dp is not None:
        if custom:
            broken.add(Rule.DP_CUSTOM_CODE)
        charge = dp["epsilon_per_job"]
        if DP_EPSILON_HYPERPARAMETER in s["hyperparameters"]:
            eps = s["hyperparameters"][DP_EPSILON_HYPERPARAMETER]
            if isinstance(eps, str) or eps <= 0 or eps > dp["epsilon_per_job"]:
                broken.add(Rule.DP_EPSILON)
            else:
                charge = eps
        if w.spent + charge > dp["epsilon_budget"]:
            broken.add(Rule.DP_BUDGET)
    mode = p["approval"]["mode"]
    if mode != "automatic" or _reviewed_custom(w):
        # Reviewed custom code is approved by an owner even where the policy is automatic.
        needed = p["approval"]["quorum"] if mode == "quorum" else 1
        if len(w.owners - {who.name}) < needed:
            broken.add(Rule.APPROVERS)
    if not broken and p.get("channels", {}).get("job_budget_bits", 512) < 16:
        # The leakage account is weighed once the job could run at all.
        broken.add(Rule.CHANNELS)
    return broken


def _reviewed_custom(w: World) -> bool:
    """The team's own Python on a dataset whose policy says ``custom_code: true``/``reviewed``."""
    return w.spec["trainer"] == "custom" and w.policy["trainers"]["custom_code"] in (
        True,
        "reviewed",
    )


@PROPS
@given(worlds())
def test_evaluator_denies_exactly_what_the_oracle_denies(w: World) -> None:
    decision = w.decide()
    expected = oracle(w)
    assert decision.rules == expected
    assert (decision.outcome is Outcome.DENY) == bool(expected)
    if decision.outcome is not Outcome.DENY:
        needs = w.policy["approval"]["mode"] != "automatic" or _reviewed_custom(w)
        assert (decision.outcome is Outcome.NEEDS_APPROVAL) == needs
        assert all(w.principal.name not in a.owners for a in decision.approvals)


# --- one rule broken at a time ------------------------------------------------------------------


@st.composite
def allowed_worlds(draw: st.DrawFn) -> World:
    """A world the policy allows, built from the policy's own lists."""
    policy = draw(policies(min_size=1))
    policy["expires"] = "2027-01-01"
    policy["access"]["teams"] = sorted({*policy["access"]["teams"], "model-team"})
    caps = policy["resources"]
    dp = policy["release"].get("differential_privacy")
    purposes = policy["access"]["purposes"]
    spec: dict[str, Any] = {
        "name": "job",
        "datasets": ["books"],
        "base_model": draw(st.sampled_from(policy["base_models"])),
        "trainer": draw(st.sampled_from(policy["trainers"]["builtin"])),
        "purpose": draw(st.sampled_from(purposes)) if purposes else "anything",
        "resources": {
            "gpus": draw(st.integers(0, caps["max_gpus"])),
            "cpus": draw(st.sampled_from([c for c in CPUS if c <= caps["max_cpus"]])),
            "memory_mb": draw(st.sampled_from([m for m in MEMORY if m <= caps["max_memory_mb"]])),
            "timeout_s": draw(st.sampled_from([t for t in TIMEOUTS if t <= caps["max_timeout_s"]])),
        },
        "hyperparameters": {},
    }
    spent = 0.0 if dp is None else dp["epsilon_budget"] - dp["epsilon_per_job"]
    return World(
        policy=policy,
        spec=spec,
        principal=Principal("alice", Role.MODEL_TEAM, "model-team"),
        owners=frozenset(OWNER_NAMES),
        spent=spent,
        now=NOW,
    )


def _break(rule: Rule, w: World) -> World:
    """``w`` changed so that it breaks ``rule`` (and, where unavoidable, rules that go with it)."""
    w = w.copy()
    p, s = w.policy, w.spec
    if rule is Rule.ROLE:
        w.principal = dataclasses.replace(w.principal, role=Role.COMPLIANCE)
    elif rule is Rule.EXPIRED:
        w.now = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    elif rule is Rule.PRINCIPAL:
        w.principal = Principal("zed", Role.MODEL_TEAM, "zed-team")
    elif rule is Rule.PURPOSE:
        p["access"]["purposes"] = ["research"]
        s["purpose"] = "ads"
    elif rule is Rule.BASE_MODEL:
        s["base_model"] = "other-lm"
    elif rule is Rule.TRAINER:
        s["trainer"] = "seq2seq"
    elif rule is Rule.CUSTOM_CODE:
        p["trainers"]["custom_code"] = False
        s["trainer"], s["entrypoint"] = "custom", "train:Module"
    elif rule in (Rule.GPUS, Rule.CPUS, Rule.MEMORY, Rule.TIMEOUT):
        key = {Rule.GPUS: "gpus", Rule.CPUS: "cpus", Rule.MEMORY: "memory_mb"}.get(
            rule, "timeout_s"
        )
        s["resources"][key] = p["resources"][f"max_{key}"] + 1
    elif rule is Rule.DP_CUSTOM_CODE:
        p["trainers"]["custom_code"] = True
        p["release"]["differential_privacy"] = {"epsilon_per_job": 1.0, "epsilon_budget": 2.0}
        s["trainer"], s["entrypoint"] = "custom", "train:Module"
        w.spent = 0.0
    elif rule is Rule.DP_EPSILON:
        p["release"]["differential_privacy"] = {"epsilon_per_job": 1.0, "epsilon_budget": 9.0}
        s["hyperparameters"][DP_EPSILON_HYPERPARAMETER] = 1.5
        w.spent = 0.0
    elif rule is Rule.DP_BUDGET:
        p["release"]["differential_privacy"] = {"epsilon_per_job": 1.0, "epsilon_budget": 2.0}
        w.spent = 1.5
    elif rule is Rule.APPROVERS:
        p["approval"] = {"mode": "quorum", "quorum": 3}
        w.owners = frozenset(OWNER_NAMES[:2])
    elif rule is Rule.CHANNELS:
        # No job's observable channels fit in one bit: progress, metrics and the outcome alone
        # carry more.
        p["channels"] = {"job_budget_bits": 1}
    elif rule is Rule.NO_POLICY or rule is Rule.POLICY_MISMATCH:
        p["dataset"] = "medical"  # filed under "books": a mismatch; NO_POLICY is below
    return w


BREAKABLE = [r for r in Rule if r is not Rule.NO_POLICY]


@PROPS
@given(allowed_worlds(), st.sampled_from(BREAKABLE))
def test_breaking_any_single_rule_denies_naming_it(w: World, rule: Rule) -> None:
    assert w.decide().outcome is not Outcome.DENY, w.decide().reasons
    broken = _break(rule, w)
    decision = broken.decide()
    assert decision.outcome is Outcome.DENY
    assert rule in decision.rules
    assert decision.approvals == ()


@settings(PROPS, max_examples=50)
@given(allowed_worlds())
def test_a_missing_policy_denies(w: World) -> None:
    decision = evaluate_submission(
        spec=spec_from_mapping({**w.spec, "datasets": ["books", "extra"]}),
        principal=w.principal,
        policies={"books": policy_from_mapping(w.policy)},
        dataset_owners={"books": w.owners},
        epsilon_spent={},
        now=w.now,
    )
    assert decision.outcome is Outcome.DENY
    assert decision.rules == {Rule.NO_POLICY}


# --- determinism --------------------------------------------------------------------------------


@PROPS
@given(worlds(), policies())
def test_decisions_are_deterministic_and_order_free(w: World, other: dict[str, Any]) -> None:
    other = {**other, "dataset": "medical"}
    spec = spec_from_mapping({**w.spec, "datasets": ["books", "medical"]})
    books, medical = policy_from_mapping(w.policy), policy_from_mapping(other)
    owners = {"books": w.owners, "medical": frozenset({"mona", "max"})}
    first = evaluate_submission(
        spec=spec,
        principal=w.principal,
        policies={"books": books, "medical": medical},
        dataset_owners=owners,
        epsilon_spent={"books": w.spent, "medical": 0.0},
        now=w.now,
    )
    again = evaluate_submission(
        spec=spec,
        principal=w.principal,
        policies={"medical": policy_from_mapping(other), "books": policy_from_mapping(w.policy)},
        dataset_owners=dict(reversed(list(owners.items()))),
        epsilon_spent={"medical": 0.0, "books": w.spent},
        now=w.now,
    )
    assert first == again
    assert first.to_dict() == again.to_dict()
