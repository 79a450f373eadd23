"""When the team hears of a progress point: the site reads the job's progress just before every
point of the time grid and publishes what it found at that grid point, never off the grid.

Before, a point found by a reading waited for the first reading after the next grid point and
then for the grid point after that: one to two quanta after the job wrote it, on top of the
reading interval. These tests drive :class:`enclave._channels.TeamChannel` on a fake clock and
the follower's schedule (:func:`enclave._progress.next_reading`) directly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave import _progress
from enclave._channels import READ_LEAD_S, TeamChannel
from enclave.contract import SiteReport
from policies import channels
from policies.channels import ChannelRules


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def channel(
    clock: Clock, *, quantum: float = 1.0, total: int = 10, points: int = 10
) -> tuple[TeamChannel, list[tuple[float, SiteReport]]]:
    sent: list[tuple[float, SiteReport]] = []
    team = TeamChannel(
        "job-1",
        rules=ChannelRules(progress_points=points, time_quantum_s=quantum),
        total_steps=total,
        report=lambda r: sent.append((clock.now, r)),
        clock=clock,
        sleep=clock.sleep,
    )
    team.started = True
    return team, sent


def points(sent: list[tuple[float, SiteReport]]) -> list[tuple[float, int]]:
    return [(t, r.progress[0]) for t, r in sent if r.progress is not None]


def on_grid(t: float, q: float) -> bool:
    return math.isclose(t, round(t / q) * q, abs_tol=1e-9)


@given(
    now=st.floats(0, 1e9, allow_nan=False),
    interval=st.sampled_from([0.005, 0.25, 0.5, 1.0, 2.5]),
    lead_frac=st.floats(0, 0.9),
)
def test_the_next_reading_is_the_lead_before_the_next_multiple_of_the_interval(
    now: float, interval: float, lead_frac: float
) -> None:
    lead = lead_frac * interval
    at = _progress.next_reading(now, interval, lead)
    assert at > now
    assert at - now <= interval * (1 + 1e-9) + 1e-6
    k = (at + lead) / interval
    assert math.isclose(k, round(k), abs_tol=1e-6 * max(1.0, k))


@given(quantum=st.floats(0.01, 3600, allow_nan=False))
def test_every_grid_point_is_a_reading_instant(quantum: float) -> None:
    """The reading interval divides the quantum and is at most a second: a reading falls the
    lead before every grid point, and the owners still see progress at least once a second."""
    team, _ = channel(Clock(0.0), quantum=quantum)
    interval = team.reading_interval_s
    assert interval <= 1.0 + 1e-12
    n = quantum / interval
    assert math.isclose(n, round(n), rel_tol=1e-9)
    assert 0 < team.read_lead_s <= min(READ_LEAD_S, interval / 4)


def test_the_reading_just_before_a_grid_point_publishes_at_that_grid_point() -> None:
    clock = Clock(1000.4)
    team, sent = channel(clock)
    team.on_progress((1, 10, 6.2))  # mid-interval: the point waits
    assert points(sent) == []
    clock.now = 1001.0 - team.read_lead_s  # the follower's reading before the grid point
    team.on_progress((1, 10, 6.2))
    assert points(sent) == [(1001.0, 1)]


def test_a_point_first_read_just_before_the_grid_goes_out_at_it() -> None:
    clock = Clock(1001.0 - READ_LEAD_S)
    team, sent = channel(clock)
    team.on_progress((3, 10, 6.0))
    assert points(sent) == [(1001.0, 1), (1001.0, 2), (1001.0, 3)]


def test_a_reading_far_from_the_grid_sends_nothing_and_sleeps_not() -> None:
    clock = Clock(1000.3)
    team, sent = channel(clock, quantum=30.0)
    team.on_progress((10, 10, 1.0))
    assert points(sent) == [] and clock.now == 1000.3


def test_a_reading_slowed_past_its_grid_point_waits_for_the_next_one() -> None:
    """The job slows the reading before a grid point (it writes a lot) so that the points are
    found just after it: they must go out at the next grid point, not at once, off the grid."""
    clock = Clock(1000.0)
    team, sent = channel(clock, quantum=30.0)
    team.on_progress((0, 10, 1.0))
    clock.now = 1020.0 + 0.013  # the reading meant for 1020 finished late
    team.on_progress((5, 10, 1.0))
    assert points(sent) == []
    clock.now = 1021.0 - team.read_lead_s  # the next readings, a second apart
    team.on_progress((5, 10, 1.0))
    assert points(sent) == []
    clock.now = 1050.0 - team.read_lead_s
    team.on_progress((6, 10, 1.0))
    assert [t for t, _ in points(sent)] == [1050.0] * 6


@settings(max_examples=200)
@given(
    quantum=st.sampled_from([0.5, 1.0, 2.5, 30.0]),
    readings=st.lists(
        st.tuples(st.floats(0.0, 3.0, allow_nan=False), st.integers(0, 12)),
        min_size=1,
        max_size=30,
    ),
    start=st.floats(1e6, 2e6, allow_nan=False),
)
def test_every_point_goes_out_on_the_grid_after_the_reading_that_found_it(
    quantum: float, readings: list[tuple[float, int]], start: float
) -> None:
    """Whatever the readings' times (the job can slow them) and steps (it writes what it likes),
    each point is sent once, in order, at a grid instant at or after the reading that found it,
    and the run's end flushes what is left on the grid."""
    clock = Clock(start)
    team, sent = channel(clock, quantum=quantum)
    found_at: dict[int, float] = {}
    step = 0
    for gap, advance in readings:
        clock.now += gap
        step = max(step, advance)  # the file's newest line; a step may be claimed anywhere
        t = clock.now
        schedule = channels.progress_schedule(10, 10)
        for s in schedule:
            if s <= step:
                found_at.setdefault(s, t)
        team.on_progress((step, 10, 1.0))
    team.publish(SiteReport("job-1"))
    got = points(sent)
    assert [s for _, s in got] == sorted(found_at)
    for t, s in got:
        assert on_grid(t, quantum), (t, s)
        assert t >= found_at[s] - 1e-9


def test_the_follower_waits_for_its_schedule(tmp_path: Path) -> None:
    """Readings happen on the schedule of the clock it is given: with the next reading an hour
    away, only the final reading at the end of the run reports."""
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 2, "total": 10, "loss": 1.5}\n')
    events: list[tuple[int, int, float]] = []
    with _progress.follow(
        tmp_path, events.append, interval_s=3600.0, lead_s=0.0, clock=lambda: 1.0
    ):
        time.sleep(0.05)
    assert events == [(2, 10, 1.5)]


@pytest.mark.parametrize(("interval", "lead"), [(0.0, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_the_follower_refuses_a_schedule_without_readings(
    tmp_path: Path, interval: float, lead: float
) -> None:
    with (
        pytest.raises(ValueError),
        _progress.follow(tmp_path, lambda _: None, interval_s=interval, lead_s=lead),
    ):
        pass
