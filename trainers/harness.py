"""The container's entrypoint: ``python -m trainers.harness``.

Reads the job from :data:`trainers.contract.JOB_ENV`, validates it, runs the named built-in
trainer and writes ``metrics.json``. The exit code tells the site agent whose fault a failure
was: :data:`~trainers.contract.EXIT_BAD_CONFIG` with one line on stderr naming the field for a
bad configuration, :data:`~trainers.contract.EXIT_TRAINING_FAILED` for anything that went wrong
while training. Nothing is written outside the output directory and the scratch directory.

Trainers register in :data:`TRAINERS` by name: a torch-free ``validate`` (hyperparameters ->
frozen value, raising :class:`~trainers.errors.ConfigError`) and a ``run`` imported only when
the job runs, so that a bad configuration is refused before torch is even loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from trainers import contract
from trainers.contract import JobConfig
from trainers.errors import ConfigError, TrainerError
from trainers.hparams import (
    CausalLMHyperparameters,
    ClassificationHyperparameters,
    LoRAHyperparameters,
)
from trainers.private_hparams import PrivateHyperparameters
from trainers.runtime import Paths, RunContext


@dataclass(frozen=True)
class BuiltinTrainer:
    """A registry entry. ``run`` is ``"module:function"``, called as ``run(hparams, ctx)`` and
    returning the flat metrics for ``metrics.json``."""

    validate: Callable[[Mapping[str, Any]], Any]
    run: str

    def load_run(self) -> Callable[[Any, RunContext], Mapping[str, float]]:
        module, _, name = self.run.partition(":")
        fn: Callable[[Any, RunContext], Mapping[str, float]] = getattr(
            importlib.import_module(module), name
        )
        return fn


TRAINERS: dict[str, BuiltinTrainer] = {
    "causal-lm": BuiltinTrainer(
        validate=CausalLMHyperparameters.parse, run="trainers.causal_lm:run"
    ),
    "causal-lm-lora": BuiltinTrainer(
        validate=LoRAHyperparameters.parse, run="trainers.causal_lm:run_lora"
    ),
    "classification": BuiltinTrainer(
        validate=ClassificationHyperparameters.parse, run="trainers.classification:run"
    ),
    # A team's torch.export graph under the site's DP-SGD (custom_code: private); the bundle's
    # program is read as data, never run as Python (trainers.private).
    "private": BuiltinTrainer(
        validate=PrivateHyperparameters.parse, run="trainers.private:run_bundle"
    ),
}
"""Built-in trainers by the name a job spec uses."""

MAX_METRICS = 64


def _custom(job: JobConfig) -> BuiltinTrainer:
    """A registry entry for a team's own LightningModule (:mod:`trainers.custom`)."""
    from trainers import custom

    if job.entrypoint is None:
        raise ConfigError("entrypoint", "required when the trainer is 'custom'")
    entrypoint = job.entrypoint

    class _Custom(BuiltinTrainer):
        def load_run(self) -> Callable[[Any, RunContext], Mapping[str, float]]:
            cls = custom.load(entrypoint, code_dir=contract_code_dir())
            return lambda hp, ctx: custom.run(cls, hp, ctx)

    return _Custom(validate=dict, run="trainers.custom:run")


def contract_code_dir() -> Path:
    root = os.environ.get("SEALROOM_ROOT")
    return Path(root) / "code" if root else Path(str(contract.CODE_DIR))


def validate_job(job: JobConfig, *, paths: Paths) -> tuple[BuiltinTrainer, Any, RunContext]:
    """Check ``job`` against the registry and the mounts. Raises :class:`ConfigError`."""
    if job.trainer == "custom":
        entry = _custom(job)
        return entry, entry.validate(job.hyperparameters), _context(job, paths)
    if job.trainer not in TRAINERS:
        known = ", ".join(sorted(TRAINERS))
        raise ConfigError("trainer", f"unknown trainer {job.trainer!r}; built-in: {known}")
    if job.entrypoint is not None:
        raise ConfigError("entrypoint", f"must be empty for the built-in trainer {job.trainer!r}")
    entry = TRAINERS[job.trainer]
    hparams = entry.validate(job.hyperparameters)
    return entry, hparams, _context(job, paths)


def _context(job: JobConfig, paths: Paths) -> RunContext:
    if not job.datasets:
        raise ConfigError("datasets", "at least one dataset is needed")
    if len(set(job.datasets)) != len(job.datasets):
        raise ConfigError("datasets", "a dataset is named twice")
    dataset_dirs = tuple(paths.dataset(name, index=i) for i, name in enumerate(job.datasets))
    if not paths.model.is_dir():
        raise ConfigError("model", "no base model is mounted")
    return RunContext(
        job_id=job.job_id,
        dataset_dirs=dataset_dirs,
        model_dir=paths.model,
        weights_file=paths.weights_dir / "model.safetensors",
        progress_file=paths.progress_file,
        scratch_dir=paths.tmp,
        checkpoint_dir=paths.checkpoint_dir,
        dp=job.dp,
        **_round(job, paths),
    )


ROUND_TRAINERS = ("causal-lm", "causal-lm-lora", "classification")
"""The trainers a federated round runs: a LoRA adapter starts from the global adapter
(:func:`trainers.lora.load_adapter`), a whole model from the base plus the global difference
(:mod:`trainers.rounds`)."""


def _round(job: JobConfig, paths: Paths) -> dict[str, Any]:
    """A federated round's part of the run context: where it starts, and its FedProx pull."""
    if job.federated_round is None:
        return {}
    if job.trainer not in ROUND_TRAINERS:
        raise ConfigError(
            "federated_round", f"a federated round of {job.trainer!r} is not supported"
        )
    if not paths.start_weights.is_file():
        raise ConfigError("federated_round", "no starting weights are mounted for the round")
    return {
        "start_weights": paths.start_weights,
        "proximal_mu": job.federated_round.proximal_mu,
    }


