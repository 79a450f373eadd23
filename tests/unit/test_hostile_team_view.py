"""Hostile review of what a model-team principal can observe of a job (issue 13, item 2).

Each test plays a job (through a fake site) or a model team (through :class:`Gateway`) that
tries one way around the leakage account, and asserts the safe behaviour: what the team sees
is the coarse view the account counted, and the account counts what the team sees. No Docker.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave._channels import TeamChannel
from enclave.audit import AuditLog
from enclave.contract import Report, RunOrder, SiteReport
from enclave.provenance import AuditPosition
from gateway._views import JobEvent
from gateway.core import Gateway
from gateway.store import Store
from policies import access, channels, document
from policies.channels import ChannelRules, TeamReason
from policies.errors import PolicyDocumentError
from policies.lifecycle import TERMINAL, JobState
from policies.release import MemorizationFigures, decide_memorization
from policies.spec import parse_spec
from tests.integration._deployment import policy
from tests.unit.test_gateway_core import OLIVIA, THEO, ScriptedSite, _register, spec

SECRET_DETAIL = "release refused: books: weights: tensor 'model.secret' shape [51, 7]"


def _gateway(home: Path, site: ScriptedSite) -> Gateway:
    home.mkdir()
    audit = AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate())
    return Gateway(home=home, store=Store(home / "state.db"), audit=audit, site=site)


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[object]:
    made: list[Gateway] = []

    def make(site: ScriptedSite, name: str = "gw") -> Gateway:
        g = _gateway(tmp_path / name, site)
        _register(g, tmp_path / name)
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()
        g.audit.close()


def _wait_state(g: Gateway, job_id: str, states: set[JobState], *, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if g.store.job(job_id).state in states:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} is {g.store.job(job_id).state}, not in {states}")


def _run_approved(g: Gateway) -> str:
    job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="ok")
    return job.id


# --- CancelJob answers with the raw record -----------------------------------------------------


class GateEndsDuringCancelSite(ScriptedSite):
    """The job's release checks end (refused, with the owners' details) while the team's
    cancel is on its way to the site: the terminal report lands before cancel returns."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.report: Report | None = None
        self.checking = threading.Event()
        self.ended = threading.Event()

    def run(self, order: RunOrder, report: Report) -> None:
        self.orders.append(order)
        self.report = report
        job = order.job_id
        report(SiteReport(job, state=JobState.RUNNING, reason=TeamReason.RUNNING))
        report(SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING))
        self.checking.set()
        self.ended.wait(10)

    def cancel(self, job_id: str) -> None:
        assert self.report is not None
        self.report(
            SiteReport(
                job_id,
                state=JobState.REJECTED,
                reason=TeamReason.REJECTED_WEIGHTS,
                detail=SECRET_DETAIL,
            )
        )
        self.ended.set()


def test_team_cancel_racing_the_end_of_the_checks_gets_no_owner_details(
    tmp_path: Path, make_gateway
) -> None:
    """A team that cancels its job right at the grid point where the checks end must get the
    coarse view in the answer, never the owners' details (which tensor, which shape, which
    exit code) nor a fine time."""
    site = GateEndsDuringCancelSite(tmp_path)
    g = make_gateway(site)
    g.start()
    job_id = _run_approved(g)
    assert site.checking.wait(10)
    answer = g.cancel(principal=THEO, job_id=job_id, reason="")
    assert answer.details == ()
    assert SECRET_DETAIL not in " ".join(answer.reasons)
    assert answer == g.job(principal=THEO, job_id=job_id)  # the team's coarse view, exactly


# --- WatchJob stalls once the owners' progress fills the history --------------------------------


