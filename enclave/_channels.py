"""The site's side of the leakage account: what it lets the model team observe, and when.

The site trusts no gateway, so it coarsens before anything leaves it (:mod:`policies.channels`
holds the rules and the arithmetic):

* :class:`TeamChannel` turns the job's progress file into the scheduled points (steps fixed in
  advance, losses rounded) published on the job's time grid, passes the full progress to the
  owners only, and holds every state the job could have influenced until the next grid point;
* :func:`failure_reason` says why a run failed in the fixed vocabulary, the details aside;
* :class:`BitsLedger` charges each dataset, in a file of the site's own, the capacity of every
  job that starts on it, and refuses a job past the dataset's budget.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from enclave.contract import Report, SiteReport
from enclave.runtime import ContainerStatus, RunState
from enclave.secretfile import write_secret
from policies import channels
from policies.channels import ChannelRules, TeamReason
from policies.errors import SiteError
from policies.lifecycle import JobState

Progress = tuple[int, int, float]


READ_LEAD_S = 0.05
"""How long before each grid point the site reads the job's progress (see :meth:`TeamChannel.
on_progress`): enough for a reading and the owners' report, so that the points it finds go out
at that grid point."""
MAX_READING_INTERVAL_S = 1.0
"""The owners' full progress is read at least this often."""


class TeamChannel:
    """One run's publications to the model team.

    ``clock`` and ``sleep`` are the wall clock and a sleep (tests pass their own). A state is
    published at the first grid point at or after the moment it is known; the team sees times
    rounded down to the grid, so the moment within the grid never shows.

    The site's follower reads the progress file at :attr:`reading_interval_s` steps that divide
    the quantum, :attr:`read_lead_s` before each (:func:`enclave._progress.follow`), so one
    reading falls just before every grid point: the points it finds are published at that grid
    point. A point therefore reaches the team at the first grid point after the job wrote it
    (give or take the lead), never later; nothing about when it goes out depends on the job.
    """

    def __init__(
        self,
        job_id: str,
        *,
        rules: ChannelRules,
        total_steps: int,
        report: Report,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.job_id = job_id
        self.rules = rules
        self.total_steps = total_steps
        self._report = report
        self._clock = clock
        self._sleep = sleep
        self._schedule = channels.progress_schedule(total_steps, rules.progress_points)
        self._next = 0  # index of the next scheduled point not yet reached
        self._pending: list[Progress] = []
        self._pending_tick = 0
        self._lock = threading.Lock()
        self.started = False

    # -- progress ---------------------------------------------------------------------------

    @property
    def reading_interval_s(self) -> float:
        """How often the follower reads: the quantum divided into steps of at most
        :data:`MAX_READING_INTERVAL_S`, so every grid point is a reading instant."""
        q = self.rules.time_quantum_s
        return q / math.ceil(q / MAX_READING_INTERVAL_S)

    @property
    def read_lead_s(self) -> float:
        """How long before each reading instant the follower reads."""
        return min(READ_LEAD_S, self.reading_interval_s / 4)

    def on_progress(self, progress: Progress) -> None:
        """One reading of the job's progress: the owners get it whole; the team gets each
        scheduled point the job has passed, with the loss rounded, at the next grid point.

        Points go out at a grid instant, never at the moment of a reading: the job can shift
        when the site reads its file (a slow read), not when the team hears of it. A reading
        within the lead of a grid point waits for it and publishes what is pending; a reading
        that finds points pending since an earlier grid interval (a reading slowed past its
        grid point) publishes them at the next grid point."""
        self._report(SiteReport(self.job_id, owner_progress=progress))
        step, _, loss = progress
        with self._lock:
            due = bool(self._pending) and self._tick(self._clock()) > self._pending_tick
        if due:
            self.wait_for_grid()
            self.flush()
        now = self._clock()
        tick = self._tick(now)
        with self._lock:
            shown = channels.coarse_loss(loss, self.rules.loss_digits)
            while self._next < len(self._schedule) and step >= self._schedule[self._next]:
                self._pending.append((self._schedule[self._next], self.total_steps, shown))
                self._pending_tick = tick
                self._next += 1
            near = channels.next_tick(now, self.rules.time_quantum_s) - now <= 2 * self.read_lead_s
            flush_now = bool(self._pending) and self.started and near
        if flush_now:  # the reading just before a grid point: publish at that grid point
            self.wait_for_grid()
            self.flush()

    def flush(self) -> None:
        """Publish the points still waiting (called on a grid point, as the run ends)."""
        with self._lock:
            self._publish_pending()

    def _publish_pending(self) -> None:
        for point in self._pending:
            self._report(SiteReport(self.job_id, progress=point))
        self._pending.clear()

    # -- states -----------------------------------------------------------------------------

    def _tick(self, now: float) -> int:
        return math.floor(now / self.rules.time_quantum_s)

    def wait_for_grid(self) -> None:
        """Sleep until the next grid point (none when the run has not started)."""
        if not self.started:
            return
        target = channels.next_tick(self._clock(), self.rules.time_quantum_s)
        while (left := target - self._clock()) > 0:
            self._sleep(left)

    def deadline(self, span_s: float) -> float:
        """The grid point ``span_s`` seconds from now or just after it."""
        return channels.next_tick(self._clock() + span_s, self.rules.time_quantum_s)

    def publish(self, report: SiteReport) -> None:
        """Report a state the job could have influenced, on the grid."""
        self.wait_for_grid()
        self.flush()
        self._report(report)


class OwnersChannel(TeamChannel):
    """A federated round's publications: every reading to the owners at once, nothing on the
    team's grid. The team sees a round only as its aggregate, which the gateway publishes on
    the grid; what one site's round did stays with that site's owners."""

    def __init__(self, job_id: str, *, report: Report) -> None:
        super().__init__(job_id, rules=channels.ChannelRules(), total_steps=1, report=report)

    def on_progress(self, progress: Progress) -> None:
        self._report(SiteReport(self.job_id, owner_progress=progress))

    def wait_for_grid(self) -> None:
        return

    def publish(self, report: SiteReport) -> None:
        self._report(report)


class Background:
    """A call run on its own thread, whose result the caller waits for up to a deadline (the
    release gate: when it overruns, the run's end is published at the deadline all the same)."""

    def __init__(self, call: Callable[[], SiteReport]) -> None:
        self._result: SiteReport | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], SiteReport]) -> None:
        try:
            self._result = call()
        except BaseException as e:  # handed to the waiting caller
            self._error = e

    def result(self, *, timeout_s: float) -> SiteReport | None:
        """The call's result; None if it is still running after ``timeout_s``. Re-raises
        what the call raised."""
        self._thread.join(max(0.0, timeout_s))
        if self._thread.is_alive():
            return None
        if self._error is not None:
            raise self._error
        return self._result

    def join(self) -> None:
        self._thread.join()


def failure_reason(status: ContainerStatus) -> TeamReason:
    """Why a run failed, in the team's vocabulary (the exit code and the runtime's notes are
    details for the owners)."""
    if status.state is RunState.KILLED_TIMEOUT:
        return TeamReason.FAILED_TIMEOUT
    if status.state is RunState.KILLED_OOM or status.oom_killed:
        return TeamReason.FAILED_MEMORY
    if status.at_pids_limit:
        return TeamReason.FAILED_LIMIT
    return TeamReason.FAILED_EXIT


def terminal(job_id: str, state: JobState, reason: TeamReason, detail: str = "") -> SiteReport:
    return SiteReport(job_id, state=state, reason=reason, detail=detail)


class BitsLedger:
    """Per dataset, the channel bits of every job that started on it, in the site's own file.

    The gateway keeps the same tally to refuse early with a clear reason; this one is the one
    the site enforces, since it trusts no gateway. One JSON object, rewritten atomically.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def spent(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SiteError(f"the channel ledger {self.path.name} cannot be read") from e
        if not isinstance(raw, dict) or not all(
            isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in raw.values()
        ):
            raise SiteError(f"the channel ledger {self.path.name} is malformed")
        return {str(k): float(v) for k, v in raw.items()}

    def charge(
        self,
        account: channels.LeakageAccount,
        *,
        datasets: Iterable[str],
        budgets: Mapping[str, float],
    ) -> None:
        """Charge ``account`` to each dataset, or raise :class:`PolicyViolation` (charging
        nothing) when the job's account or a dataset's total would exceed its budget."""
        names = sorted(set(datasets))
        with self._lock:
            spent = self.spent()
            channels.check_account(
                account, spent=spent, dataset_budgets={n: budgets[n] for n in names}
            )
            for name in names:
                spent[name] = spent.get(name, 0.0) + account.total
            data = json.dumps(spent, sort_keys=True).encode()
            write_secret(self.path, data)
