"""Bench entry: training steps per second in the enclave vs the same script bare on the host.

Both runs use the same harness, model, data and hyperparameters. The enclave run is the
runtime image under :class:`~enclave.runtime.DockerRuntime` with every isolation option (no
network, read-only root, caps dropped, limits); the bare run is the harness in a subprocess
on the host with the same paths laid out under ``SEALROOM_ROOT`` and the same CPU count.
Steps per second are taken over the training loop alone, from the progress lines' step count
and the container's and process's own wall time minus their start-up (measured by a run of
one step), so image start-up does not count against training.
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

from trainers.basemodel import create_base_model
from trainers.contract import JOB_ENV, JobConfig
from trainers.runtime import Paths
from trainers.synthetic import corpus, write_corpus


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


def _bare(root: Path, steps: int) -> float:
    paths = Paths.under(root)
    shutil.rmtree(paths.output, ignore_errors=True)
    paths.output.mkdir(parents=True)
    env = {
        **os.environ,
        "SEALROOM_ROOT": str(root),
        JOB_ENV: _job(steps).to_json(),
        "OMP_NUM_THREADS": "2",
    }
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trainers.harness"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def _enclave(root: Path, steps: int) -> float:
    from enclave.runtime import ContainerSpec, DockerRuntime, RunState

    paths = Paths.under(root)
    out = Path(tempfile.mkdtemp(dir=root, prefix=f"enclave-out-{steps}-"))
    os.chown(out, 10001, 10001)
    rt = DockerRuntime()
    spec = ContainerSpec(
        image=rt.resolve_image("sealroom-runtime:latest"),
        job_id=f"bench-train-{steps}",
        env={JOB_ENV: _job(steps).to_json(), "OMP_NUM_THREADS": "2"},
        read_only_mounts={paths.data / "books": "/data/books", paths.model: "/model/base"},
        output_dir=out,
        memory_bytes=4 << 30,
        cpus=2.0,
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
        took = time.perf_counter() - t0
        if st.state is not RunState.EXITED or st.exit_code != 0:
            raise RuntimeError(
                f"the enclave run ended {st.state}: {st.reason}: "
                f"{rt.logs(h, max_bytes=4000).decode(errors='replace')}"
            )
    finally:
        rt.cleanup(h)
    return took


def bench_training(tmp: Path, *, quick: bool) -> dict[str, Any]:
    steps = 30 if quick else 200
    paths = Paths.under(tmp)
    create_base_model(paths.model, texts=corpus(documents=20, seed=1), seed=0, size="small")
    write_corpus(paths.data / "books", documents=60, seed=2)
    os.chmod(tmp, 0o755)
    # Start-up (imports, model load, tokenising, evaluation) measured by a 1-step run of each,
    # then subtracted: what remains is the training loop. The full runs take turns, and each
    # side's best counts: noise on a shared machine only ever adds time.
    runs = [(_bare(tmp, steps), _enclave(tmp, steps)) for _ in range(1 if quick else 2)]
    bare = min(b for b, _ in runs) - _bare(tmp, 1)
    enclave = min(e for _, e in runs) - _enclave(tmp, 1)
    bare_rate, enclave_rate = (steps - 1) / bare, (steps - 1) / enclave
    return {
        "name": "training: steps/s in the enclave vs bare on the host (causal-lm, small)",
        "value": round(enclave_rate, 2),
        "limit": round(bare_rate, 2),
        "unit": "steps/s",
        "ratio": round(enclave_rate / bare_rate, 3),
        "goal": 0.98,
        "steps": steps,
        "progress": json.dumps(
            {
                "bare_s": round(bare, 2),
                "enclave_s": round(enclave, 2),
                "runs_s": [[round(b, 2), round(e, 2)] for b, e in runs],
            }
        ),
    }