class OwnerProgressFloodSite(ScriptedSite):
    """A job that writes progress for a long run: the site forwards the full progress to the
    owners once a second (here 1100 readings), then the run ends."""

    def __init__(self, tmp: Path, readings: int = 1100) -> None:
        super().__init__(tmp)
        self.readings = readings
        self.flooded = threading.Event()
        self.proceed = threading.Event()

    def run(self, order: RunOrder, report: Report) -> None:
        self.orders.append(order)
        job = order.job_id
        report(SiteReport(job, state=JobState.RUNNING, reason=TeamReason.RUNNING))
        for i in range(self.readings):
            report(SiteReport(job, owner_progress=(i, self.readings, 1.0 / (i + 1))))
        self.flooded.set()
        self.proceed.wait(10)
        report(SiteReport(job, progress=(100, 100, 0.5)))
        report(SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING))
        report(
            SiteReport(
                job,
                state=JobState.REJECTED,
                reason=TeamReason.REJECTED_WEIGHTS,
                detail=SECRET_DETAIL,
            )
        )


def test_team_watch_sees_the_end_of_a_job_that_flooded_the_owners_progress(
    tmp_path: Path, make_gateway
) -> None:
    """The job decides how many owners-only progress events there are (when it starts writing
    progress): that must not decide which events the team's watch shows, nor stall it."""
    site = OwnerProgressFloodSite(tmp_path)
    g = make_gateway(site)
    g.start()
    job_id = _run_approved(g)
    assert site.flooded.wait(10)
    got: list[JobEvent] = []

    def watch() -> None:
        for e in g.watch(principal=THEO, job_id=job_id, poll_s=0.05):
            got.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 5
    while not any(e.state is JobState.RUNNING for e in got) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the watcher has read the whole history and waits for more
    site.proceed.set()
    _wait_state(g, job_id, TERMINAL)
    watcher.join(timeout=5)
    assert not watcher.is_alive(), f"the team's watch stalled after {len(got)} events"
    assert any(e.progress == (100, 100, 0.5) for e in got)
    assert got[-1].state is JobState.REJECTED and got[-1].terminal


# --- the audit position signed into the next release counts the last job's reads ----------------


class OpensFilesThenRefusedSite(ScriptedSite):
    """The team's first job opens ``reads`` data files (one data.read audit event each, as the
    agent's access ledger reports them) and is refused; later jobs release."""

    def __init__(self, tmp: Path, reads: int) -> None:
        super().__init__(tmp)
        self.reads = reads
        self.script = self._first_refused

    def _first_refused(self, order: RunOrder) -> list[SiteReport]:
        if len(self.orders) > 1:
            return self._release(order)
        job = order.job_id
        return [
            SiteReport(job, state=JobState.RUNNING, reason=TeamReason.RUNNING),
            *(
                SiteReport(
                    job, audit_action="data.read", audit_dataset="books", audit_file=f"f{i}.txt"
                )
                for i in range(self.reads)
            ),
            SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING),
            SiteReport(job, state=JobState.REJECTED, reason=TeamReason.REJECTED_WEIGHTS),
        ]


def _second_job_order(tmp_path: Path, make_gateway, reads: int) -> RunOrder:
    site_dir = tmp_path / f"site-{reads}"
    site_dir.mkdir()
    site = OpensFilesThenRefusedSite(site_dir, reads)
    g = make_gateway(site, f"gw-{reads}")
    g.start()
    first = _run_approved(g)
    _wait_state(g, first, TERMINAL)
    second = _run_approved(g)
    _wait_state(g, second, TERMINAL)
    assert len(site.orders) == 2
    return site.orders[1]


def test_next_release_does_not_count_the_files_a_refused_job_opened(
    tmp_path: Path, make_gateway
) -> None:
    """A hostile job opens a data-dependent number of files (each first open is a data.read
    audit event) and is refused; the team's next, benign job releases. The agent signs the run
    order's audit binding into that release's manifest, which the team downloads: it must not
    carry a count of the log's records (the earlier job's reads), only a hash of the log."""
    quiet = _second_job_order(tmp_path, make_gateway, reads=0)
    loud = _second_job_order(tmp_path, make_gateway, reads=37)
    for order in (quiet, loud):
        bound = {k: v for k, v in vars(order).items() if k.startswith("audit")}
        assert bound and all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in bound.values()
        ), bound
    position = AuditPosition(checkpoint_root=loud.audit_root)
    assert position.seq is None


