"""The site's side of the account: what it lets out, when, and what it charges (no Docker)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from enclave._channels import Background, BitsLedger, TeamChannel, failure_reason
from enclave.contract import SiteReport
from enclave.runtime import ContainerStatus, RunState
from policies.channels import ChannelRules, LeakageAccount, TeamReason
from policies.errors import PolicyViolation, SiteError
from policies.lifecycle import JobState


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def channel(clock: Clock, *, points: int = 4, quantum: float = 30.0, total: int = 100):
    sent: list[SiteReport] = []
    team = TeamChannel(
        "job-1",
        rules=ChannelRules(progress_points=points, time_quantum_s=quantum),
        total_steps=total,
        report=sent.append,
        clock=clock,
        sleep=clock.sleep,
    )
    team.started = True
    return team, sent


def team_points(sent: list[SiteReport]) -> list[tuple[int, int, float]]:
    return [r.progress for r in sent if r.progress is not None]


def test_full_precision_progress_reaches_the_owners_only() -> None:
    clock = Clock(1000.0)
    team, sent = channel(clock)
    team.on_progress((7, 100, 3.14159265))
    owners = [r.owner_progress for r in sent if r.owner_progress is not None]
    assert owners == [(7, 100, 3.14159265)]
    assert team_points(sent) == []  # no scheduled point passed


def test_points_are_the_schedule_with_rounded_loss_on_the_next_grid_tick() -> None:
    clock = Clock(1000.0)  # 1000 = 33 * 30 + 10: inside a grid interval
    team, sent = channel(clock)
    # The job claims odd steps and totals and a loss full of digits: only the site's schedule
    # (25, 50, 75, 100 of the site's 100 steps) and 2 digits of loss come out.
    team.on_progress((61, 999_999, 2.718281828))
    assert team_points(sent) == []  # waits for the next grid point
    clock.now = 1019.0
    team.on_progress((62, 5, 1.23456))
    assert team_points(sent) == []  # still the same grid interval
    clock.now = 1020.5
    team.on_progress((63, 5, 1.23456))
    assert team_points(sent) == [(25, 100, 2.7), (50, 100, 2.7)]


def test_points_pass_once_and_in_order_however_steps_move() -> None:
    clock = Clock(0.0)
    team, sent = channel(clock)
    for step in (80, 10, 90, 100, 0, 100):
        team.on_progress((step, 100, 1.0))
        clock.now += 30
    team.flush()
    steps = [p[0] for p in team_points(sent)]
    assert steps == [25, 50, 75, 100]


def test_states_wait_for_the_grid() -> None:
    clock = Clock(1000.0)
    team, sent = channel(clock)
    team.publish(SiteReport("job-1", state=JobState.CHECKING, reason=TeamReason.CHECKING))
    assert clock.now == 1020.0  # the next multiple of 30
    assert sent[-1].state is JobState.CHECKING
    team.publish(SiteReport("job-1", state=JobState.RELEASED, reason=TeamReason.RELEASED))
    assert clock.now == 1020.0  # already on the grid: no wait


def test_a_run_that_never_started_waits_for_nothing() -> None:
    clock = Clock(1000.0)
    team, sent = channel(clock)
    team.started = False
    team.publish(SiteReport("job-1", state=JobState.ERROR, reason=TeamReason.ERROR))
    assert clock.slept == []
    assert [r.state for r in sent] == [JobState.ERROR]


def test_pending_points_go_out_before_the_end() -> None:
    clock = Clock(1000.0)
    team, sent = channel(clock)
    team.on_progress((100, 100, 0.5))
    team.publish(SiteReport("job-1", state=JobState.CHECKING))
    kinds = ["point" if r.progress else r.state for r in sent if r.owner_progress is None]
    assert kinds == ["point"] * 4 + [JobState.CHECKING]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (ContainerStatus(RunState.EXITED, exit_code=51), TeamReason.FAILED_EXIT),
        (ContainerStatus(RunState.EXITED, exit_code=3, reason="exited with code 3"), None),
        (ContainerStatus(RunState.EXITED, exit_code=1, at_pids_limit=True), None),
        (ContainerStatus(RunState.KILLED_TIMEOUT), TeamReason.FAILED_TIMEOUT),
        (ContainerStatus(RunState.KILLED_OOM, oom_killed=True), TeamReason.FAILED_MEMORY),
        (ContainerStatus(RunState.KILLED_TIMEOUT, at_pids_limit=True), TeamReason.FAILED_TIMEOUT),
    ],
)
def test_failures_say_a_fixed_reason(status: ContainerStatus, reason: TeamReason | None) -> None:
    said = failure_reason(status)
    assert said in TeamReason
    if reason is not None:
        assert said is reason
    elif status.at_pids_limit:
        assert said is TeamReason.FAILED_LIMIT
    else:
        assert said is TeamReason.FAILED_EXIT
    assert not any(ch.isdigit() for ch in said.value)


def account(bits: float, budget: float = 512) -> LeakageAccount:
    return LeakageAccount({"metrics": bits}, budget)


def test_ledger_charges_each_dataset_and_refuses_past_its_budget(tmp_path: Path) -> None:
    ledger = BitsLedger(tmp_path / "bits.json")
    budgets = {"books": 1000.0, "medical": 600.0}
    ledger.charge(account(300), datasets=["books", "medical"], budgets=budgets)
    assert ledger.spent() == {"books": 300.0, "medical": 300.0}
    assert stat.S_IMODE(os.stat(tmp_path / "bits.json").st_mode) == 0o600
    with pytest.raises(PolicyViolation, match="medical"):
        ledger.charge(account(301), datasets=["books", "medical"], budgets=budgets)
    # Refused whole: nothing was charged to books either.
    assert ledger.spent() == {"books": 300.0, "medical": 300.0}
    with pytest.raises(PolicyViolation, match="per-job"):
        ledger.charge(account(600, budget=512), datasets=["books"], budgets=budgets)


@pytest.mark.parametrize("content", [b"[1]", b'{"books": -5}', b'{"books": NaN}', b"\xff"])
def test_a_tampered_ledger_stops_runs(tmp_path: Path, content: bytes) -> None:
    """A ledger edited to a negative or odd value must not hand out budget: it fails closed."""
    path = tmp_path / "bits.json"
    path.write_bytes(content)
    with pytest.raises(SiteError):
        BitsLedger(path).charge(account(1), datasets=["books"], budgets={"books": 1e9})


def test_concurrent_charges_are_all_counted(tmp_path: Path) -> None:
    ledger = BitsLedger(tmp_path / "bits.json")

    def charge() -> None:
        ledger.charge(account(1), datasets=["books"], budgets={"books": 1e9})

    threads = [threading.Thread(target=charge) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "bits.json").read_text()) == {"books": 16.0}


def test_background_gives_up_at_the_deadline_and_reraises() -> None:
    release = threading.Event()

    def slow() -> SiteReport:
        release.wait(5)
        return SiteReport("job-1")

    started = time.monotonic()
    gate = Background(slow)
    assert gate.result(timeout_s=0.2) is None
    assert time.monotonic() - started < 2
    release.set()
    gate.join()

    def broken() -> SiteReport:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        Background(broken).result(timeout_s=5)
