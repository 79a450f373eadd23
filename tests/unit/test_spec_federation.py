"""The ``federation:`` block of a job spec: the round plan every owner's approval covers. A
plan that could not run as written is refused naming the field (and the line), and the plan is
in the spec's digest, so changing any of it needs new approvals; a spec without one keeps the
digest it had before federated jobs existed."""

from __future__ import annotations

import pytest

from policies.errors import SpecError
from policies.federation import FederationPlan
from policies.spec import parse_spec, spec_from_mapping

BASE = """\
name: fed
datasets: [books-a, books-b, books-c]
base_model: tiny-lm
trainer: causal-lm-lora
purpose: testing
hyperparameters: {learning_rate: 0.001, batch_size: 4}
"""
PLAN = """\
federation:
  rounds: 5
  local_steps: 20
  min_sites: 2
"""


def test_a_plan_parses_with_its_defaults_and_round_trips() -> None:
    spec = parse_spec(BASE + PLAN)
    assert spec.is_federated
    assert spec.federation == FederationPlan(rounds=5, local_steps=20)
    assert spec.federation.aggregation == "fedavg" and spec.federation.weight_by == "examples"
    assert spec.federation.total_steps == 100
    again = spec_from_mapping(spec.to_dict())
    assert again == spec and again.digest() == spec.digest()


def test_fedprox_takes_its_mu() -> None:
    spec = parse_spec(
        BASE + PLAN + "  aggregation: fedprox\n  proximal_mu: 0.01\n  weight_by: tokens\n"
    )
    assert spec.federation is not None
    assert (spec.federation.aggregation, spec.federation.proximal_mu) == ("fedprox", 0.01)
    assert spec.federation.weight_by == "tokens"


def test_the_plan_is_in_the_digest_and_an_unfederated_spec_keeps_its_own() -> None:
    plain = parse_spec(BASE)
    assert not plain.is_federated and "federation" not in plain.to_dict()
    digests = {
        parse_spec(BASE + PLAN).digest(),
        parse_spec(BASE + PLAN.replace("rounds: 5", "rounds: 6")).digest(),
        parse_spec(BASE + PLAN.replace("min_sites: 2", "min_sites: 3")).digest(),
        parse_spec(BASE + PLAN + "  update_clip: 0.5\n").digest(),
        plain.digest(),
    }
    assert len(digests) == 5


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (BASE + PLAN.replace("rounds: 5", "rounds: 0"), r"line 8: federation\.rounds"),
        (BASE + PLAN.replace("rounds: 5", "rounds: 1001"), r"federation\.rounds"),
        (BASE + PLAN.replace("local_steps: 20", "local_steps: -1"), r"federation\.local_steps"),
        (BASE + PLAN.replace("min_sites: 2", "min_sites: 1"), r"federation\.min_sites"),
        (BASE + PLAN.replace("min_sites: 2", "min_sites: 4"), "cannot take part with 3"),
        (BASE + PLAN + "  aggregation: fedprox\n", "proximal_mu: required"),
        (BASE + PLAN + "  proximal_mu: 0.1\n", "only with aggregation 'fedprox'"),
        (BASE + PLAN + "  aggregation: median\n", r"federation\.aggregation"),
        (BASE + PLAN + "  weight_by: rows\n", r"federation\.weight_by"),
        (BASE + PLAN + "  update_clip: 0\n", r"federation\.update_clip"),
        (BASE + PLAN + "  secure: false\n", r"federation\.secure"),
        (BASE + PLAN.replace("rounds: 5", "rounds: '5'"), r"federation\.rounds"),
        (BASE.replace("[books-a, books-b, books-c]", "[books-a]") + PLAN, "two or more"),
        (
            BASE.replace("trainer: causal-lm-lora", "trainer: custom\nentrypoint: m:C") + PLAN,
            "line 4: trainer: a federated job runs a built-in trainer",
        ),
        (
            BASE.replace("trainer: causal-lm-lora", "trainer: private") + PLAN,
            "not 'private'",
        ),
        (
            BASE.replace("trainer: causal-lm-lora", "trainer: classification") + PLAN,
            "line 6: hyperparameters.labels: a federated classifier names its labels",
        ),
        (
            BASE.replace("batch_size: 4}", "batch_size: 4, max_steps: 9}") + PLAN,
            "rounds times local_steps",
        ),
    ],
)
def test_plans_that_could_not_run_as_written_are_refused(spec: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_spec(spec)
