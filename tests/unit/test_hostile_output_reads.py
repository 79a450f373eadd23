"""Attacks on the site's reads of what a job wrote: every file the site reads from ``/output``
(live progress ``metrics.jsonl``, ``metrics.json``, ``weights/*.safetensors``) and the primitive
they all go through (:mod:`enclave._beneath`).

The job plants a symbolic link (to a file or a directory, absolute or relative) to a host file
with known content, a hard link to it, a FIFO, a device node or a 1 TiB sparse file, or swaps
its file for a link in a tight loop while the site reads. Each test drives the site's real
reader (the agent's progress follower, the release gate, the primitive) and checks what it
reported or released: never the host file's numbers or bytes, never blocked, never a
job-chosen name in a refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from enclave import _beneath, _mounts, _progress
from enclave.gate import layout_from_files, run_gate
from tests.unit._release_support import read_raw, rules, write_tensors

HOST_STEP, HOST_TOTAL, HOST_LOSS = 7777, 8888, 4242.0
"""Numbers only the host file holds: any of them reaching an event is a leak."""
HOST_PROGRESS = (
    json.dumps({"step": HOST_STEP, "total": HOST_TOTAL, "loss": HOST_LOSS}).encode() + b"\n"
) * 4
HOST_METRICS = json.dumps({"loss": HOST_LOSS}).encode()
HOST_BYTES = b"HOST-SECRET-5f1c: a host file the site must never read for a job\n"
JOB_PROGRESS = b'{"step": 1, "total": 10, "loss": 1.5}\n{"step": 2, "total": 10, "loss": 1.25}\n'
JOB_METRICS = json.dumps({"loss": 1.5})
HOST_VALUE, JOB_VALUE = 7.0, 0.5
NAME = "exfil-name-carrying-data"
TIMEOUT_S = 10.0


@pytest.fixture(params=["openat2", "per-component"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the primitive resolves a path: ``openat2`` and the walk where it is missing."""
    if request.param == "per-component":
        monkeypatch.setattr(_beneath, "_OPENAT2_NR", None)
    return str(request.param)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory (outside the output) with files that would pass every check if read:
    progress lines, metrics and weights of the right layout, and plain bytes."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "metrics.jsonl").write_bytes(HOST_PROGRESS)
    (d / "metrics.json").write_bytes(HOST_METRICS)
    write_tensors(d / "model.safetensors", _tensors(HOST_VALUE))
    (d / "secret.txt").write_bytes(HOST_BYTES)
    return d


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "output"
    d.mkdir()
    return d


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value), "b": torch.full((4,), value)}


