"""Staging's memory maps are advised MADV_HUGEPAGE, so that a fault on fragmented memory compacts
for a huge page instead of silently falling back to 4 KiB pages (see _staging._ask_huge_pages)."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import pytest

from enclave.vault import _staging

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="VmFlags are Linux's")


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    current: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = (lo, hi)
        elif head == "VmFlags:" and current and current[0] <= address < current[1]:
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_a_staging_map_is_advised_for_huge_pages(tmp_path: Path) -> None:
    f = tmp_path / "staged.bin"
    f.write_bytes(b"\0" * (4 << 20))
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 4 << 20) as plain:
        with mmap.mmap(fh.fileno(), 4 << 20) as advised:
            _staging._ask_huge_pages(advised)
            assert "hg" in _vm_flags(_address(advised))
        assert "hg" not in _vm_flags(_address(plain))  # the check can tell the two apart


def test_a_refused_hint_does_not_stop_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE")  # a kernel or Python without THP
    with mmap.mmap(-1, 4096) as m:
        _staging._ask_huge_pages(m)  # no error
