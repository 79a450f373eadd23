"""The benchmark hook for staging: decrypt-and-stage throughput beside raw AES-GCM, in turns.

:class:`StageBench` registers a dataset once, then times on demand one fresh staging (a new job
id, so a new tmpfs, as a real job gets) or one pass of the cipher's limit over the same bytes.
The harness takes the two in turns and judges the median per-pair ratio (goal: at least 0.8,
staging costs little beyond the cipher itself); :func:`measure_stage_throughput` does the same
for callers outside the harness. The blobs are warm in the page cache (they were just written),
so the figure is the vault's own cost, not the disk's. Needs root (tmpfs mount).

Each staging also records what the kernel did for it (:class:`StageSample`): the huge pages the
tmpfs got or fell back from, the page faults, and the process's CPU time, user and system. On a
machine whose free memory the hypervisor has taken back, the first write to each page of the
tmpfs costs far more than decrypting into it; that cost shows as system time, not in the cipher.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.vault._chunks import DEFAULT_CHUNK_SIZE, chunk_aad
from enclave.vault._model import DatasetVersion
from enclave.vault._staging import WORKERS, wipe_leftovers
from enclave.vault._vault import Vault

MB = 1_000_000
_COUNTERS = ("thp_file_alloc", "thp_file_fallback", "pgfault", "compact_stall")


@dataclass(frozen=True)
class StageSample:
    """One timed staging: its rate, and what it cost the kernel (``/proc/vmstat`` deltas, which
    count the whole machine, and this process's CPU milliseconds)."""

    mb_s: float
    seconds: float
    user_ms: float
    system_ms: float
    counters: dict[str, int]


@dataclass(frozen=True)
class StageThroughput:
    """Medians of runs taken in turns, in MB/s (10^6 bytes per second).

    ``aesgcm_mb_s`` is one thread decrypting one ``chunk_size`` buffer over and over (cache-hot:
    the cipher's ceiling) and ``ratio`` is the median of the per-pair ratios against it, with
    ``ratio_spread`` their lowest and highest. ``aesgcm_stream_mb_s`` is one thread decrypting
    the same total through distinct buffers in memory, for context: staging streams every byte
    through memory, which the cache-hot figure never does. ``workers`` is how many threads
    staging decrypted with; ``first_mb_s`` the first staging of the run, on whatever memory the
    machine had free.
    """

    stage_mb_s: float
    aesgcm_mb_s: float
    aesgcm_stream_mb_s: float
    ratio: float
    ratio_spread: tuple[float, float]
    stage_values: tuple[float, ...]
    limit_values: tuple[float, ...]
    first_mb_s: float
    workers: int
    total_bytes: int
    files: int
    chunk_size: int
    runs: int


class StageBench:
    """A dataset of ``total_bytes`` of random data in ``files`` files, registered in a private
    vault under ``work_dir``; each call times one thing. Use as a context manager."""

    def __init__(
        self,
        *,
        total_bytes: int = 256 << 20,
        files: int = 4,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        work_dir: Path | None = None,
    ) -> None:
        self.files = files
        self.chunk_size = chunk_size
        self.samples: list[StageSample] = []
        self._base = Path(tempfile.mkdtemp(prefix="sealroom-bench-", dir=work_dir))
        self._stage_root = self._base / "stage"
        self._stream: tuple[bytearray, bytearray] | None = None
        try:
            self._vault = Vault(
                self._base / "vault", site_key_path=self._base / "site.key", chunk_size=chunk_size
            )
            per_file = total_bytes // files
            block = os.urandom(min(per_file, 1 << 20) or 1)

            def source() -> Iterator[tuple[str, BytesIO]]:
                for i in range(files):
                    reps = -(-per_file // len(block))
                    yield f"part-{i:03d}.bin", BytesIO((block * reps)[:per_file])

            self._version: DatasetVersion = self._vault.register(
                "bench", source(), max_bytes=total_bytes, max_files=files
            )
            self.total_bytes = per_file * files
            self._stage_root.mkdir()
            self._jobs = 0
            self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
            self._nonce = os.urandom(12)
            self._aad = chunk_aad(os.urandom(16), 0, False)
            self._one = self._aead.encrypt(self._nonce, os.urandom(chunk_size), self._aad)
        except BaseException:
            self.close()
            raise

    def stage_mb_s(self) -> float:
        """One fresh staging, timed from the call until it is staged (destroyed after, untimed)."""
        self._jobs += 1
        before, ru0 = _vmstat(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        staging = self._vault.stage(
            f"bench-{self._jobs}", [self._version], dest_root=self._stage_root, on_event=_ignore
        )
        took = time.perf_counter() - t0
        ru1, after = resource.getrusage(resource.RUSAGE_SELF), _vmstat()
        staging.destroy()
        rate = self.total_bytes / took / MB
        self.samples.append(
            StageSample(
                mb_s=rate,
                seconds=took,
                user_ms=(ru1.ru_utime - ru0.ru_utime) * 1e3,
                system_ms=(ru1.ru_stime - ru0.ru_stime) * 1e3,
                counters={k: after.get(k, 0) - before.get(k, 0) for k in _COUNTERS},
            )
        )
        return rate

    def aesgcm_mb_s(self) -> float:
        """The limit: one thread, ``AESGCM.decrypt_into`` of one chunk into one buffer, over and
        over for the staged byte count (cache-hot: the cipher's ceiling on this machine)."""
        out = bytearray(self.chunk_size)
        n = max(1, self.total_bytes // self.chunk_size)
        aead, nonce, ct, aad = self._aead, self._nonce, self._one, self._aad
        t0 = time.perf_counter()
        for _ in range(n):
            aead.decrypt_into(nonce, ct, aad, out)
        return n * self.chunk_size / (time.perf_counter() - t0) / MB

    def aesgcm_stream_mb_s(self) -> float:
        """For context: one thread decrypting the staged byte count through distinct buffers in
        memory (both touched before the first pass, so page faults are not timed)."""
        cs, n = self.chunk_size, max(1, self.total_bytes // self.chunk_size)
        stride = len(self._one)
        if self._stream is None:
            self._stream = (bytearray(self._one * n), bytearray(n * cs))
        src, dst = self._stream
        aead, nonce, aad = self._aead, self._nonce, self._aad
        with memoryview(src) as s, memoryview(dst) as d:
            t0 = time.perf_counter()
            for i in range(n):
                with s[i * stride : (i + 1) * stride] as c, d[i * cs : (i + 1) * cs] as o:
                    aead.decrypt_into(nonce, c, aad, o)
            took = time.perf_counter() - t0
        return n * cs / took / MB

    def close(self) -> None:
        self._stream = None
        if self._stage_root.exists():
            wipe_leftovers(self._stage_root)
        shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> StageBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_stage_throughput(
    *,
    total_bytes: int = 256 << 20,
    files: int = 4,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    runs: int = 5,
    work_dir: Path | None = None,
) -> StageThroughput:
    """Register ``total_bytes`` of random data in ``files`` files, then take ``runs`` pairs in
    turns: the cipher's limit over the same bytes, then one fresh staging."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    with StageBench(
        total_bytes=total_bytes, files=files, chunk_size=chunk_size, work_dir=work_dir
    ) as bench:
        limits: list[float] = []
        stages: list[float] = []
        for _ in range(runs):
            limits.append(bench.aesgcm_mb_s())
            stages.append(bench.stage_mb_s())
        stream = statistics.median(bench.aesgcm_stream_mb_s() for _ in range(min(runs, 3)))
        ratios = [s / lim for s, lim in zip(stages, limits, strict=True)]
        return StageThroughput(
            stage_mb_s=statistics.median(stages),
            aesgcm_mb_s=statistics.median(limits),
            aesgcm_stream_mb_s=stream,
            ratio=statistics.median(ratios),
            ratio_spread=(min(ratios), max(ratios)),
            stage_values=tuple(stages),
            limit_values=tuple(limits),
            first_mb_s=stages[0],
            workers=WORKERS,
            total_bytes=bench.total_bytes,
            files=files,
            chunk_size=chunk_size,
            runs=runs,
        )


def _ignore(_event: object) -> None:
    pass


def _vmstat() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/vmstat", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in _COUNTERS:
                    out[key] = int(value)
    except OSError:
        pass
    return out
