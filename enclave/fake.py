"""An in-process site for fast tests: the :class:`enclave.contract.Site` contract with no vault,
no container and no key, shipped beside the real one (like httpx's ``MockTransport``).

It keeps the contract, and ``tests/unit/test_site_contract.py`` holds it to it exactly as it
holds :class:`enclave.agent.SiteAgent`: datasets are tar archives of regular files, versioned,
an identical archive answering with its version and anything else refused (InvalidInput); a
job id runs once; a run for a dataset version the site does not hold, or without the policy
of each of its datasets, ends ERROR before it starts; ``cancel`` is idempotent and ends a run
in progress CANCELLED.

What a run reports is its ``script``: a function of the order returning the reports, by default
:meth:`FakeSite.release` (RUNNING, one progress point, CHECKING, RELEASED with a release
directory of a manifest and metrics). A test that needs a particular sequence, hostile ones
included, passes its own; the fake forwards it as written, only ending it CANCELLED when a
cancel arrives before the script's own terminal state. ``gate`` holds every run before its
first report until it is set (set at first). The fake records what it was given (``orders``,
``archives``, ``cancelled``, ``runs``) for the test to check.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from enclave.contract import Report, RunOrder, SiteReport, StoredDataset
from policies.channels import TeamReason
from policies.errors import InvalidInput
from policies.lifecycle import JobState

FAKE_IMAGE_ID = "sha256:" + "0" * 64
GATE_TIMEOUT_S = 10.0
"""How long a run waits for ``gate`` at most: a test that forgets to open it still ends."""

Script = Callable[[RunOrder], Iterable[SiteReport]]


def _listing(data: bytes) -> tuple[tuple[str, int, str], ...]:
    """(path, size, sha256) of each regular file in the tar archive ``data``, sorted by path.
    Raises InvalidInput for what is not a tar archive, a link, a device, or a path that leaves."""
    files = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise InvalidInput(f"{member.name}: only regular files may be stored")
                name = member.name.removeprefix("./")
                if name.startswith("/") or ".." in name.split("/"):
                    raise InvalidInput(f"{member.name}: a path outside the dataset")
                content = tar.extractfile(member)
                assert content is not None  # a regular file
                blob = content.read()
                files.append((name, len(blob), hashlib.sha256(blob).hexdigest()))
    except tarfile.TarError as e:
        raise InvalidInput(f"not a tar archive: {e}") from e
    return tuple(sorted(files))


class FakeSite:
    """The site contract in process; see the module docstring."""

    def __init__(self, root: Path, *, name: str = "fake-site", script: Script | None = None):
        self.name = name
        self.root = root
        self.script: Script = script or self.release
        self.gate = threading.Event()
        self.gate.set()
        self.orders: list[RunOrder] = []
        self.archives: list[bytes] = []
        self.cancelled: set[str] = set()
        self.runs: Counter[str] = Counter()
        self.job_logs: dict[str, bytes] = {}
        """What ``logs`` answers per job id (tests put the stdout they need here)."""
        self._versions: dict[str, list[StoredDataset]] = {}
        self._key = 0
        self._lock = threading.Lock()

    # -- Site protocol ----------------------------------------------------------------------

    def image_id(self) -> str:
        return FAKE_IMAGE_ID

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        data = archive.read()
        files = _listing(data)
        root = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        with self._lock:
            versions = self._versions.setdefault(name, [])
            if versions and versions[-1].root_hash == root:
                return versions[-1]
            stored = StoredDataset(
                name, len(versions) + 1, root, sum(size for _, size, _ in files), files
            )
            versions.append(stored)
            self.archives.append(data)
        return stored

    def rotate_key(self) -> tuple[str, int]:
        with self._lock:
            self._key += 1
            return f"fake-key-{self._key}", sum(len(v) for v in self._versions.values())

    def close(self) -> None:
        """Nothing is held while idle."""

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self.cancelled.add(job_id)

    def logs(self, job_id: str) -> bytes:
        return self.job_logs.get(job_id, b"")

    def run(self, order: RunOrder, report: Report) -> None:
        job = order.job_id
        with self._lock:
            self.orders.append(order)
            self.runs[job] += 1
            again = self.runs[job] > 1
            missing = [
                f"{n} v{v}"
                for n, v in order.datasets
                if not any(s.version == v for s in self._versions.get(n, ()))
            ]
        if again:
            report(_error(job, f"site: job {job} ran here before: runs are never repeated"))
            return
        if missing:
            report(_error(job, f"site: no dataset version {', '.join(missing)} here"))
            return
        unruled = [n for n, _ in order.datasets if n not in order.policy_documents]
        if unruled:
            report(_error(job, f"site: no policy for {', '.join(unruled)} came with the order"))
            return
        self.gate.wait(GATE_TIMEOUT_S)
        for r in self.script(order):
            if self._is_cancelled(job):
                break
            report(r)
            if r.state is not None and r.state.terminal:
                return
        if self._is_cancelled(job):
            report(SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED))

    # -- the default script ------------------------------------------------------------------

    def release(self, order: RunOrder) -> list[SiteReport]:
        """Start, pass one progress point, check and release at once."""
        out = self.root / f"release-{order.job_id}"
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"job": order.job_id}))
        (out / "metrics.json").write_text('{"train_loss": 1.5}')
        return [
            SiteReport(
                order.job_id,
                state=JobState.RUNNING,
                image_id=self.image_id(),
                audit_action="container.start",
            ),
            SiteReport(order.job_id, progress=(1, 2, 1.5)),
            SiteReport(order.job_id, state=JobState.CHECKING),
            SiteReport(
                order.job_id,
                state=JobState.RELEASED,
                metrics={"train_loss": 1.5},
                release_dir=out,
                audit_action="release.sign",
            ),
        ]

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self.cancelled


def _error(job_id: str, detail: str) -> SiteReport:
    return SiteReport(job_id, state=JobState.ERROR, reason=TeamReason.ERROR, detail=detail)
