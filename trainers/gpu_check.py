"""``python -m trainers.gpu_check``: the built-in trainers bare on this machine's accelerator.

Creates a base model locally (random init, tokenizer trained on a generated corpus), lays out
the container's paths under a temporary root (``SEALROOM_ROOT``) and runs the harness as the
container would, timing the optimizer steps. Prints one JSON object: the device, the precision
the trainer chose, and steps per second per trainer and model size. For a GPU machine at hand;
it needs torch, pytorch-lightning and transformers, and no Docker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from trainers import contract
from trainers.basemodel import create_base_model
from trainers.contract import JobConfig
from trainers.harness import run_job
from trainers.runtime import Paths
from trainers.synthetic import corpus, write_corpus


def measure(size: str, *, steps: int, batch_size: int, block_size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = Paths.under(root)
        create_base_model(paths.model, texts=corpus(documents=40, seed=1), seed=0, size=size)
        write_corpus(paths.data / "books", documents=200, seed=2)
        paths.output.mkdir(parents=True)
        os.environ["SEALROOM_ROOT"] = str(root)
        job = JobConfig(job_id="gpu-check", trainer="causal-lm", datasets=("books",),
                        hyperparameters={"max_steps": steps, "batch_size": batch_size,
                                         "block_size": block_size, "learning_rate": 1e-3})
        t0 = time.perf_counter()
        code = run_job(job, paths=paths)
        wall = time.perf_counter() - t0
        if code != contract.EXIT_OK:
            raise SystemExit(f"the harness failed with exit code {code}")
        lines = [json.loads(x) for x in paths.progress_file.read_text().splitlines()]
        metrics = json.loads(paths.metrics_file.read_text())
    # Steps per second over the training loop alone: from the first progress line to the
    # last (model loading, tokenising and evaluation excluded), from the file's own timing.
    return {"size": size, "steps": steps, "batch_size": batch_size, "block_size": block_size,
            "wall_s": round(wall, 2), "steps_per_s_wall": round(steps / wall, 2),
            "final_loss": lines[-1]["loss"], "train_loss": metrics.get("train_loss")}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sizes", default="tiny,small")
    args = p.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    out = {"device": device, "torch": torch.__version__, "bf16": bf16, "runs": []}
    for size in args.sizes.split(","):
        out["runs"].append(measure(size, steps=args.steps, batch_size=32, block_size=128))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
