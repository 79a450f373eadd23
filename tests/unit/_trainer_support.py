"""What the trainer tests share: inputs laid out as the container mounts them, a run of the
harness as the container runs it, and one intra-op thread for the tests' torch.

:func:`make_inputs` writes a template root (``data/<name>/`` and ``model/base/``) once per
module; :func:`mount` gives each run a fresh root whose data and model are the template's;
:func:`run_harness` calls ``trainers.harness.main`` with the job's environment and returns its
exit code and stderr. The ``one_thread`` fixture lives in ``tests/unit/conftest.py``; a module
asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from trainers import contract, synthetic
from trainers.basemodel import create_base_model
from trainers.contract import JobConfig
from trainers.harness import main
from trainers.runtime import ROOT_ENV

FAST = {"max_steps": 4, "batch_size": 4, "block_size": 32, "seed": 3}


def make_inputs(
    root: Path,
    *,
    books: str | None = "books",
    labelled: str | None = None,
    labelled_count: int = 60,
) -> Path:
    """A template root: a generated corpus under ``data/<books>``, labelled examples under
    ``data/<labelled>`` (either may be None), and a tiny base model under ``model/base``."""
    if books is not None:
        synthetic.write_corpus(root / "data" / books, documents=12, seed=1)
    if labelled is not None:
        synthetic.write_labelled(root / "data" / labelled, count=labelled_count, seed=1)
    create_base_model(root / "model" / "base", texts=synthetic.corpus(documents=12, seed=0))
    return root


def digests(top: Path) -> dict[str, str]:
    return {
        str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
        if p.is_file()
    }


def mount(root: Path, template: Path) -> Path:
    """A fresh root whose data and model are the template's (symlinked, as if mounted)."""
    root.mkdir(parents=True)
    (root / "data").symlink_to(template / "data")
    (root / "model").symlink_to(template / "model")
    return root


def run_harness(root: Path, hyperparameters: Any = None, **job: Any) -> tuple[int, str]:
    """Run the harness on ``root`` as the container would; returns (exit code, stderr)."""
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "trainer": "causal-lm",
        "datasets": ("books",),
        "hyperparameters": dict(FAST) if hyperparameters is None else hyperparameters,
        **job,
    }
    env = {contract.JOB_ENV: JobConfig(**fields).to_json(), ROOT_ENV: str(root)}
    err = io.StringIO()
    saved = dict(os.environ)  # Lightning's seed_everything writes PL_* into the environment
    try:
        rc = main(env, stderr=err)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return rc, err.getvalue()
