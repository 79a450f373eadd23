"""Servers in child processes (:mod:`tests.bench._serve`) and their resident memory, sampled.

:class:`Served` starts one, reads the port it announces and stops it by closing its stdin; a
server that dies first is reported with the end of its stderr. :class:`RssSampler` reads
``VmRSS`` from ``/proc/PID/status`` on a thread, every few milliseconds, between ``start`` and
``stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]


class Served:
    """``python -m tests.bench._serve MODE HOME ARGS...`` in a child process."""

    def __init__(self, mode: str, home: Path, *args: str, log: Path) -> None:
        self.log = log
        self._err: IO[bytes] = log.open("wb")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench._serve", mode, str(home), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self.proc.stdout.close()
            self._err.close()
            raise RuntimeError(
                f"the {mode} server exited ({self.proc.returncode}) before it "
                f"listened: {self.stderr_tail()}"
            )
        info: dict[str, Any] = json.loads(line)
        self.port: int = info["port"]
        self.pid: int = info["pid"]
        self.address = f"localhost:{self.port}"

    def stderr_tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 120.0) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the server exited {self.proc.returncode}: {self.stderr_tail()}")

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:  # already failing: stop, but let the first error through
            with contextlib.suppress(RuntimeError):
                self.stop()


def rss_bytes(pid: int) -> int:
    """The resident set of process ``pid``, from ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's resident memory on a thread: ``peak`` and every ``samples`` taken."""

    def __init__(self, pid: int, *, every_s: float = 0.02) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - t0, rss_bytes(self.pid)))
            self._stop.wait(self.every_s)

    @property
    def peak(self) -> int:
        return max(v for _, v in self.samples)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, rss_bytes(self.pid)))