# --- the account against the figures a passing memorization check signs -------------------------


@pytest.mark.parametrize(("samples", "threshold"), [(8, 0.5), (64, 0.5), (64, 0.9)])
def test_account_covers_the_memorization_figures_a_passing_release_signs(
    samples: int, threshold: float
) -> None:
    """The memorization check's figures (exact and near-verbatim counts, the rate) go into the
    signed manifest the team downloads; the job chooses them by what its weights recite. Every
    distinct set of figures a *passing* release can carry must fit in the account."""
    text = policy("books").replace("samples: 8", f"samples: {samples}")
    text = text.replace("threshold: 0.5", f"threshold: {threshold}")
    doc = document.parse_policy(text)
    rules = doc.release.memorization
    assert rules is not None
    shown = set()
    for exact, near in itertools.product(range(samples + 1), repeat=2):
        if exact + near > samples:
            continue
        result = decide_memorization(
            MemorizationFigures(
                samples=samples,
                exact=exact,
                near_verbatim=near,
                prefix_tokens=rules.prefix_tokens,
                suffix_tokens=rules.suffix_tokens,
                passage_tokens=rules.passage_tokens,
            ),
            rules=rules,
        )
        if result.passed:
            shown.add(tuple(sorted(result.figures.items())))
    acct = access.job_account(parse_spec(spec()), [doc])
    counted = sum(bits for name, bits in acct.items.items() if "memorization" in name)
    assert math.log2(len(shown)) <= counted + 1e-9, (
        f"{len(shown)} distinct passing figure sets ({math.log2(len(shown)):.2f} bits); "
        f"the account counts {counted:.2f} bits"
    )


# --- logs the policy shows the team --------------------------------------------------------------


def test_logs_visible_to_the_team_are_in_the_account() -> None:
    """``logs.visible_to: model-team`` hands the team up to the site's log cap of bytes the job
    wrote freely (stdout and stderr): the account must count them (or the policy must refuse
    to open that channel)."""
    from enclave.agent import MAX_LOG_BYTES

    text = policy("books") + "logs: {visible_to: model-team}\n"
    try:
        doc = document.parse_policy(text)
    except PolicyDocumentError:
        return  # the channel cannot be opened at all: safe
    assert doc.logs.value == "model-team"
    acct = access.job_account(parse_spec(spec()), [doc])
    assert acct.total >= 8 * MAX_LOG_BYTES, (
        f"the team can read {8 * MAX_LOG_BYTES} bits of logs; the account says {acct.total:.0f}"
    )


# --- progress points go out off the grid ------------------------------------------------------


class _Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_progress_points_reach_the_gateway_on_the_grid_whatever_the_readings_phase() -> None:
    """States wait for the grid; a progress point is sent when the site's follower next reads
    the file after a grid point, and the job shifts that reading's phase (it makes each read
    slower by writing more lines). The team timestamps a point's arrival on its watch stream
    itself, so a point must be sent at a grid instant, like a state."""
    clock = _Clock(1000.0)
    sent_at: list[float] = []

    def report(r: SiteReport) -> None:
        if r.progress is not None:
            sent_at.append(clock.now)

    team = TeamChannel(
        "job-1",
        rules=ChannelRules(progress_points=4, time_quantum_s=30.0),
        total_steps=100,
        report=report,
        clock=clock,
        sleep=clock.sleep,
    )
    team.started = True
    team.on_progress((30, 100, 2.0))  # passes the first point (25) at 1000 s
    clock.now = 1020.0 + 0.737  # the job-chosen phase of the next reading
    team.on_progress((31, 100, 2.0))
    deadline = time.monotonic() + 2
    while not sent_at and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent_at, "the point was never sent"
    q = team.rules.time_quantum_s
    assert all(math.isclose(t, channels.round_time(t, q)) for t in sent_at), sent_at
