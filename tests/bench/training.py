"""Bench entry: training steps per second in the enclave vs the same script bare on the host.

Both runs use the same harness, model, data and hyperparameters. The enclave run is the
runtime image under :class:`~enclave.runtime.DockerRuntime` with every isolation option (no
network, read-only root, caps dropped, limits); the bare run is the harness in a subprocess
on the host with the same paths laid out under ``SEALROOM_ROOT`` and the same thread count.

Steps per second are those of the training loop alone, read off each run's own progress file:
the harness stamps every line with ``time_s``, seconds since the first step started, on the
process's monotonic clock, so (last step - 1) / (its time_s - the first step's time_s) is the
rate of steps 2..N. Everything the enclave adds inside the loop is in it (the CPU quota, the
cgroup's accounting, seccomp, the output mount the progress lines and checkpoints go to); its
start-up is not, and nothing is subtracted: subtracting a separately measured start-up (as this
entry did) takes the difference of two noisy figures of several seconds, and with each side's
best full run against one start-up run it was not even a like-for-like subtraction. The runs'
wall times are reported beside the figure.

The runs take turns (bare, enclave, bare, enclave, ...; :mod:`tests.bench._stats`), and the
figure is the median of the per-pair ratios with their spread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench._stats import interleave
from trainers.basemodel import create_base_model
from trainers.contract import JOB_ENV, JobConfig
from trainers.runtime import Paths
from trainers.synthetic import corpus, write_corpus

THREADS = 2
"""Torch's threads on both sides (OMP_NUM_THREADS), and the enclave's CPU limit."""


def _job(steps: int) -> JobConfig:
    return JobConfig(
        job_id="bench-train",
        trainer="causal-lm",
        datasets=("books",),
        hyperparameters={
            "max_steps": steps,
            "batch_size": 16,
            "block_size": 64,
            "learning_rate": 1e-3,
            "seed": 0,
        },
    )


def loop_rate(progress_file: Path, steps: int) -> float:
    """Steps per second of steps 2..N from a run's progress lines (``step``, ``time_s``)."""
    times: dict[int, float] = {}
    for line in progress_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        times[int(row["step"])] = float(row["time_s"])
    if 1 not in times or steps not in times or steps < 2:
        raise RuntimeError(f"{progress_file}: no progress lines for steps 1 and {steps}")
    took = times[steps] - times[1]
    if took <= 0:
        raise RuntimeError(f"{progress_file}: steps 2..{steps} took {took} s")
    return (steps - 1) / took


class Runs:
    """Each side's wall times, beside the loop rates the pairs hold."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {"bare": [], "enclave": []}


def _bare(root: Path, steps: int, runs: Runs) -> float:
    paths = Paths.under(root)
    shutil.rmtree(paths.output, ignore_errors=True)
    paths.output.mkdir(parents=True)
    env = {
        **os.environ,
        "SEALROOM_ROOT": str(root),
        JOB_ENV: _job(steps).to_json(),
        "OMP_NUM_THREADS": str(THREADS),
    }
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trainers.harness"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    runs.wall["bare"].append(time.perf_counter() - t0)
    return loop_rate(paths.progress_file, steps)


def _enclave(root: Path, steps: int, runs: Runs) -> float:
    from enclave.runtime import ContainerSpec, DockerRuntime, RunState

    paths = Paths.under(root)
    out = Path(tempfile.mkdtemp(dir=root, prefix=f"enclave-out-{steps}-"))
    os.chown(out, 10001, 10001)
    rt = DockerRuntime()
    spec = ContainerSpec(
        image=rt.resolve_image("sealroom-runtime:latest"),
        job_id=f"bench-train-{steps}-{out.name[-8:].lower()}",
        env={JOB_ENV: _job(steps).to_json(), "OMP_NUM_THREADS": str(THREADS)},
        read_only_mounts={paths.data / "books": "/data/books", paths.model: "/model/base"},
        output_dir=out,
        memory_bytes=4 << 30,
        cpus=float(THREADS),
        pids=512,
        tmp_bytes=1 << 30,
        timeout_s=900,
        labels={"org.sealroom.bench": "training"},
    )
    h = rt.prepare(spec)
    try:
        t0 = time.perf_counter()
        rt.start(h)
        st = rt.wait(h, timeout_s=900)
        runs.wall["enclave"].append(time.perf_counter() - t0)
        if st.state is not RunState.EXITED or st.exit_code != 0:
            raise RuntimeError(
                f"the enclave run ended {st.state}: {st.reason}: "
                f"{rt.logs(h, max_bytes=4000).decode(errors='replace')}"
            )
        return loop_rate(out / "metrics.jsonl", steps)
    finally:
        rt.cleanup(h)
        shutil.rmtree(out, ignore_errors=True)


def bench_training(tmp: Path, *, quick: bool) -> dict[str, Any]:
    steps, pairs = (30, 2) if quick else (200, 5)
    paths = Paths.under(tmp)
    create_base_model(paths.model, texts=corpus(documents=20, seed=1), seed=0, size="small")
    write_corpus(paths.data / "books", documents=60, seed=2)
    os.chmod(tmp, 0o755)
    runs = Runs()
    paired = interleave(
        lambda: _enclave(tmp, steps, runs),
        lambda: _bare(tmp, steps, runs),
        runs=pairs,
    )
    return paired.result(
        "training: steps/s in the enclave vs bare on the host (causal-lm, small)",
        unit="steps/s",
        goal=0.98,
        digits=2,
        steps=steps,
        threads=THREADS,
        bare_wall_s=[round(x, 2) for x in runs.wall["bare"]],
        enclave_wall_s=[round(x, 2) for x in runs.wall["enclave"]],
    )
