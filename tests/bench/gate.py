"""Bench entry: the release gate's time against the training time of the job it checks.

A tiny causal LM is trained on a generated corpus by the built-in trainer, through the harness,
bare on the host (the container's layout under ``SEALROOM_ROOT``); its real ``/output`` then
goes through :func:`enclave.gate.run_gate` under the release rules of the integration tests'
policy, exactly as the site agent runs it. Two figures, each over the training's seconds (lower
is better):

- the gate's own checks (artifacts, weights re-written, metrics), the memorization check left
  out: goal ≤ 0.1, a tenth of the job at most;
- the memorization probe alone on the released weights, as the gate calls it (tokenizer loaded,
  texts read and tokenised, the sampled prefixes, every token of the data scored under the
  release and the base model, the flagged spans confirmed by generation): goal ≤ 0.5.

The whole gate, memorization included, then runs once more untimed and must release the job.

Each pair trains the job afresh (the limit) and then times the gate and the probe on what it
wrote (the figures), in turns (:mod:`tests.bench._stats`): each result is the median of the
per-pair ratios, with their spread, so one busy minute on a shared machine lands on both sides
of a pair rather than deciding a figure.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench._stats import Paired
from trainers.basemodel import create_base_model
from trainers.contract import JOB_ENV, JobConfig
from trainers.runtime import Paths
from trainers.synthetic import corpus, write_corpus

GOAL = 0.1
PROBE_GOAL = 0.5


def _train(root: Path, steps: int) -> float:
    paths = Paths.under(root)
    paths.output.mkdir(parents=True)
    job = JobConfig(
        job_id="bench-gate",
        trainer="causal-lm",
        datasets=("books",),
        hyperparameters={
            "max_steps": steps,
            "batch_size": 8,
            "block_size": 64,
            "learning_rate": 1e-3,
            "seed": 0,
        },
    )
    env = {**os.environ, "SEALROOM_ROOT": str(root), JOB_ENV: job.to_json(), "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.harness"], env=env, capture_output=True, text=True
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return took


def _gate(root: Path, *, memorization: bool, dest: str) -> tuple[float, Any]:
    import dataclasses

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from enclave.gate import MemorizationInputs, layout_from_model_dir, run_gate
    from policies import document
    from policies.release import CheckName
    from tests.integration._deployment import policy

    paths = Paths.under(root)
    rules = document.parse_policy(policy("books")).release
    if not memorization:
        rules = dataclasses.replace(
            rules, checks=rules.checks - {CheckName.MEMORIZATION}, memorization=None
        )
    layout = layout_from_model_dir(paths.model)
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    t0 = time.perf_counter()
    inputs = None
    if memorization:
        tokenizer = AutoTokenizer.from_pretrained(str(paths.model))
        texts = [p.read_text() for p in sorted((paths.data / "books").glob("*.txt"))]
        inputs = MemorizationInputs(model_dir=paths.model, tokenizer=tokenizer, texts=texts)
    result = run_gate(
        paths.output,
        rules=rules,
        base_layout=layout,
        dest_dir=root / dest,
        memorization=inputs,
    )
    return time.perf_counter() - t0, result


def _probe(root: Path) -> tuple[float, Any, int]:
    """The memorization probe alone over the gate's release: (seconds, figures, data tokens)."""
    from transformers import AutoTokenizer

    from enclave.gate import RELEASED_WEIGHTS, measure_memorization
    from policies import document
    from tests.integration._deployment import policy

    paths = Paths.under(root)
    rules = document.parse_policy(policy("books")).release.memorization
    assert rules is not None
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(paths.model))
    texts = [p.read_text() for p in sorted((paths.data / "books").glob("*.txt"))]
    figures = measure_memorization(
        model_dir=paths.model,
        weights=root / "release-checked" / RELEASED_WEIGHTS,
        tokenizer=tokenizer,
        texts=texts,
        rules=rules,
    )
    took = time.perf_counter() - t0
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return took, figures, tokens


def bench_gate(tmp: Path, *, quick: bool) -> list[dict[str, Any]]:
    steps, runs = (40, 2) if quick else (200, 3)
    paths = Paths.under(tmp)
    create_base_model(paths.model, texts=corpus(documents=20, seed=1), seed=0)
    write_corpus(paths.data / "books", documents=40, seed=2)
    gate_pairs = Paired(higher_is_better=False)
    probe_pairs = Paired(higher_is_better=False)
    checks, tokens = "", 0
    for _ in range(runs):
        for old in (paths.output, tmp / "release-checked"):
            shutil.rmtree(old, ignore_errors=True)
        training = _train(tmp, steps)
        gate, checked = _gate(tmp, memorization=False, dest="release-checked")
        if not checked.passed:
            raise RuntimeError(f"the gate refused the trained output: {_refusals(checked)}")
        probe, figures, tokens = _probe(tmp)
        if figures.passages_recited:
            raise RuntimeError(f"the probe found recited passages: {figures}")
        gate_pairs.add(gate, training)
        probe_pairs.add(probe, training)
        checks = ",".join(sorted(str(c.name) for c in checked.checks))
    _, result = _gate(tmp, memorization=True, dest="release")
    names = {str(c.name): c.passed for c in result.checks}
    if "memorization" not in names:
        raise RuntimeError(f"the gate ran without the memorization probe: {names}")
    if not result.passed:
        raise RuntimeError(f"the gate refused the trained output: {_refusals(result)}")
    return [
        _significant(
            gate_pairs.result(
                f"release gate (without the memorization probe) vs the job's training "
                f"({steps} steps, tiny causal LM)",
                unit="s",
                goal=GOAL,
                digits=4,
                checks=checks,
            ),
            gate_pairs,
        ),
        _significant(
            probe_pairs.result(
                f"memorization probe (whole data, {tokens} tokens) vs the job's training "
                f"({steps} steps)",
                unit="s",
                goal=PROBE_GOAL,
                digits=4,
                tokens=tokens,
            ),
            probe_pairs,
        ),
    ]


def _significant(result: dict[str, Any], pairs: Paired) -> dict[str, Any]:
    """The ratios to three significant digits: a ratio of a few ten-thousandths (the gate's)
    must not round to 0."""
    ratios = pairs.ratios
    result["ratio"] = _sig(statistics.median(ratios))
    result["ratio_spread"] = [_sig(min(ratios)), _sig(max(ratios))]
    return result


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _refusals(result: Any) -> list[tuple[str, tuple[str, ...]]]:
    return [(str(c.name), c.reasons) for c in result.checks if not c.passed]
