"""``python -m trainers.gpu_check``: the built-in trainers bare on this machine's accelerator.

Creates a base model locally (random init, tokenizer trained on a generated corpus), lays out
the container's paths under a temporary root (``SEALROOM_ROOT``) and runs the harness as the
container would, once per trainer and model size. Steps per second are read off the run's own
progress lines (``time_s`` on each line of ``metrics.jsonl``, counted from the first step's
start), from the first line to the last, so model loading, tokenising, the first step's
warm-up and the final evaluation are excluded; the wall time of the whole run is given beside
it. Prints one JSON object: the device, the precision the trainers chose on it (what
:func:`trainers.training.precision` picks for ``auto``) and, per run, the rates and the final
loss. For a GPU machine at hand; it needs torch, pytorch-lightning, transformers and peft, and
no Docker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from trainers import contract, synthetic
from trainers.basemodel import create_base_model
from trainers.contract import JobConfig
from trainers.harness import run_job
from trainers.runtime import ROOT_ENV, Paths

TRAINERS = ("causal-lm", "causal-lm-lora", "classification")


def _hyperparameters(
    trainer: str, *, steps: int, batch_size: int, block_size: int
) -> dict[str, Any]:
    common: dict[str, Any] = {"max_steps": steps, "batch_size": batch_size, "learning_rate": 1e-3}
    if trainer == "classification":
        return {**common, "max_length": block_size}
    if trainer == "causal-lm-lora":
        return {**common, "block_size": block_size, "target_modules": "q_proj,k_proj,v_proj,o_proj"}
    return {**common, "block_size": block_size}


def measure(
    size: str, *, steps: int, batch_size: int, block_size: int, trainer: str = "causal-lm"
) -> dict[str, Any]:
    """Run ``trainer`` for ``steps`` steps on a generated ``size`` model and time it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = Paths.under(root)
        create_base_model(
            paths.model, texts=synthetic.corpus(documents=40, seed=1), seed=0, size=size
        )
        if trainer == "classification":
            synthetic.write_labelled(paths.data / "books", count=4000, seed=2)
        else:
            synthetic.write_corpus(paths.data / "books", documents=200, seed=2)
        paths.output.mkdir(parents=True)
        os.environ[ROOT_ENV] = str(root)
        job = JobConfig(
            job_id="gpu-check",
            trainer=trainer,
            datasets=("books",),
            hyperparameters=_hyperparameters(
                trainer, steps=steps, batch_size=batch_size, block_size=block_size
            ),
        )
        t0 = time.perf_counter()
        code = run_job(job, paths=paths)
        wall = time.perf_counter() - t0
        if code != contract.EXIT_OK:
            raise SystemExit(f"{trainer}: the harness failed with exit code {code}")
        lines = [json.loads(x) for x in paths.progress_file.read_text().splitlines()]
        metrics = json.loads(paths.metrics_file.read_text())
    first, last = lines[0], lines[-1]
    timed = last["time_s"] - first["time_s"]
    rate = (last["step"] - first["step"]) / timed if timed > 0 else None
    return {
        "trainer": trainer,
        "size": size,
        "steps": steps,
        "batch_size": batch_size,
        "block_size": block_size,
        "wall_s": round(wall, 2),
        "steps_per_s": None if rate is None else round(rate, 2),
        "steps_per_s_wall": round(steps / wall, 2),
        "final_loss": last["loss"],
        "train_loss": metrics.get("train_loss"),
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    from trainers.training import precision

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    runs: list[dict[str, Any]] = []
    for trainer in args.trainers.split(","):
        for size in args.sizes.split(","):
            runs.append(
                measure(
                    size,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    block_size=args.block_size,
                    trainer=trainer,
                )
            )
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "precision": precision("auto"),
        "runs": runs,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
