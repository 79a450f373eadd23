"""The Docker backend's reading of the engine's ``State`` (pure: no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave.runtime import ContainerSpec, RunState
from enclave.runtime._docker_state import Record, engine_status, parse_time


def record() -> Record:
    spec = ContainerSpec(
        image="sha256:" + "0" * 64,
        job_id="job-1",
        output_dir=Path("/nonexistent"),
        memory_bytes=1 << 30,
        cpus=1.0,
        pids=64,
        tmp_bytes=1 << 20,
        timeout_s=60,
    )
    return Record(spec=spec, container_id="c" * 64)


@pytest.mark.parametrize(
    ("started", "finished"),
    [
        # Seen on a real engine: a job that exits at once, stamped as ending 0.4 ms before it
        # started (tests/integration/test_runtime_contract.py, test_a_job_runs_to_its_exit).
        ("2026-12-02T21:57:04.051051234Z", "2026-12-02T21:57:04.050671234Z"),
        ("2026-12-02T21:57:04.051051234Z", "2026-12-02T21:57:05.000000001Z"),
    ],
)
def test_an_end_is_never_before_its_start(started: str, finished: str) -> None:
    st = engine_status(
        record(),
        {"Status": "exited", "ExitCode": 0, "StartedAt": started, "FinishedAt": finished},
    )
    assert st.state is RunState.EXITED
    assert st.started_at == parse_time(started)
    assert st.finished_at is not None and st.started_at is not None
    assert st.finished_at >= st.started_at
    assert st.finished_at == max(parse_time(started), parse_time(finished))  # type: ignore[type-var]
