"""Listing and opening a job's output the way the site does (the gate's
:func:`~enclave.gate._walk.list_output` and :func:`~enclave.gate._walk.open_verified`, which
opens through :mod:`enclave._beneath`): every planted link or special file is refused, nothing
is ever followed, nothing blocks, and refusals never echo a job-chosen name.

These are the attacks once aimed at ``enclave._collect`` (a walker no production code called),
now aimed at what the site actually runs."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from pathlib import Path

import pytest

from enclave._beneath import BeneathRefused
from enclave.gate._walk import FileRef, Listing, list_output, open_verified
from policies.release import OutputLimits

SECRET = b"dataset bytes that must never be read through the output"
NAME = "exfil-name-carrying-data"
LIMITS = OutputLimits()


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


def listed(out: Path, limits: OutputLimits = LIMITS) -> Listing:
    listing, reasons = list_output(out, limits=limits)
    assert listing is not None, reasons
    return listing


def refused(out: Path, limits: OutputLimits = LIMITS) -> str:
    listing, reasons = list_output(out, limits=limits)
    assert listing is None and reasons
    text = "; ".join(reasons)
    assert NAME not in text and SECRET.decode() not in text
    return text


def read(out: Path, ref: FileRef) -> bytes:
    fd = open_verified(out, ref)
    try:
        return os.read(fd, ref.size + 1)
    finally:
        os.close(fd)


def test_a_plain_tree_is_listed_sorted_and_read(out: Path) -> None:
    (out / "weights").mkdir()
    (out / "weights" / "b.safetensors").write_bytes(b"w" * 10)
    (out / "weights" / "a.safetensors").write_bytes(b"v" * 3)
    (out / "metrics.json").write_text("{}")
    listing = listed(out)
    assert [(r.relpath, r.size) for r in listing.weights] == [
        ("weights/a.safetensors", 3),
        ("weights/b.safetensors", 10),
    ]
    assert listing.metrics is not None and listing.metrics.relpath == "metrics.json"
    assert (listing.entries, listing.total_bytes) == (4, 15)
    assert read(out, listing.weights[1]) == b"w" * 10
    assert read(out, listing.metrics) == b"{}"


def test_an_empty_output_is_refused(out: Path) -> None:
    assert "no weights" in refused(out)


@pytest.mark.parametrize("target", ["file", "dir", "dangling"])
def test_symbolic_links_are_refused_and_names_never_echoed(
    out: Path, data: Path, target: str
) -> None:
    dest = {"file": data / "secret.txt", "dir": data, "dangling": data / "nope"}[target]
    (out / "weights").mkdir()
    (out / "weights" / f"{NAME}.safetensors").symlink_to(dest)
    (out / NAME).symlink_to(dest)
    text = refused(out)
    assert "'.safetensors' file in weights/ (name withheld) is a symbolic link" in text
    assert "an entry (name withheld) is a symbolic link" in text


def test_hard_links_are_refused(out: Path, data: Path) -> None:
    (out / "weights").mkdir()
    os.link(data / "secret.txt", out / "weights" / f"{NAME}.safetensors")
    assert "more than one hard link" in refused(out)


def test_fifos_and_sockets_are_refused_without_blocking(out: Path) -> None:
    (out / "weights").mkdir()
    os.mkfifo(out / "metrics.json")  # a reader that opened it would hang
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(out / "weights" / "s.safetensors"))  # AF_UNIX paths are short
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(refused(out)), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "listing blocked on the FIFO"
    finally:
        sock.close()
    (text,) = result
    assert "'metrics.json' is a FIFO" in text and "is a socket" in text


def test_the_output_root_itself_must_not_be_a_link(tmp_path: Path, data: Path) -> None:
    (tmp_path / "output").symlink_to(data)
    assert "cannot be opened as a directory" in refused(tmp_path / "output")


def test_limits_on_entries_depth_and_bytes(out: Path) -> None:
    (out / "weights").mkdir()
    for i in range(5):
        (out / "weights" / f"f{i}.safetensors").write_bytes(b"x" * 100)
    assert "more than 3 entries" in refused(out, dataclasses.replace(LIMITS, max_files=3))
    assert "total cap of 400 bytes" in refused(
        out, dataclasses.replace(LIMITS, max_total_bytes=400)
    )
    assert "size cap of 99 bytes" in refused(out, dataclasses.replace(LIMITS, max_file_bytes=99))
    assert len(listed(out).weights) == 5
    # Nothing nests: a directory in weights/, or any other directory, is refused unentered.
    (out / "weights" / "a" / "b").mkdir(parents=True)
    (out / NAME / "c").mkdir(parents=True)
    text = refused(out)
    assert "weights/ holds files only" in text and "is not a release artifact" in text


def test_open_verified_refuses_a_file_swapped_for_a_link(out: Path, data: Path) -> None:
    (out / "weights").mkdir()
    (out / "weights" / "w.safetensors").write_bytes(b"weights")
    (ref,) = listed(out).weights
    (out / "weights" / "w.safetensors").unlink()
    (out / "weights" / "w.safetensors").symlink_to(data / "secret.txt")
    with pytest.raises(BeneathRefused, match="symbolic link"):
        open_verified(out, ref)


def test_open_verified_refuses_a_directory_swapped_for_a_link(out: Path, data: Path) -> None:
    (out / "weights").mkdir()
    (out / "weights" / "secret.txt.safetensors").write_bytes(b"weights")
    (ref,) = listed(out).weights
    (data / "secret.txt.safetensors").write_bytes(b"weights")  # same name and size there
    (out / "weights" / "secret.txt.safetensors").unlink()
    (out / "weights").rmdir()
    (out / "weights").symlink_to(data)  # weights/… now names the dataset's file
    with pytest.raises(BeneathRefused, match="symbolic link"):
        open_verified(out, ref)


def test_open_verified_refuses_another_inode_a_hard_link_or_growth(out: Path) -> None:
    (out / "weights").mkdir()
    w = out / "weights" / "w.safetensors"
    w.write_bytes(b"weights")
    (ref,) = listed(out).weights
    os.replace(w, out / "old")
    w.write_bytes(b"weightz")
    with pytest.raises(BeneathRefused, match="changed after it was listed"):
        open_verified(out, ref)
    (out / "old").unlink()
    (ref,) = listed(out).weights
    os.link(w, out / "second")
    with pytest.raises(BeneathRefused, match="more than one hard link"):
        open_verified(out, ref)
    (out / "second").unlink()
    with open(w, "ab") as f:
        f.write(b"x" * 200)
    with pytest.raises(BeneathRefused, match="changed after it was listed"):
        open_verified(out, ref)
    with pytest.raises(BeneathRefused, match="not a regular file"):
        open_verified(out, dataclasses.replace(ref, relpath="weights"))
