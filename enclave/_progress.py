"""Following a running job's progress file: numbers only, read beneath the output, never through
a link.

The job appends JSON lines (``step``, ``total``, ``loss``, ...) to ``/output/metrics.jsonl``;
:func:`follow` reads what is new once per interval while the job runs and hands each interval's
latest ``(step, total, loss)`` to a callback (the agent reports it). The readings are at fixed
instants of the wall clock, ``lead_s`` before each multiple of the interval: the agent makes every
grid point of the team's time grid such an instant, so what the job reached just before a grid
point is published at that grid point, not one or two quanta later. The file is the job's: it
may be a link to a host file, a FIFO, a device or a sparse giant, or be swapped while it is read,
so every read goes through :func:`enclave._beneath.read_new` and any refusal simply yields no
event. Only the three numbers leave this module, parsed and range-checked; nothing the job wrote
as text does. What reaches the model team (coarsening, the leakage account) is decided by the
caller.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from enclave import _beneath

PROGRESS_FILE = "metrics.jsonl"
WINDOW_BYTES = 1 << 20
"""Read at most this much per look; a real progress line is a few hundred bytes."""
MAX_PROGRESS_BYTES = 1024**3
"""A progress file larger than this (a sparse giant) is refused from its size, unread."""
MAX_COUNT = 10**9

Progress = tuple[int, int, float]
"""(step, total, loss): a step and the run's total steps, and the training loss there."""


def read_progress(
    output_dir: Path, offset: int, last: Progress | None
) -> tuple[Progress | None, int]:
    """The latest valid progress at or after ``offset`` (``last`` when none) and the offset
    after the last whole line read. A file that cannot be read safely yields nothing new."""
    try:
        data = _beneath.read_new(
            output_dir,
            PROGRESS_FILE,
            offset,
            max_bytes=WINDOW_BYTES,
            max_size=MAX_PROGRESS_BYTES,
        )
    except _beneath.BeneathRefused:
        return last, offset
    end = data.rfind(b"\n")
    if end < 0:
        # A full window with no line end is no progress line: step over it rather than read
        # the same megabyte again every interval.
        return last, offset + (len(data) if len(data) >= WINDOW_BYTES else 0)
    for line in data[: end + 1].splitlines():
        event = parse_line(line)
        if event is not None:
            last = event
    return last, offset + end + 1


def parse_line(line: bytes) -> Progress | None:
    """One progress line's numbers, or None when it is not a valid one."""
    try:
        obj = json.loads(line)
        step, total, loss = int(obj["step"]), int(obj["total"]), float(obj["loss"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if 0 <= step <= MAX_COUNT and 0 <= total <= MAX_COUNT and math.isfinite(loss):
        return step, total, round(loss, 4)
    return None


def next_reading(now: float, interval_s: float, lead_s: float = 0.0) -> float:
    """The first reading instant after ``now``: ``lead_s`` before a multiple of ``interval_s``."""
    return (math.floor((now + lead_s) / interval_s) + 1) * interval_s - lead_s


@contextmanager
def follow(
    output_dir: Path,
    on_event: Callable[[Progress], None],
    *,
    interval_s: float = 1.0,
    lead_s: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> Iterator[None]:
    """While the ``with`` body runs, call ``on_event((step, total, loss))`` once per
    ``interval_s`` with the newest progress in ``output_dir``'s progress file (once there is
    one), and once more at the end when the final one differs. Readings are at ``lead_s``
    before each multiple of ``interval_s`` on ``clock`` (seconds since the epoch)."""
    if not (interval_s > 0 and 0 <= lead_s < interval_s):
        raise ValueError(f"need interval_s > 0 and 0 <= lead_s < interval_s: {interval_s, lead_s}")
    stop = threading.Event()

    def run() -> None:
        offset = 0
        last: Progress | None = None
        while not stop.wait(max(0.0, next_reading(clock(), interval_s, lead_s) - clock())):
            last, offset = read_progress(output_dir, offset, last)
            if last is not None:
                on_event(last)
        final, _ = read_progress(output_dir, offset, last)
        if final is not None and final != last:
            on_event(final)

    t = threading.Thread(target=run, name="progress-follower", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
