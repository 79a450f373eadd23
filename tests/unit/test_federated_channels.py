"""What the team observes of a federated job is accounted and timed as a job's: one point per
round (its mean loss, coarse) in the account, the job's run time the rounds' together, and every
state and point published at a grid point of the job's time quantum, never at the moment the
round ended (which the data could shift); the owners' part goes out at once."""

from __future__ import annotations

import pytest

from enclave.contract import SiteReport
from gateway._rounds import OnGrid
from policies import access, channels
from policies.document import parse_policy
from policies.errors import PolicyViolation
from policies.lifecycle import JobState
from policies.spec import parse_spec
from tests.integration._deployment import policy

SPEC = """\
name: fed
datasets: [books-a, books-b]
base_model: tiny-lm
trainer: causal-lm-lora
purpose: testing
resources: {{timeout_s: 600}}
federation: {{rounds: {rounds}, local_steps: 5}}
"""


def test_a_federated_job_is_accounted_one_point_per_round_over_all_its_rounds() -> None:
    docs = [parse_policy(policy("books-a")), parse_policy(policy("books-b"))]
    few = access.job_account(parse_spec(SPEC.format(rounds=3)), docs)
    many = access.job_account(parse_spec(SPEC.format(rounds=9)), docs)
    rules = channels.job_channel_rules(docs)
    one = channels.account(rules, [d.release for d in docs], timeout_s=600, points=1)
    assert few.items["progress.loss"] == pytest.approx(3 * one.items["progress.loss"])
    assert many.items["progress.loss"] == pytest.approx(9 * one.items["progress.loss"])
    # The run's end can fall on any grid tick of all its rounds, not of one.
    assert many.items["time.end-of-run"] > few.items["time.end-of-run"]
    # A plan the owners' budget cannot carry is refused, with the reason.
    huge = access.job_account(parse_spec(SPEC.format(rounds=1000)), docs)
    with pytest.raises(PolicyViolation, match="per-job budget"):
        channels.check_account(huge)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.2

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_points_and_states_go_out_on_the_grid_in_order_and_the_owners_part_at_once() -> None:
    clock = _Clock()
    seen: list[tuple[float, SiteReport]] = []
    grid = OnGrid(
        lambda r: seen.append((clock.now, r)), quantum_s=5.0, clock=clock, sleep=clock.sleep
    )
    grid(SiteReport("j", audit_action="federated.left-out"))
    grid(
        SiteReport(
            "j",
            progress=(1, 3, 2.5),
            owner_progress=(1, 3, 2.4871),
            audit_action="federated.round",
            details={"round": 0},
        )
    )
    grid(SiteReport("j", state=JobState.RELEASED))
    grid.close()
    times = [t for t, _ in seen]
    kinds = [(r.audit_action, r.progress, r.owner_progress, r.state) for _, r in seen]
    assert kinds == [
        ("federated.left-out", None, None, None),
        ("federated.round", None, (1, 3, 2.4871), None),  # the owners' part: at once
        ("", (1, 3, 2.5), None, None),  # the team's: at the grid point
        ("", None, None, JobState.RELEASED),
    ]
    assert times[0] == times[1] == 100.2
    assert times[2] == pytest.approx(105.0) and times[3] == pytest.approx(105.0)
    assert all(t % 5.0 == pytest.approx(0.0) for t in times[2:])
