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
from policies.channels import TeamReason
from policies.errors import InvalidState, PermissionDenied
from policies.lifecycle import TERMINAL, JobState

LEASE_S = 30.0
HEARTBEAT_S = 5.0
KEEP_ENDED = 10_000
"""Ended leases remembered (their ids, site and report count) to answer a late repeat."""

_ENDS = TERMINAL | {JobState.AWAITING_REVIEW}


@dataclass
class _Run:
    order: RunOrder
    site: str
    report: Report
    state: str = "queued"  # queued, leased, ended
    next_seq: int = 0
    expires: float = 0.0
    cancel: bool = False
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
    """Remote sites as the gateway sees them. Thread-safe."""

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

    # -- the dispatcher's side ---------------------------------------------------------------

    def run(self, site: str, order: RunOrder, report: Report) -> None:
        """Run ``order`` at remote site ``site``; blocks until the run has ended (see the
        module). An exception the dispatcher's ``report`` raised comes out here."""
        run = _Run(order=order, site=site, report=report)
        job = order.job_id
        with self._cond:
            if job in self._runs or job in self._ended:
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
        try:
            self._wait(run)
        finally:
            with self._cond:
                self._runs.pop(job, None)
                self._ended[job] = dataclasses.replace(run, order=order, report=_no_report)
                while len(self._ended) > KEEP_ENDED:
                    self._ended.popitem(last=False)
            if run.release_dir is not None:
                shutil.rmtree(run.release_dir.parent, ignore_errors=True)
        if run.error is not None:
            raise run.error

    def _wait(self, run: _Run) -> None:
        with self._cond:
            while run.state != "ended":
                now = self._clock()
                if run.state == "queued" and (run.cancel or self._closed):
                    ending = _end(
                        run.order.job_id,
                        JobState.CANCELLED,
                        "cancelled before it ran",
                        reason=TeamReason.CANCELLED,
                    )
                elif run.state == "leased" and now >= run.expires:
                    ending = _end(
                        run.order.job_id,
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
            run = self._runs.get(job_id) or self._ended.get(job_id)
            return None if run is None else run.site

    def sites(self) -> list[SiteView]:
        with self._cond:
            return sorted(self._sites.values(), key=lambda s: s.name)

    def close(self) -> None:
        """Runs still queued end CANCELLED; leased ones are left to their sites."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the site's side (one method per SiteLink call) --------------------------------------

    def hello(
        self, site: str, *, version: str, image_id: str, slots: int, held: Iterable[str]
    ) -> list[pb.LeaseState]:
        with self._cond:
            views = []
            for job in held:
                run = self._runs.get(job) or self._ended.get(job)
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
        or None after ``wait_s``."""
        deadline = self._clock() + max(0.0, min(wait_s, 30.0))
        with self._cond:
            self._seen(site)
            while not self._closed:
                queue = self._queues[site]
                while queue:
                    run = self._runs.get(queue.popleft())
                    if run is not None and run.state == "queued" and not run.cancel:
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
        """Renew ``site``'s leases; the runs to cancel there."""
        with self._cond:
            self._seen(site)
            expires = self._clock() + self.lease_s
            cancel = []
            for run in self._runs.values():
                if run.site == site and run.state == "leased":
                    run.expires = expires
                    if run.cancel:
                        cancel.append(run.order.job_id)
            self._cond.notify_all()
            return cancel

    def report(self, site: str, seq: int, msg: pb.SiteReport) -> int:
        """Apply report ``seq`` of a lease ``site`` holds (see the module); the next number
        expected. Raises :class:`PermissionDenied`, :class:`InvalidState` or InvalidInput."""
        run = self._held(site, msg.job_id)
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
        return run.order.bundle

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
        may come."""
        run = self._held(site, job_id)
        with run.lock:
            if run.state != "leased":
                raise InvalidState(f"the lease on {job_id} has ended")
            run.release_dir = release_dir

    # -- internals ---------------------------------------------------------------------------

    def _held(self, site: str, job_id: str) -> _Run:
        with self._cond:
            self._seen(site)
            run = self._runs.get(job_id) or self._ended.get(job_id)
            if run is None or run.site != site or run.state == "queued":
                raise PermissionDenied(f"site {site} holds no lease on job {job_id!r}")
            return run

    def _seen(self, site: str, **facts: object) -> None:
        old = self._sites.get(site)
        view = old or SiteView(site, "", "", 0, 0.0, ())
        view = dataclasses.replace(view, last_seen=time.time(), **facts)  # type: ignore[arg-type]
        leases = tuple(j for j, r in self._runs.items() if r.site == site and r.state == "leased")
        self._sites[site] = dataclasses.replace(view, leases=leases)

    def _apply(self, run: _Run, value: SiteReport, *, end: bool) -> None:
        with run.lock:
            if run.state != "ended":
                self._apply_locked(run, value, end=end)

    def _apply_locked(self, run: _Run, value: SiteReport, *, end: bool) -> None:
        try:
            run.report(value)
        except BaseException as e:  # the dispatcher's; raised out of run()
            run.error = e
            end = True
        run.next_seq += 1
        if end:
            with self._cond:
                run.state = "ended"
                self._cond.notify_all()


def _end(job_id: str, state: JobState, detail: str, *, reason: str = "") -> SiteReport:
    return SiteReport(job_id=job_id, state=state, detail=detail, reason=reason)


def _no_report(report: SiteReport) -> None:
    raise InvalidState(f"the run of {report.job_id} has ended")