def bounded(fn: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    """``fn()`` in a thread: the site's read must return (or raise) within ``timeout_s``."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the test below
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "the site's read blocked"
    if error:
        raise error[0]
    return result[0]


# -- what the site does with each file ---------------------------------------------------------


def progress_events(out: Path) -> list[tuple[int, int, float]]:
    """What the agent would report: the real follower (as agent.py uses it) for a short run,
    and one direct read from the start of the file."""
    events: list[tuple[int, int, float]] = []
    with _progress.follow(out, events.append, interval_s=0.005):
        time.sleep(0.05)
    last, _ = _progress.read_progress(out, 0, None)
    return events + ([last] if last is not None else [])


def assert_no_host_progress(events: list[tuple[int, int, float]]) -> None:
    for step, total, loss in events:
        assert step != HOST_STEP and total != HOST_TOTAL and loss != HOST_LOSS, events


def gate(out: Path, dest: Path, base: Path) -> tuple[bool, str, dict[str, float], set[float]]:
    """Run the release gate; (passed, its reasons, the released metrics, released tensor values)."""
    result = run_gate(out, rules=rules(), base_layout=layout_from_files([base]), dest_dir=dest)
    text = " ".join(r for c in result.checks for r in c.reasons)
    if not result.passed:
        assert not dest.exists()
        return False, text, {}, set()
    metrics = json.loads((dest / "metrics.json").read_text())
    header, data = read_raw(dest / "weights" / "model.safetensors")
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[
        header["w"]["dtype"]
    ]
    values = set(torch.frombuffer(bytearray(data), dtype=dtype).float().tolist())
    return True, text, metrics, values


def assert_no_host_release(outcome: tuple[bool, str, dict[str, float], set[float]]) -> None:
    passed, text, metrics, values = outcome
    assert str(HOST_LOSS) not in text and NAME not in text
    if passed:
        assert metrics.get("loss") != HOST_LOSS
        assert all(abs(v - HOST_VALUE) > 1 for v in values)  # re-quantised, scrubbed: near


def job_files(out: Path, *, weights: bool = True, metrics: bool = True) -> None:
    if weights:
        (out / "weights").mkdir(exist_ok=True)
        write_tensors(out / "weights" / "model.safetensors", _tensors(JOB_VALUE))
    if metrics:
        (out / "metrics.json").write_text(JOB_METRICS)


# -- the attacks, one planting function each ---------------------------------------------------


def _replace(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()


def link_file_absolute(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    p.symlink_to(host / Path(rel).name)


def link_file_relative(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    p.symlink_to(os.path.relpath(host / Path(rel).name, p.parent))


def link_dir_absolute(out: Path, rel: str, host: Path) -> None:
    """The file's directory is a link to the host directory (for a top-level file, the file
    itself is a link to a directory)."""
    parts = rel.split("/")
    if len(parts) == 1:
        _replace(out / rel)
        (out / rel).symlink_to(host, target_is_directory=True)
        return
    d = out / parts[0]
    if d.is_dir() and not d.is_symlink():
        for child in d.iterdir():
            child.unlink()
        d.rmdir()
    d.symlink_to(host, target_is_directory=True)


def link_dir_relative(out: Path, rel: str, host: Path) -> None:
    parts = rel.split("/")
    target = out / parts[0]
    if len(parts) > 1 and target.is_dir() and not target.is_symlink():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    _replace(target)
    target.symlink_to(os.path.relpath(host, out), target_is_directory=True)


def hard_link(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    os.link(host / Path(rel).name, p)


def fifo(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    os.mkfifo(p)  # a reader that opened it without O_NONBLOCK would wait for a writer forever


def device(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is


def sparse_tib(out: Path, rel: str, host: Path) -> None:
    p = out / rel
    _replace(p)
    with open(p, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, no block allocated: reading it would take hours


ATTACKS = {
    "symlink-to-file-absolute": link_file_absolute,
    "symlink-to-file-relative": link_file_relative,
    "symlink-to-dir-absolute": link_dir_absolute,
    "symlink-to-dir-relative": link_dir_relative,
    "hard-link-to-host-file": hard_link,
    "fifo": fifo,
    "device-node": device,
    "sparse-1tib": sparse_tib,
}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")


def _attacks() -> list[Any]:
    return [
        pytest.param(name, marks=needs_root) if name == "device-node" else name for name in ATTACKS
    ]


# -- live progress (metrics.jsonl, read by the agent's follower) --------------------------------


@pytest.mark.parametrize("attack", _attacks())
def test_progress_follower_never_reports_a_planted_host_file(
    out: Path, host: Path, resolver: str, attack: str
) -> None:
    ATTACKS[attack](out, "metrics.jsonl", host)
    t0 = time.monotonic()
    events = bounded(lambda: progress_events(out))
    assert events == []  # nothing planted is ever read as progress
    assert time.monotonic() - t0 < 5  # a sparse giant is refused from its size, unread


def test_progress_follower_reports_the_jobs_own_lines(out: Path, resolver: str) -> None:
    (out / "metrics.jsonl").write_bytes(JOB_PROGRESS)
    assert bounded(lambda: progress_events(out))[-1] == (2, 10, 1.25)


def test_progress_race_file_swapped_for_a_link_never_reports_host_numbers(
    out: Path, host: Path, resolver: str
) -> None:
    with swapping(out / "metrics.jsonl", JOB_PROGRESS, host / "metrics.jsonl") as swaps:
        events: list[tuple[int, int, float]] = []
        with _progress.follow(out, events.append, interval_s=0.0005):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                last, _ = _progress.read_progress(out, 0, None)
                if last is not None:
                    events.append(last)
    assert swaps() > 100, "the swapper did not race"
    assert events, "the race never let the job's own progress through: nothing was tested"
    assert_no_host_progress(events)


@contextlib.contextmanager
def swapping(path: Path, own: bytes, host_file: Path) -> Iterator[Callable[[], int]]:
    """Swap ``path`` between a regular file holding ``own`` and a link to ``host_file`` as fast
    as a thread can, each swap one atomic rename (from beside the output, so the output holds
    nothing else); yield a counter of swaps made."""
    stop = threading.Event()
    count = [0]
    path.write_bytes(own)
    spare = host_file.parent.parent / "spare"
    spare.mkdir(exist_ok=True)
    tmp_link = spare / "link"
    tmp_file = spare / "file"

    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            tmp_link.symlink_to(host_file)
            os.replace(tmp_link, path)
            tmp_file.write_bytes(own)
            os.replace(tmp_file, path)
            count[0] += 2

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield lambda: count[0]
    finally:
        stop.set()
        t.join(TIMEOUT_S)


# -- the release gate (metrics.json and weights/*.safetensors) ---------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    write_tensors(path, _tensors(0.0))
    return path


@pytest.mark.parametrize("rel", ["metrics.json", "weights/model.safetensors"])
@pytest.mark.parametrize("attack", _attacks())
def test_gate_never_releases_a_planted_host_file(
    tmp_path: Path, out: Path, host: Path, base: Path, rel: str, attack: str
) -> None:
    job_files(out)
    ATTACKS[attack](out, rel, host)
    t0 = time.monotonic()
    outcome = bounded(lambda: gate(out, tmp_path / "release", base))
    assert time.monotonic() - t0 < 5
    assert not outcome[0], "a planted file was released"
    assert_no_host_release(outcome)


def test_gate_releases_the_jobs_own_files(tmp_path: Path, out: Path, base: Path) -> None:
    job_files(out)
    passed, _, metrics, values = gate(out, tmp_path / "release", base)
    assert passed and metrics == {"loss": 1.5}
    assert values and all(abs(v - JOB_VALUE) < 0.01 for v in values)  # scrubbed low bits


@pytest.mark.parametrize("rel", ["metrics.json", "weights/model.safetensors"])
def test_gate_race_file_swapped_for_a_link_never_releases_host_content(
    tmp_path: Path, out: Path, host: Path, base: Path, rel: str
) -> None:
    job_files(out)
    own = (out / rel).read_bytes()
    released = 0
    with swapping(out / rel, own, host / Path(rel).name) as swaps:
        for i in range(150):
            outcome = gate(out, tmp_path / f"release-{i}", base)
            assert_no_host_release(outcome)
            released += outcome[0]
    assert swaps() > 100, "the swapper did not race"
    assert released > 0, "the race never let the job's own files through: nothing was tested"


def test_gate_race_weights_directory_swapped_for_a_link(
    tmp_path: Path, out: Path, host: Path, base: Path
) -> None:
    job_files(out)
    stop = threading.Event()
    weights, aside = out / "weights", tmp_path / "weights-aside"

    def swap() -> None:
        while not stop.is_set():
            os.rename(weights, aside)
            weights.symlink_to(host, target_is_directory=True)
            weights.unlink()
            os.rename(aside, weights)

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        outcomes = [gate(out, tmp_path / f"release-{i}", base) for i in range(150)]
    finally:
        stop.set()
        t.join(TIMEOUT_S)
    for outcome in outcomes:
        assert_no_host_release(outcome)


# -- the primitive every such read goes through --------------------------------------------------


@pytest.mark.parametrize("attack", _attacks())
def test_primitive_refuses_every_planted_file(
    out: Path, host: Path, resolver: str, attack: str
) -> None:
    (out / "sub").mkdir()
    rel = "sub/secret.txt"
    ATTACKS[attack](out, rel, host)
    t0 = time.monotonic()
    with pytest.raises(_beneath.BeneathRefused) as info:
        bounded(lambda: _beneath.read_beneath(out, rel, max_bytes=1 << 20))
    assert time.monotonic() - t0 < 5
    assert "secret" not in str(info.value)
    with pytest.raises(_beneath.BeneathRefused):
        bounded(lambda: _beneath.read_new(out, rel, 0, max_bytes=1 << 20, max_size=1 << 30))


def test_primitive_reads_a_plain_file_and_refuses_over_the_cap(out: Path, resolver: str) -> None:
    (out / "d").mkdir()
    (out / "d" / "f").write_bytes(b"x" * 100)
    assert _beneath.read_beneath(out, "d/f", max_bytes=100) == b"x" * 100
    with pytest.raises(_beneath.BeneathRefused, match="exceeds its size cap"):
        _beneath.read_beneath(out, "d/f", max_bytes=99)
    assert _beneath.read_new(out, "d/f", 90, max_bytes=5, max_size=100) == b"x" * 5
    assert _beneath.read_new(out, "d/f", 100, max_bytes=5, max_size=100) == b""
    with pytest.raises(_beneath.BeneathRefused, match="exceeds its size cap"):
        _beneath.read_new(out, "d/f", 0, max_bytes=5, max_size=99)


@pytest.mark.parametrize("rel", ["../host/secret.txt", "/etc/passwd", "a//b", "./x", ""])
def test_primitive_refuses_paths_that_are_not_plain_and_relative(
    out: Path, host: Path, resolver: str, rel: str
) -> None:
    with pytest.raises(_beneath.BeneathRefused, match="not a plain relative path"):
        _beneath.read_beneath(out, rel, max_bytes=1 << 20)


def test_primitive_refusals_never_echo_a_job_chosen_name(
    out: Path, host: Path, resolver: str
) -> None:
    (out / NAME).mkdir()
    (out / NAME / NAME).symlink_to(host / "secret.txt")
    for rel in (f"{NAME}/{NAME}", f"{NAME}/missing-{NAME}", NAME):
        with pytest.raises(_beneath.BeneathRefused) as info:
            _beneath.read_beneath(out, rel, max_bytes=1 << 20)
        assert NAME not in str(info.value) and info.value.__cause__ is None


def test_primitive_refuses_a_root_that_is_a_link(tmp_path: Path, host: Path) -> None:
    (tmp_path / "linked-output").symlink_to(host, target_is_directory=True)
    with pytest.raises(_beneath.BeneathRefused, match="root cannot be opened"):
        _beneath.read_beneath(tmp_path / "linked-output", "secret.txt", max_bytes=1 << 20)


def test_primitive_refuses_a_socket(out: Path, resolver: str) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(out / "sock"))
        with pytest.raises(_beneath.BeneathRefused, match="not a regular file"):
            bounded(lambda: _beneath.read_beneath(out, "sock", max_bytes=1 << 20))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_primitive_refuses_a_file_on_another_filesystem(
    tmp_path: Path, out: Path, resolver: str
) -> None:
    with _mounts.tmpfs(out / "mnt", size_bytes=1 << 20, owner=(0, 0)) as mnt:
        (mnt / "f").write_bytes(HOST_BYTES)
        with pytest.raises(_beneath.BeneathRefused, match="another filesystem"):
            _beneath.read_beneath(out, "mnt/f", max_bytes=1 << 20)


def test_primitive_race_never_returns_the_host_file(out: Path, host: Path, resolver: str) -> None:
    own = b"the job's own bytes\n"
    got_own = 0
    with swapping(out / "f", own, host / "secret.txt") as swaps:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline or swaps() < 200:
            try:
                data = _beneath.read_beneath(out, "f", max_bytes=1 << 20)
            except _beneath.BeneathRefused:
                continue
            assert data == own
            got_own += 1
    assert swaps() > 100 and got_own > 0


def test_openat2_is_used_where_the_kernel_has_it(out: Path) -> None:
    (out / "f").write_bytes(b"x")
    _beneath.read_beneath(out, "f", max_bytes=1)
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release >= (5, 6):
        assert _beneath._OPENAT2_NR is not None  # no silent fallback on a kernel that has it
