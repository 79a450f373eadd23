"""Warm containers without an engine: the spec's receiving mounts, their create options, which
jobs a warm container may be given, and the warm harness's reading of its assignment.

The engine's side (a running warm container given a job, attacked from inside) is
``tests/integration/test_hostile_warm.py``.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from enclave.runtime import ContainerSpec, check_mount_sources, container_options
from enclave.runtime.docker import _check_assignable
from policies.errors import InvalidInput
from trainers import contract, harness

MiB = 1024**2
IMAGE = "sha256:" + "ab" * 32


def warm_spec(tmp_path: Path, **changes: Any) -> ContainerSpec:
    spec = ContainerSpec(
        image=IMAGE,
        job_id="warm-1",
        output_dir=tmp_path / "slot" / "output",
        memory_bytes=16 * 1024 * MiB,
        cpus=2.0,
        pids=512,
        tmp_bytes=64 * MiB,
        timeout_s=3600.0,
        read_only_mounts={tmp_path / "slot" / "code": "/code"},
        receive_mounts={tmp_path / "slot" / "data": "/data", tmp_path / "slot" / "model": "/model"},
        command=("/usr/bin/python3", "-m", "trainers.harness", "--warm"),
    )
    return replace(spec, **changes)


def job_spec(tmp_path: Path, **changes: Any) -> ContainerSpec:
    spec = ContainerSpec(
        image=IMAGE,
        job_id="job-1",
        output_dir=tmp_path / "slot" / "output",
        memory_bytes=512 * MiB,
        cpus=1.0,
        pids=64,
        tmp_bytes=64 * MiB,
        timeout_s=600.0,
        env={"SEALROOM_JOB": "{}"},
        read_only_mounts={
            tmp_path / "staging" / "books": "/data/books",
            tmp_path / "models" / "tiny": "/model/base",
            tmp_path / "slot" / "code": "/code",
        },
    )
    return replace(spec, **changes)


@pytest.mark.parametrize("target", ["/", "/data/books", "/model/base", "/code", "/output", "/tmp"])
def test_a_warm_container_receives_only_at_data_and_model(tmp_path: Path, target: str) -> None:
    with pytest.raises(InvalidInput, match="receive_mounts"):
        warm_spec(tmp_path, receive_mounts={tmp_path / "x": target})


def test_receiving_mounts_never_meet_the_data_or_the_output(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="twice"):
        warm_spec(
            tmp_path,
            read_only_mounts={tmp_path / "ds": "/data/books"},
        )
    with pytest.raises(InvalidInput, match="output"):
        warm_spec(tmp_path, receive_mounts={tmp_path / "slot" / "output" / "d": "/data"})


def test_receiving_mounts_are_read_only_binds_with_slave_propagation(tmp_path: Path) -> None:
    spec = warm_spec(tmp_path)
    for d in (*spec.read_only_mounts, *spec.receive_mounts, spec.output_dir):
        d.mkdir(parents=True)
    opts = container_options(spec, mounts=check_mount_sources(spec))
    by_target = {m["Target"]: m for m in opts["mounts"]}
    for target in ("/data", "/model"):
        assert by_target[target]["ReadOnly"] is True
        assert by_target[target]["BindOptions"] == {"Propagation": "rslave"}
    assert by_target["/code"]["ReadOnly"] is True and "BindOptions" not in by_target["/code"]
    assert by_target["/output"]["ReadOnly"] is False and "BindOptions" not in by_target["/output"]
    assert opts["network_mode"] == "none" and opts["read_only"] and opts["cap_drop"] == ["ALL"]


def test_a_warm_container_may_be_given_a_built_in_job(tmp_path: Path) -> None:
    _check_assignable(warm_spec(tmp_path), job_spec(tmp_path))


@pytest.mark.parametrize(
    "change",
    [
        {"image": "sha256:" + "cd" * 32},
        {"runtime": "runsc"},
        {"gpus": 1},
        {"tmp_bytes": 128 * MiB},
        {"shm_bytes": 128 * MiB},
        {"log_bytes": 1 * MiB},
        {"command": ("/bin/sh", "-c", "id")},
        {"output_dir": Path("/elsewhere/output")},
    ],
    ids=lambda c: next(iter(c)),
)
def test_what_a_running_container_cannot_change_must_already_be_the_jobs(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        _check_assignable(warm_spec(tmp_path), job_spec(tmp_path, **change))


@pytest.mark.parametrize(
    "mounts",
    [
        {"/code": "other-code"},  # a code bundle: the warm container's /code is its own, empty
        {"/model/base": None, "/code": None, "/data/books": None, "/model/other": "x"},
    ],
)
def test_a_warm_container_receives_only_data_and_the_model(
    tmp_path: Path, mounts: dict[str, str | None]
) -> None:
    base = {t: h for h, t in job_spec(tmp_path).read_only_mounts.items()}
    for target, host in mounts.items():
        if host is not None:
            base[target] = tmp_path / host
    if "/model/other" in mounts:
        with pytest.raises(InvalidInput):  # not a contract path at all
            job_spec(tmp_path, read_only_mounts={h: t for t, h in base.items()})
        return
    with pytest.raises(InvalidInput, match="/code"):
        _check_assignable(
            warm_spec(tmp_path),
            job_spec(tmp_path, read_only_mounts={h: t for t, h in base.items()}),
        )


def test_a_warm_spec_without_both_receiving_mounts_takes_no_job(tmp_path: Path) -> None:
    warm = warm_spec(tmp_path, receive_mounts={tmp_path / "slot" / "data": "/data"})
    with pytest.raises(InvalidInput, match="receive"):
        _check_assignable(warm, job_spec(tmp_path))


# -- the warm harness --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"env": {}}',
        '{"env": {"PATH": "/evil", "SEALROOM_JOB": "{}"}}',
        '{"env": {"LD_PRELOAD": "/data/x.so", "SEALROOM_JOB": "{}"}}',
        '{"env": {"SEALROOM_JOB": 5}}',
        '{"env": {"SEALROOM_JOB": "{}", "JOB_X": "a\\u0000b"}}',
        "not json",
    ],
)
def test_the_warm_harness_takes_only_a_jobs_variables(text: str) -> None:
    with pytest.raises(ValueError):
        harness.warm_environment(text)


def test_the_warm_harness_waits_for_its_assignment_then_runs_that_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[dict[str, str]] = []

    def fake_main(environ: Any = None, *, stderr: Any = None) -> int:
        import os

        ran.append({k: v for k, v in os.environ.items() if k.startswith(("SEALROOM_JOB", "JOB_"))})
        return 0

    monkeypatch.setattr(harness, "main", fake_main)
    monkeypatch.delenv("SEALROOM_JOB", raising=False)
    assign = tmp_path / "code" / contract.WARM_ASSIGN_FILE.name
    assign.parent.mkdir()
    out = io.StringIO()
    result: list[int] = []
    t = threading.Thread(
        target=lambda: result.append(harness.warm(assign, poll_s=0.001, stderr=out)), daemon=True
    )
    t.start()
    time.sleep(0.05)
    assert t.is_alive() and ran == []  # nothing runs before the site's assignment
    # Written as the site writes it (enclave._warm: whole, then renamed into place): a plain
    # write_text let the harness, polling every millisecond, read the file while it was empty.
    partial = assign.with_name(".partial")
    partial.write_text(json.dumps({"env": {"SEALROOM_JOB": '{"job_id": "j"}', "JOB_SEED": "3"}}))
    os.replace(partial, assign)
    t.join(60)
    assert result == [0]
    assert ran == [{"SEALROOM_JOB": '{"job_id": "j"}', "JOB_SEED": "3"}]


def test_a_bad_assignment_is_a_bad_config(tmp_path: Path) -> None:
    assign = tmp_path / "assign.json"
    assign.write_text('{"env": {"PATH": "/x"}}')
    err = io.StringIO()
    assert harness.warm(assign, stderr=err) == contract.EXIT_BAD_CONFIG
    assert "bad config" in err.getvalue()
