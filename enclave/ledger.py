"""The file-level access ledger: which staged files each job opened, observed from the host.

A job's datasets are staged on the host (``enclave.vault``) and bind-mounted read-only into its
container. Bind mounts share inodes with the host directory, so an inotify watch placed by the
agent on every staged directory sees each open made inside the container, and the job can neither
see nor remove the watch. A background thread turns the kernel's events into one
:class:`AccessRecord` per (dataset, file): when it was first opened and how many opens followed.
``on_first_open`` hears of each file as soon as it is first opened (the gateway appends that to
its audit log); :meth:`AccessLedger.stop` returns the totals.

Only ``IN_OPEN`` is watched. Every read needs an open first, and the watches are in place
before the job starts, so opens are enough to know which files were touched; ``IN_ACCESS`` would
add one event per ``read()`` and make it easier for a hostile job to overflow the kernel's event
queue. If the queue does overflow (the job opened files faster than the agent drained them) the
summary says ``complete=False``: the ledger never claims completeness it does not have.
First-open times are when the host read the event, within milliseconds of the open.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from inotify_simple import INotify, flags

from enclave.vault import Staging
from policies.errors import InvalidState, SiteError

_MASK = flags.OPEN | flags.ONLYDIR | flags.DONT_FOLLOW


@dataclass(frozen=True)
class AccessRecord:
    """A staged file the job opened. ``dataset`` is the label the ledger was given (``name@vN``
    when built from a staging); ``path`` is relative to the dataset's directory."""

    job_id: str
    dataset: str
    path: str
    first_open: datetime
    opens: int


@dataclass(frozen=True)
class LedgerSummary:
    """Everything the ledger saw. ``complete`` is False if the kernel dropped events."""

    job_id: str
    records: tuple[AccessRecord, ...]
    complete: bool


class _State:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], AccessRecord] = {}
        self.complete = True
        self.error: BaseException | None = None


class AccessLedger:
    """Watches a job's staged datasets for the life of the job.

    The watches are placed by the constructor, so opens made after it returns are recorded even
    before :meth:`start`; start the ledger before the job starts and stop it after the job has
    exited. ``datasets`` maps a label to the staged directory on the host.
    """

    def __init__(
        self,
        *,
        job_id: str,
        datasets: Mapping[str, Path],
        on_first_open: Callable[[AccessRecord], None] | None = None,
    ) -> None:
        if not datasets:
            raise SiteError(f"job {job_id}: the access ledger needs at least one staged dataset")
        self.job_id = job_id
        self._on_first_open = on_first_open
        self._inotify = INotify()
        self._dirs: dict[int, tuple[str, str]] = {}  # watch descriptor -> (dataset, relative dir)
        self._state = _State()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._stopped = False
        try:
            for label, top in datasets.items():
                self._watch_tree(label, Path(top))
        except BaseException:
            self._close_fds()
            raise

    @classmethod
    def for_staging(
        cls, staging: Staging, *, on_first_open: Callable[[AccessRecord], None] | None = None
    ) -> AccessLedger:
        """A ledger over every dataset of a staging, each labelled ``name@vN``."""
        return cls(
            job_id=staging.job_id,
            datasets={v.ref: staging.path(v.name) for v in staging.versions},
            on_first_open=on_first_open,
        )

    def _watch_tree(self, label: str, top: Path) -> None:
        if top.is_symlink() or not top.is_dir():
            raise SiteError(f"staged dataset directory {top} does not exist")
        for dirpath, _dirnames, _files in os.walk(top, followlinks=False):
            rel = os.path.relpath(dirpath, top)
            try:
                wd = self._inotify.add_watch(dirpath, _MASK)
            except OSError as e:
                raise SiteError(f"cannot watch staged directory {dirpath}: {e.strerror}") from e
            self._dirs[wd] = (label, "" if rel == "." else rel)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self._stopped:
            raise InvalidState(f"job {self.job_id}: the access ledger was already started")
        self._thread = threading.Thread(target=self._run, name=f"ledger-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> LedgerSummary:
        """Read every event still queued, stop the thread and return the summary.

        Raises :class:`SiteError` if ``on_first_open`` failed (the audit trail is then
        incomplete, which the caller must not ignore). Calling it again returns the same summary.
        """
        if not self._stopped:
            self._stopped = True
            if self._thread is None:
                self._drain()  # never started: the watches still queued what happened
            else:
                os.write(self._wake_w, b"x")
                self._thread.join()
            self._close_fds()
        if self._state.error is not None:
            raise SiteError(
                f"job {self.job_id}: delivering an access record failed: {self._state.error!r}"
            ) from self._state.error
        return self.summary()

    def summary(self) -> LedgerSummary:
        with self._lock:
            records = tuple(sorted(self._state.records.values(), key=lambda r: (r.dataset, r.path)))
            return LedgerSummary(job_id=self.job_id, records=records, complete=self._state.complete)

    def __enter__(self) -> AccessLedger:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _close_fds(self) -> None:
        self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the watcher thread -------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._inotify.fileno() in ready:
                self._drain()
            if self._wake_r in ready:
                self._drain()  # events queued before the job exited are in the queue now
                return

    def _drain(self) -> None:
        while True:
            events = self._inotify.read(timeout=0)
            if not events:
                return
            for ev in events:
                self._handle(ev.wd, ev.mask, ev.name)

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            with self._lock:
                self._state.complete = False
            return
        if not mask & flags.OPEN or mask & flags.ISDIR or not name:
            return  # directory listings and watch bookkeeping (IGNORED, UNMOUNT)
        where = self._dirs.get(wd)
        if where is None:
            return
        label, rel_dir = where
        path = f"{rel_dir}/{name}" if rel_dir else name
        key = (label, path)
        now = datetime.now(UTC)
        with self._lock:
            old = self._state.records.get(key)
            if old is None:
                record = AccessRecord(
                    job_id=self.job_id, dataset=label, path=path, first_open=now, opens=1
                )
            else:
                record = AccessRecord(
                    job_id=old.job_id,
                    dataset=old.dataset,
                    path=old.path,
                    first_open=old.first_open,
                    opens=old.opens + 1,
                )
            self._state.records[key] = record
        if old is None and self._on_first_open is not None:
            try:
                self._on_first_open(record)
            except Exception as e:  # kept and re-raised by stop(): the thread must keep watching
                if self._state.error is None:
                    self._state.error = e
