"""Attacks on the gate through the shape of ``/output``: links into the data, special files,
pickles, unexpected files, and sheer size or count. The gate must refuse without reading
through a link, without blocking, and without echoing the names the job chose."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import torch

from enclave.gate import layout_from_files, run_gate
from policies.release import CheckName, CheckOutcome, OutputLimits
from tests.unit._release_support import job_output, rules, write_tensors

SECRET = "patient-4711-hiv-positive"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    write_tensors(path, {"w": torch.randn(4, 4), "b": torch.randn(4)})
    return path


@pytest.fixture
def data_dir(tmp_path: Path, base: Path) -> Path:
    """Stands for /data: it holds a file that would pass the gate, so following a link to it
    would release it."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "model.safetensors").write_bytes(base.read_bytes())
    (d / "records.csv").write_text(f"id,diagnosis\n1,{SECRET}\n")
    return d


def _gate(tmp_path: Path, out: Path, base: Path, **kw: object):
    result = run_gate(
        out,
        rules=kw.pop("rules", rules()),  # type: ignore[arg-type]
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "release",
    )
    assert not (tmp_path / "release").exists() or result.passed
    return result


def _refused_artifacts(result) -> str:
    assert not result.passed
    first = result.checks[0]
    assert first.name is CheckName.ARTIFACTS and first.outcome is CheckOutcome.REFUSED
    # Nothing after a refused listing runs: the output is not trusted to be read.
    assert all(c.outcome is CheckOutcome.NOT_RUN for c in result.checks[1:])
    text = " ".join(first.reasons)
    assert SECRET not in text
    return text


def test_symlinked_weights_file_into_data_is_refused_not_followed(
    tmp_path: Path, base: Path, data_dir: Path
) -> None:
    out = tmp_path / "output"
    (out / "weights").mkdir(parents=True)
    os.symlink(data_dir / "model.safetensors", out / "weights" / "model.safetensors")
    text = _refused_artifacts(_gate(tmp_path, out, base))
    assert "'.safetensors' file in weights/ (name withheld) is a symbolic link" in text


def test_symlinked_weights_directory_is_refused(tmp_path: Path, base: Path, data_dir: Path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    os.symlink(data_dir, out / "weights")
    text = _refused_artifacts(_gate(tmp_path, out, base))
    assert "'weights' is a symbolic link" in text


def test_symlinked_metrics_pointing_at_data_is_refused(
    tmp_path: Path, base: Path, data_dir: Path
) -> None:
    out = job_output(tmp_path, base)
    os.symlink(data_dir / "records.csv", out / "metrics.json")
    assert "'metrics.json' is a symbolic link" in _refused_artifacts(_gate(tmp_path, out, base))


def test_symlink_named_like_progress_file_is_refused(
    tmp_path: Path, base: Path, data_dir: Path
) -> None:
    out = job_output(tmp_path, base)
    os.symlink(data_dir / "records.csv", out / "metrics.jsonl")
    assert "'metrics.jsonl' is a symbolic link" in _refused_artifacts(_gate(tmp_path, out, base))


def test_hardlink_into_data_is_refused(tmp_path: Path, base: Path, data_dir: Path) -> None:
    out = tmp_path / "output"
    (out / "weights").mkdir(parents=True)
    os.link(data_dir / "model.safetensors", out / "weights" / "model.safetensors")
    text = _refused_artifacts(_gate(tmp_path, out, base))
    assert "has more than one hard link" in text


def test_fifo_is_refused_without_blocking(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    os.mkfifo(out / "metrics.json")  # opening this for reading would block forever
    assert "'metrics.json' is a FIFO" in _refused_artifacts(_gate(tmp_path, out, base))
    out2 = job_output(tmp_path / "2", base)
    os.mkfifo(out2 / "weights" / "shard.safetensors")
    assert "is a FIFO" in _refused_artifacts(_gate(tmp_path / "2", out2, base))


def test_socket_is_refused(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(out / "weights" / "x.safetensors"))
        assert "is a socket" in _refused_artifacts(_gate(tmp_path, out, base))


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_node_is_refused(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    os.mknod(out / "metrics.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    assert "'metrics.json' is a device node" in _refused_artifacts(_gate(tmp_path, out, base))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "state.pkl"])
def test_pickle_files_are_refused(tmp_path: Path, base: Path, name: str) -> None:
    out = job_output(tmp_path, base)
    payload = b"\x80\x04\x95cos\nsystem\n(S'id'\ntR."
    (out / "weights" / name).write_bytes(payload)
    text = _refused_artifacts(_gate(tmp_path, out, base))
    assert "pickle-format files are refused" in text
    (out / "weights" / name).unlink()
    (out / name).write_bytes(payload)  # at the top level as well
    result = run_gate(
        out, rules=rules(), base_layout=layout_from_files([base]), dest_dir=tmp_path / "r2"
    )
    assert "pickle-format files are refused" in " ".join(result.checks[0].reasons)


def test_unexpected_file_is_refused_and_its_name_not_echoed(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    (out / f"{SECRET}.txt").write_text("x")
    text = _refused_artifacts(_gate(tmp_path, out, base))
    assert "an entry (name withheld) is not a release artifact" in text
    out2 = job_output(tmp_path / "2", base)
    (out2 / "weights" / f"{SECRET}.safetensors.txt").write_text("x")
    (out2 / "weights" / "sub").mkdir()
    text = _refused_artifacts(_gate(tmp_path / "2", out2, base))
    assert "not a .safetensors file" in text and "is a directory" in text


def test_no_weights_is_refused(tmp_path: Path, base: Path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    (out / "metrics.json").write_text('{"loss": 1}')
    assert "no weights" in _refused_artifacts(_gate(tmp_path, out, base))
    (out / "weights").mkdir()
    assert "no weights" in _refused_artifacts(_gate(tmp_path, out, base))


def test_too_many_files_and_oversized_files_are_refused(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    for i in range(10):
        (out / "weights" / f"s{i}.safetensors").write_bytes(b"")
    small = rules(limits=OutputLimits(max_files=8))
    assert "more than 8 entries" in _refused_artifacts(_gate(tmp_path, out, base, rules=small))

    out2 = job_output(tmp_path / "2", base)
    tiny = rules(limits=OutputLimits(max_file_bytes=64))
    assert "exceeds the size cap of 64 bytes" in _refused_artifacts(
        _gate(tmp_path / "2", out2, base, rules=tiny)
    )
    (out2 / "metrics.json").write_text(" " * 70_000)
    assert "exceeds the size cap" in _refused_artifacts(_gate(tmp_path / "2", out2, base))


def test_metrics_present_when_policy_releases_none(tmp_path: Path, base: Path) -> None:
    from policies.release import ArtifactKind

    out = job_output(tmp_path, base, {"loss": 1.0})
    only_weights = rules(allowed_artifacts=frozenset({ArtifactKind.WEIGHTS}))
    text = _refused_artifacts(_gate(tmp_path, out, base, rules=only_weights))
    assert "releases no metrics" in text
