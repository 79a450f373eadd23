"""The gateway's side of the site link: remote sites, their queues of orders and their leases.

A remote site dials out and calls ``sealroom.v1.SiteLink`` (:mod:`gateway._linkservicer` turns
each call into one method here). For the dispatcher, :class:`SiteLinks.run` is a site's ``run``:
it queues the order for the named site and blocks until the run ends, however it ends, exactly as
the site contract (:class:`enclave.contract.Site`) says an in-process site's ``run`` does.

- **A lease is granted once.** :meth:`SiteLinks.pull` hands a queued order to its site with a
  lease that each heartbeat renews. A lease that is not renewed within ``lease_s`` ends the run
  ``ERROR`` (``site_lost``): the order is never handed out again, so a site that was only slow
  and a site that died cannot both run it.
- **Reports in order, exactly once.** The site numbers each lease's reports from 0; report
  ``next_seq`` is applied and the count moves on, an earlier one is a repeat (acknowledged, not
  applied again), a later one is a gap (refused). Reports of a lease this site does not hold,
  or of one that has ended, are refused. The first report with a terminal state ends the run.
- **A release is pushed before the report that names it**, into ``<root>/incoming/<job>/``
  (:meth:`SiteLinks.accept_release`); the run's end hands that directory to the dispatcher,
  which copies it into the release store, and then it is removed.

**Leases outlive the gateway.** Every lease is a row of ``<root>/leases.db`` (SQLite, WAL,
``synchronous=FULL``): written before the lease is handed out (so a lease the site holds is
always on record, and a job id granted once is granted never again, by any later process),
then at each report applied (its next number, whether it ended, the release it accepted). A
report is acknowledged only after its row is written; a gateway killed between applying a
report and writing its row applies that one report again when the site repeats it (at least
once across that instant, exactly once otherwise; a repeated state change is refused by the
job's lifecycle). A gateway that starts on the same home loads the leases still live as
*waiting to be taken up*: the dispatcher worker that was blocked in :meth:`run` died with the
old process, so the restarted dispatcher takes each one up again with :meth:`resume` (for the
jobs its store shows ``RUNNING`` or ``CHECKING``) or through :meth:`run` (a job still
``QUEUED``: leased, but the site had not reported yet), which attaches its report function and
then waits for the run's end exactly as :meth:`run` does. Until a lease is taken up its site's
reports are answered ``UNAVAILABLE`` (the site repeats them) and its heartbeats do not renew
it: a lease nobody takes up (its job ended by the restart, or its site gone) ends ``lease_s``
after the gateway started, as any lease whose site falls silent. A resumed lease's site
reconnects (it backs off and says ``Hello`` again, naming its leases), and its reports carry
on at the number on record.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sealroom.v1 import site_pb2 as pb

from enclave.contract import Report, RunOrder, SiteReport
from enclave.linkwire import order_json, report_value
from gateway._leases import LeaseBook
from policies.channels import TeamReason
from policies.errors import InvalidState, PermissionDenied, SiteError
from policies.lifecycle import TERMINAL, JobState

LEASE_S = 30.0
HEARTBEAT_S = 5.0
KEEP_ENDED = 10_000
"""Ended leases kept in memory (the rest are looked up in the lease book) to answer a late
repeat."""
TAKE_UP_WAIT_S = 5.0
"""How long a report of a lease not yet taken up (after a restart) waits before it is answered
``UNAVAILABLE``."""
LEASES_DB = "leases.db"

_ENDS = TERMINAL | {JobState.AWAITING_REVIEW}


@dataclass
class _Run:
    job_id: str
    site: str
    report: Report | None  # None: a lease a previous gateway granted, not taken up yet
    order: RunOrder | None = None
    bundle: Path | None = None
    state: str = "queued"  # queued, leased, ended
    next_seq: int = 0
    expires: float = 0.0
    cancel: bool = False
    refused: str = ""  # why a queued run cannot be leased: it ends ERROR so
    error: BaseException | None = None
    release_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SiteView:
    """What the gateway knows of a remote site, for operators."""

    name: str
    version: str
    image_id: str
    slots: int
    last_seen: float  # time.time() of its last call
    leases: tuple[str, ...]


class SiteLinks:
    """Remote sites as the gateway sees them, their leases kept in ``<root>/leases.db``.
    Thread-safe."""

    def __init__(
        self,
        root: Path,
        *,
        lease_s: float = LEASE_S,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < heartbeat_s < lease_s:
            raise ValueError("the heartbeat must come more often than a lease lasts")
        self.root = root
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        self._cond = threading.Condition()
        self._runs: dict[str, _Run] = {}
        self._ended: collections.OrderedDict[str, _Run] = collections.OrderedDict()
        self._queues: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._sites: dict[str, SiteView] = {}
        self._closed = False
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._book = LeaseBook(root / LEASES_DB)
        self._load()

    def _load(self) -> None:
        """The live leases a previous gateway on this root left, waiting to be taken up, each
        with a full ``lease_s`` from now; what the pushes of ended ones left is removed."""
        expires = self._clock() + self.lease_s
        for job, site, next_seq, bundle, release in self._book.live():
            release_dir = Path(release) if release and Path(release).is_dir() else None
            self._runs[job] = _Run(
                job_id=job,
                site=site,
                report=None,
                bundle=Path(bundle) if bundle else None,
                state="leased",
                next_seq=next_seq,
                expires=expires,
                release_dir=release_dir,
            )
        incoming = self.root / "incoming"
        if incoming.is_dir():
            for d in incoming.iterdir():
                run = self._runs.get(d.name)
                if run is None or run.release_dir is None:  # ended, or a push cut short
                    shutil.rmtree(d, ignore_errors=True)

    # -- the dispatcher's side ---------------------------------------------------------------

    def run(self, site: str, order: RunOrder, report: Report) -> None:
        """Run ``order`` at remote site ``site``; blocks until the run has ended (see the
        module). A live lease on the job that a previous gateway granted is taken up instead
        (:meth:`resume`). An exception the dispatcher's ``report`` raised comes out here."""
        job = order.job_id
        run = _Run(job_id=job, site=site, report=report, order=order, bundle=order.bundle)
        with self._cond:
            self._expire_waiting()
            held = self._runs.get(job)
            if held is not None and held.report is None and held.site == site:
                held.report, held.order = report, order  # taken up: the site runs it still
                run = held
                self._cond.notify_all()
                seen = False
            elif held is not None or self._find(job) is not None:
                seen = True
            else:
                seen = False
                self._runs[job] = run
                self._queues[site].append(job)
                self._cond.notify_all()
        if seen:
            report(
                _end(
                    job,
                    JobState.ERROR,
                    "the job id was handed to a site before: a job id is never repeated",
                    reason=TeamReason.ERROR,
                )
            )
            return
        self._follow(run)

    def held(self) -> list[str]:
        """The live leases a previous gateway granted that no one has taken up yet."""
        with self._cond:
            self._expire_waiting()
            return [j for j, r in self._runs.items() if r.report is None]

    def resume(self, job_id: str, report: Report) -> bool:
        """Take up the live lease on ``job_id`` that a previous gateway granted: its reports
        go to ``report`` from now on, and this blocks until the run has ended, as :meth:`run`
        does. False at once, nothing reported, when no such lease waits (never granted, ended,
        or taken up already)."""
        with self._cond:
            self._expire_waiting()
            run = self._runs.get(job_id)
            if run is None or run.report is not None or run.state != "leased":
                return False
            run.report = report
            self._cond.notify_all()
        self._follow(run)
        return True

    def _follow(self, run: _Run) -> None:
        try:
            self._wait(run)
        finally:
            with self._cond:
                if run.state == "ended":
                    self._runs.pop(run.job_id, None)
                    self._remember(run)
            if run.release_dir is not None:
                shutil.rmtree(run.release_dir.parent, ignore_errors=True)
        if run.error is not None:
            raise run.error

    def _wait(self, run: _Run) -> None:
        with self._cond:
            while run.state != "ended":
                now = self._clock()
                if run.state == "queued" and run.refused:
                    ending = _end(run.job_id, JobState.ERROR, run.refused, reason=TeamReason.ERROR)
                elif run.state == "queued" and (run.cancel or self._closed):
                    ending = _end(
                        run.job_id,
                        JobState.CANCELLED,
                        "cancelled before it ran",
                        reason=TeamReason.CANCELLED,
                    )
                elif self._closed:
                    return  # leased: left to its site; the next gateway on this root resumes it
                elif run.state == "leased" and now >= run.expires:
                    ending = _end(
                        run.job_id,
                        JobState.ERROR,
                        f"site {run.site} stopped answering (its lease ran out)",
                        reason=TeamReason.ERROR,
                    )
                else:
                    wait = run.expires - now if run.state == "leased" else self.lease_s
                    self._cond.wait(timeout=max(0.05, min(wait, 1.0)))
                    continue
                self._cond.release()
                try:
                    self._apply(run, ending, end=True)
                finally:
                    self._cond.acquire()

    def cancel(self, job_id: str) -> bool:
        """Ask for a run to stop (idempotent): a queued one ends CANCELLED at once, a leased
        one at its site (the next heartbeat carries the request). False for a job no remote
        site has."""
        with self._cond:
            run = self._runs.get(job_id)
            if run is None:
                return False
            run.cancel = True
            self._cond.notify_all()
            return True

    def site_of(self, job_id: str) -> str | None:
        with self._cond:
            run = self._runs.get(job_id) or self._find(job_id)
            return None if run is None else run.site

    def sites(self) -> list[SiteView]:
        """Each site heard from, with the leases it holds now (counted here, when asked, not
        on every call a site makes)."""
        with self._cond:
            held: dict[str, list[str]] = {}
            for job, r in self._runs.items():
                if r.state == "leased":
                    held.setdefault(r.site, []).append(job)
            return [
                dataclasses.replace(v, leases=tuple(held.get(v.name, ())))
                for v in sorted(self._sites.values(), key=lambda v: v.name)
            ]

    def close(self) -> None:
        """Runs still queued end CANCELLED; leased ones are left to their sites (on record:
        the next gateway on this root takes them up). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._book.close()

    # -- the site's side (one method per SiteLink call) --------------------------------------

    def hello(
        self, site: str, *, version: str, image_id: str, slots: int, held: Iterable[str]
    ) -> list[pb.LeaseState]:
        with self._cond:
            self._expire_waiting()
            views = []
            for job in held:
                run = self._runs.get(job) or self._find(job)
                if run is None or run.site != site:
                    views.append(pb.LeaseState(job_id=job, next_seq=0, live=False))
                else:
                    views.append(
                        pb.LeaseState(job_id=job, next_seq=run.next_seq, live=run.state == "leased")
                    )
            self._seen(site, version=version, image_id=image_id, slots=slots)
            return views

    def pull(self, site: str, *, wait_s: float) -> tuple[str, str, bool] | None:
        """A lease on the next order queued for ``site``: (job id, order JSON, has a bundle),
        or None after ``wait_s``. The lease is on record before it is handed out."""
        deadline = self._clock() + max(0.0, min(wait_s, 30.0))
        with self._cond:
            self._seen(site)
            while not self._closed:
                queue = self._queues[site]
                while queue:
                    job = queue.popleft()
                    run = self._runs.get(job)
                    if run is None or run.state != "queued" or run.cancel or run.refused:
                        continue
                    assert run.order is not None  # only run() queues, with its order
                    try:
                        self._book.grant(job, site, run.bundle)
                    except SiteError:
                        queue.appendleft(job)  # still queued: the next pull may have it
                        raise
                    except InvalidState as e:  # granted by an earlier gateway: never again
                        run.refused = str(e)
                        self._cond.notify_all()
                        continue
                    run.state = "leased"
                    run.expires = self._clock() + self.lease_s
                    self._cond.notify_all()
                    order = run.order
                    return order.job_id, order_json(order), order.bundle is not None
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
        return None

    def heartbeat(self, site: str) -> list[str]:
        """Renew ``site``'s leases (those taken up); the runs to cancel there."""
        with self._cond:
            self._seen(site)
            self._expire_waiting()
            expires = self._clock() + self.lease_s
            cancel = []
            for run in self._runs.values():
                if run.site == site and run.state == "leased" and run.report is not None:
                    run.expires = expires
                    if run.cancel:
                        cancel.append(run.job_id)
            self._cond.notify_all()
            return cancel

    def report(self, site: str, seq: int, msg: pb.SiteReport) -> int:
        """Apply report ``seq`` of a lease ``site`` holds (see the module); the next number
        expected. Raises :class:`PermissionDenied`, :class:`InvalidState`, InvalidInput, or
        :class:`SiteError` (repeat it) for a lease not taken up yet after a restart."""
        run = self._held(site, msg.job_id)
        self._taken_up(run)
        with run.lock:
            if run.state != "leased":
                raise InvalidState(f"the lease on {msg.job_id} has ended")
            if seq < run.next_seq:
                return run.next_seq  # a repeat: applied already
            if seq > run.next_seq:
                raise InvalidState(
                    f"report {seq} of {msg.job_id} comes before report {run.next_seq}"
                )
            value = report_value(
                msg, release_dir=run.release_dir if msg.has_release else None, site=site
            )
            self._apply_locked(run, value, end=value.state in _ENDS)
            return run.next_seq

    def bundle(self, site: str, job_id: str) -> Path | None:
        """The code bundle of a live lease ``site`` holds (None: the job has none)."""
        run = self._held(site, job_id)
        if run.state != "leased":
            raise InvalidState(f"the lease on {job_id} has ended")
        return run.bundle

    def release_root(self, site: str, job_id: str) -> Path:
        """Where a push of this lease's release is written (emptied first)."""
        run = self._held(site, job_id)
        if run.state != "leased":
            raise InvalidState(f"the lease on {job_id} has ended")
        root = self.root / "incoming" / job_id
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, mode=0o700)
        return root

    def accept_release(self, site: str, job_id: str, release_dir: Path) -> None:
        """A push of this lease's release finished and was checked: the report that names it
        may come (on record: a restarted gateway still has it)."""
        run = self._held(site, job_id)
        with run.lock:
            if run.state != "leased":
                raise InvalidState(f"the lease on {job_id} has ended")
            self._book.accept(job_id, release_dir)
            run.release_dir = release_dir

    # -- internals ---------------------------------------------------------------------------

    def _find(self, job_id: str) -> _Run | None:
        """An ended lease, from memory or the book (the caller holds ``_cond``)."""
        run = self._ended.get(job_id)
        if run is not None:
            return run
        found = self._book.find(job_id) if not self._closed else None
        if found is None:
            return None
        site, state, next_seq = found
        if state != "ended":
            return None  # live leases are all in _runs
        run = _Run(job_id=job_id, site=site, report=_no_report, state="ended", next_seq=next_seq)
        self._remember(run)
        return run

    def _remember(self, run: _Run) -> None:
        self._ended[run.job_id] = dataclasses.replace(run, report=_no_report, order=None)
        while len(self._ended) > KEEP_ENDED:
            self._ended.popitem(last=False)

    def _held(self, site: str, job_id: str) -> _Run:
        with self._cond:
            self._seen(site)
            self._expire_waiting()
            run = self._runs.get(job_id) or self._find(job_id)
            if run is None or run.site != site or run.state == "queued":
                raise PermissionDenied(f"site {site} holds no lease on job {job_id!r}")
            return run

    def _taken_up(self, run: _Run) -> None:
        """Wait (a little) for a lease loaded after a restart to be taken up."""
        deadline = self._clock() + TAKE_UP_WAIT_S
        with self._cond:
            while run.report is None and run.state == "leased":
                left = deadline - self._clock()
                if left <= 0 or self._closed:
                    raise SiteError(
                        f"the gateway restarted and has not taken up the lease on {run.job_id} "
                        "yet: repeat the report"
                    )
                self._cond.wait(timeout=min(left, 0.5))

    def _expire_waiting(self) -> None:
        """End the leases loaded after a restart that no one took up within ``lease_s`` (the
        caller holds ``_cond``). No one is told: no one was following them."""
        if self._closed:
            return
        now = self._clock()
        for run in [r for r in self._runs.values() if r.report is None]:
            if run.state == "leased" and now >= run.expires:
                self._book.advance(run.job_id, run.next_seq, ended=True)
                run.state = "ended"
                del self._runs[run.job_id]
                self._remember(run)
                if run.release_dir is not None:
                    shutil.rmtree(run.release_dir.parent, ignore_errors=True)
                self._cond.notify_all()

    def _seen(self, site: str, **facts: object) -> None:
        old = self._sites.get(site)
        view = old or SiteView(site, "", "", 0, 0.0, ())
        self._sites[site] = dataclasses.replace(view, last_seen=time.time(), **facts)  # type: ignore[arg-type]

    def _apply(self, run: _Run, value: SiteReport, *, end: bool) -> None:
        with run.lock:
            if run.state != "ended":
                self._apply_locked(run, value, end=end)

    def _apply_locked(self, run: _Run, value: SiteReport, *, end: bool) -> None:
        assert run.report is not None  # reports wait until the lease is taken up
        try:
            run.report(value)
        except BaseException as e:  # the dispatcher's; raised out of run()
            run.error = e
            end = True
        run.next_seq += 1
        try:
            if run.state == "leased":  # a queued run has no row
                self._book.advance(run.job_id, run.next_seq, ended=end)
        finally:
            if end:
                with self._cond:
                    run.state = "ended"
                    self._cond.notify_all()


def _end(job_id: str, state: JobState, detail: str, *, reason: str = "") -> SiteReport:
    return SiteReport(job_id=job_id, state=state, detail=detail, reason=reason)


def _no_report(report: SiteReport) -> None:
    raise InvalidState(f"the run of {report.job_id} has ended")
