"""Walking and reading a job's output on the host: every planted link or special file is refused,
nothing is ever followed, and refusals never echo a job-chosen name."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from enclave._collect import OutputRefused, read_entry, walk_output

SECRET = b"dataset bytes that must never be read through the output"
NAME = "exfil-name-carrying-data"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "output"
    d.mkdir()
    return d


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "secret.txt").write_bytes(SECRET)
    return d


def test_a_plain_tree_is_listed_sorted(out: Path) -> None:
    (out / "weights").mkdir()
    (out / "weights" / "model.safetensors").write_bytes(b"w" * 10)
    (out / "metrics.json").write_text("{}")
    entries = walk_output(out)
    assert [(e.relpath, e.is_dir, e.size) for e in entries] == [
        ("metrics.json", False, 2),
        ("weights", True, 0),
        ("weights/model.safetensors", False, 10),
    ]
    assert read_entry(out, entries[2], max_bytes=10) == b"w" * 10
    assert walk_output(out / "weights") == (
        entries[2].__class__("model.safetensors", False, 10, entries[2].dev, entries[2].ino),
    )


def test_an_empty_output_is_empty(out: Path) -> None:
    assert walk_output(out) == ()


@pytest.mark.parametrize("target", ["file", "dir", "dangling"])
def test_symbolic_links_are_refused_and_names_never_echoed(
    out: Path, data: Path, target: str
) -> None:
    dest = {"file": data / "secret.txt", "dir": data, "dangling": data / "nope"}[target]
    (out / "sub").mkdir()
    (out / "sub" / NAME).symlink_to(dest)
    with pytest.raises(OutputRefused, match="symbolic link") as info:
        walk_output(out)
    assert NAME not in str(info.value) and "depth 2" in str(info.value)
    assert info.value.relpaths == (f"sub/{NAME}",)


def test_hard_links_are_refused(out: Path, data: Path) -> None:
    os.link(data / "secret.txt", out / NAME)
    with pytest.raises(OutputRefused, match="2 hard links") as info:
        walk_output(out)
    assert NAME not in str(info.value)


def test_fifos_and_sockets_are_refused_without_blocking(out: Path) -> None:
    os.mkfifo(out / "metrics.json")  # a reader that opened it would hang
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(out / "sock"))
    try:
        result: list[BaseException] = []

        def walk() -> None:
            try:
                walk_output(out)
            except OutputRefused as e:
                result.append(e)

        t = threading.Thread(target=walk, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "walking blocked on the FIFO"
    finally:
        sock.close()
    (err,) = result
    assert "a FIFO" in str(err) and "a socket" in str(err)


def test_the_output_root_itself_must_not_be_a_link(tmp_path: Path, data: Path) -> None:
    (tmp_path / "output").symlink_to(data)
    with pytest.raises(OutputRefused, match="cannot be opened as a directory"):
        walk_output(tmp_path / "output")


def test_limits_on_entries_depth_and_bytes(out: Path) -> None:
    for i in range(5):
        (out / f"f{i}").write_bytes(b"x" * 100)
    with pytest.raises(OutputRefused, match="more than 3 entries"):
        walk_output(out, max_entries=3)
    with pytest.raises(OutputRefused, match="exceed 400 bytes"):
        walk_output(out, max_bytes=400)
    assert len(walk_output(out, max_entries=5, max_bytes=500)) == 5
    deep = out / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    with pytest.raises(OutputRefused, match="nest deeper than 3"):
        walk_output(out, max_depth=3)


def test_read_entry_refuses_a_file_swapped_for_a_link(out: Path, data: Path) -> None:
    (out / "w.bin").write_bytes(b"weights")
    (entry,) = walk_output(out)
    (out / "w.bin").unlink()
    (out / "w.bin").symlink_to(data / "secret.txt")
    with pytest.raises(OutputRefused, match="without following a link"):
        read_entry(out, entry, max_bytes=1 << 20)


def test_read_entry_refuses_a_directory_swapped_for_a_link(out: Path, data: Path) -> None:
    (out / "weights").mkdir()
    (out / "weights" / "secret.txt").write_bytes(b"weights")
    entry = walk_output(out)[1]
    (out / "weights" / "secret.txt").unlink()
    (out / "weights").rmdir()
    (out / "weights").symlink_to(data)  # weights/secret.txt now names the dataset's file
    with pytest.raises(OutputRefused, match="without following a link"):
        read_entry(out, entry, max_bytes=1 << 20)


def test_read_entry_refuses_another_inode_a_hard_link_or_growth(out: Path, data: Path) -> None:
    (out / "w.bin").write_bytes(b"weights")
    (entry,) = walk_output(out)
    os.replace(out / "w.bin", out / "old")
    (out / "w.bin").write_bytes(b"other")
    with pytest.raises(OutputRefused, match="changed after it was listed"):
        read_entry(out, entry, max_bytes=100)
    (out / "old").unlink()
    (entry,) = walk_output(out)
    os.link(out / "w.bin", out / "second")
    with pytest.raises(OutputRefused, match="changed after it was listed"):
        read_entry(out, entry, max_bytes=100)
    (out / "second").unlink()
    with open(out / "w.bin", "ab") as f:
        f.write(b"x" * 200)
    with pytest.raises(OutputRefused, match="exceeds 100 bytes"):
        read_entry(out, entry, max_bytes=100)
    with pytest.raises(OutputRefused, match="a directory"):
        read_entry(out, entry.__class__("d", True, 0, 0, 0), max_bytes=100)
