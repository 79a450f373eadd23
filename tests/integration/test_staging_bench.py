"""The staging bench's parts (needs root for the tmpfs): each timed staging is a fresh tmpfs that
is gone afterwards, and what the kernel did for it is recorded beside its rate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclave.vault._bench import StageBench
from enclave.vault._tmpfs import mount_points

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="staging mounts a tmpfs: needs root")


def test_each_staging_is_fresh_and_its_costs_are_recorded(tmp_path: Path) -> None:
    with StageBench(total_bytes=4 << 20, files=2, work_dir=tmp_path) as bench:
        before = set(mount_points())
        rates = [bench.stage_mb_s() for _ in range(2)]
        assert set(mount_points()) == before  # each staging was destroyed after its timing
        assert all(r > 0 for r in rates)
        assert [s.mb_s for s in bench.samples] == rates
        for s in bench.samples:
            assert s.seconds > 0 and s.user_ms >= 0 and s.system_ms >= 0
            assert set(s.counters) == {
                "thp_file_alloc",
                "thp_file_fallback",
                "pgfault",
                "compact_stall",
            }
        assert bench.aesgcm_mb_s() > 0
        assert bench.aesgcm_stream_mb_s() > 0
        assert bench.total_bytes == 4 << 20
    assert list(tmp_path.iterdir()) == []


def test_the_bench_refuses_no_runs(tmp_path: Path) -> None:
    from enclave.vault import measure_stage_throughput

    with pytest.raises(ValueError, match="runs"):
        measure_stage_throughput(total_bytes=1 << 20, runs=0, work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_every_staged_file_map_is_advised_for_huge_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes
    import mmap

    from enclave.vault import _staging

    real = _staging._ask_huge_pages
    advised: list[bool] = []

    def spy(m: mmap.mmap) -> None:
        real(m)
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        advised.append(_has_flag(address, "hg"))

    monkeypatch.setattr(_staging, "_ask_huge_pages", spy)
    with StageBench(total_bytes=6 << 20, files=3, work_dir=tmp_path) as bench:
        bench.stage_mb_s()
    assert advised == [True, True, True]


def _has_flag(address: int, flag: str) -> bool:
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif head == "VmFlags:" and inside:
                return flag in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