def write_metrics(metrics: Mapping[str, float], dest: Path) -> None:
    """Write ``metrics`` as a flat JSON object of finite numbers, atomically (hidden file, then
    rename). Raises ``ValueError`` naming the metric that is not a finite number."""
    if not metrics or len(metrics) > MAX_METRICS:
        raise ValueError(f"metrics: expected 1 to {MAX_METRICS} values, got {len(metrics)}")
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"metrics: bad name {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metrics.{name}: not a number")
        if not math.isfinite(value):
            raise ValueError(f"metrics.{name}: not finite")
        clean[name] = float(value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.write_text(json.dumps(clean, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, dest)


def _quiet() -> None:
    # Library chatter goes to stdout/stderr, which stay in the site; keep them readable.
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Lightning 2.6 calling an API that torch 2.13 deprecated: not ours, not actionable.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is in the image
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def run_job(job: JobConfig, *, paths: Paths, stderr: TextIO | None = None) -> int:
    """Run ``job`` with the mounts in ``paths`` and return the harness's exit code."""
    err = stderr if stderr is not None else sys.stderr
    try:
        entry, hparams, ctx = validate_job(job, paths=paths)
    except ConfigError as e:
        print(f"sealroom-harness: bad config: {e}", file=err)
        return contract.EXIT_BAD_CONFIG
    try:
        ctx.weights_file.parent.mkdir(parents=True, exist_ok=True)
        paths.tmp.mkdir(parents=True, exist_ok=True)
        run = entry.load_run()
        _quiet()  # after the import: Lightning sets its loggers' levels when imported
        with tempfile.TemporaryDirectory(prefix="sealroom-", dir=paths.tmp) as scratch:
            metrics = run(hparams, dataclasses.replace(ctx, scratch_dir=Path(scratch)))
        write_metrics(metrics, paths.metrics_file)
    except ConfigError as e:  # found only once the model is loaded (e.g. block_size > context)
        print(f"sealroom-harness: bad config: {e}", file=err)
        return contract.EXIT_BAD_CONFIG
    except TrainerError as e:
        print(f"sealroom-harness: training failed: {type(e).__name__}: {e}", file=err)
        return contract.EXIT_TRAINING_FAILED
    except Exception as e:  # the trainer's own fault, whatever it is; the agent needs the code
        traceback.print_exc(file=err)
        print(f"sealroom-harness: training failed: {type(e).__name__}: {e}", file=err)
        return contract.EXIT_TRAINING_FAILED
    return contract.EXIT_OK


def warm_environment(text: str) -> dict[str, str]:
    """The job's environment from a warm container's assignment file: :data:`~trainers.contract.
    JOB_ENV` and ``JOB_*`` names only, string values. Raises ``ValueError``."""
    obj = json.loads(text)
    env = obj.get("env") if isinstance(obj, dict) else None
    if not isinstance(env, dict) or contract.JOB_ENV not in env:
        raise ValueError("the assignment carries no job")
    for k, v in env.items():
        if not isinstance(k, str) or not (k == contract.JOB_ENV or k.startswith("JOB_")):
            raise ValueError(f"the assignment names a variable outside the job's: {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise ValueError(f"the assignment's {k} is not a string")
    return dict(env)


def warm(
    assign_file: Path | None = None, *, poll_s: float = 0.005, stderr: TextIO | None = None
) -> int:
    """A warm container's harness: import what the built-in trainers need, then wait for the
    site's assignment and run that job (see :data:`~trainers.contract.WARM_FLAG`). Writes
    nothing before the job runs."""
    err = stderr if stderr is not None else sys.stderr
    path = assign_file or _contract_path(contract.WARM_ASSIGN_FILE)
    importlib.import_module("trainers.causal_lm")  # torch, pytorch_lightning
    transformers = importlib.import_module("transformers")
    _ = (transformers.AutoModelForCausalLM, transformers.AutoTokenizer)  # resolve the lazy names
    print(contract.WARM_READY, flush=True)
    while True:
        try:
            text = path.read_text(encoding="utf-8")
            break
        except FileNotFoundError:
            time.sleep(poll_s)
    try:
        env = warm_environment(text)
    except ValueError as e:
        print(f"sealroom-harness: bad config: {e}", file=err)
        return contract.EXIT_BAD_CONFIG
    os.environ.update(env)
    return main(stderr=err)


def _contract_path(path: PurePosixPath) -> Path:
    root = os.environ.get("SEALROOM_ROOT")
    return Path(root) / path.relative_to("/") if root else Path(str(path))


def main(environ: Mapping[str, str] | None = None, *, stderr: TextIO | None = None) -> int:
    """Read the job from ``environ`` (default: the process environment) and run it."""
    env = os.environ if environ is None else environ
    err = stderr if stderr is not None else sys.stderr
    text = env.get(contract.JOB_ENV)
    try:
        if text is None:
            raise ValueError("is not set")
        job = JobConfig.from_json(text)
    except KeyError as e:
        print(f"sealroom-harness: bad config: {contract.JOB_ENV}: missing {e}", file=err)
        return contract.EXIT_BAD_CONFIG
    except (ValueError, TypeError) as e:
        print(f"sealroom-harness: bad config: {contract.JOB_ENV}: {e}", file=err)
        return contract.EXIT_BAD_CONFIG
    return run_job(job, paths=Paths.from_env(env), stderr=err)


if __name__ == "__main__":
    sys.exit(warm() if sys.argv[1:] == [contract.WARM_FLAG] else main())
