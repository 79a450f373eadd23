"""What a job's container is: the site's limits, the code bundle unpacked, the container spec.

:class:`SiteLimits` is what a site grants at most, whatever a spec asks. :func:`unpack_bundle`
unpacks the team's code bundle with the tar ``data`` filter (no links out, no devices, no
absolute paths), capped in entries and bytes. :func:`job_container` is the
:class:`~enclave.runtime.ContainerSpec` one job runs in: the spec's resources within the site's
limits, the data, model and code read-only at the contract's paths, the job's configuration in
its environment. :mod:`enclave.tryrun` builds the same container for a dry run.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from enclave.runtime import ContainerSpec
from policies.errors import InvalidInput
from policies.spec import JobSpec
from trainers.contract import (
    CODE_DIR,
    DATA_DIR,
    JOB_ENV,
    MODEL_DIR,
    START_DIR,
    DPParameters,
    JobConfig,
    RoundTraining,
)

MAX_BUNDLE_FILES = 10_000
MAX_BUNDLE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class SiteLimits:
    """What this site grants at most, whatever a spec asks."""

    output_bytes: int = 2 * 1024**3
    tmp_bytes: int = 1024**3
    memory_mb: int = 16 * 1024
    cpus: float = 2.0
    pids: int = 512
    gpus: int = 0
    dataset_bytes: int = 64 * 1024**3
    dataset_files: int = 1_000_000
    runtime: str = "runc"
    """The OCI runtime jobs run under: runc, or runsc (gVisor) or kata where installed."""
    warm_containers: int = 0
    """Containers kept started ahead of any job, their imports done, each given to one job
    of a built-in trainer without a code bundle and destroyed after it (:mod:`enclave._warm`);
    0: every job starts its container cold."""


DEFAULT_LIMITS = SiteLimits()


def job_container(
    spec: JobSpec,
    *,
    dp: DPParameters | None = None,
    job_id: str,
    image: str,
    limits: SiteLimits,
    data: Mapping[str, Path],
    model_dir: Path,
    code_dir: Path,
    output: Path,
    labels: Mapping[str, str],
    federated_round: RoundTraining | None = None,
    start_dir: Path | None = None,
) -> ContainerSpec:
    """The container one job runs in: the spec's resources within the site's limits, the data,
    model and code read-only at the contract's paths, the job's configuration in its env. A
    federated round also gets its start (``start_dir``, read-only at the contract's path) and
    trains the plan's ``local_steps``."""
    hyperparameters = dict(spec.hyperparameters)
    mounts: dict[Path, str] = {}
    if federated_round is not None:
        if spec.federation is None or start_dir is None:
            raise InvalidInput("a federated round needs the job's plan and the round's start")
        hyperparameters["max_steps"] = spec.federation.local_steps
        mounts[start_dir] = str(START_DIR)
    config = JobConfig(
        job_id=job_id,
        trainer=spec.trainer,
        datasets=tuple(data),
        hyperparameters=hyperparameters,
        entrypoint=spec.entrypoint,
        dp=dp,
        federated_round=federated_round,
    )
    return ContainerSpec(
        image=image,
        job_id=job_id,
        env={**spec.env, JOB_ENV: config.to_json()},
        read_only_mounts={
            **{path: str(DATA_DIR / name) for name, path in data.items()},
            model_dir: str(MODEL_DIR),
            code_dir: str(CODE_DIR),
            **mounts,
        },
        output_dir=output,
        memory_bytes=min(spec.resources.memory_mb, limits.memory_mb) * 1024**2,
        cpus=min(spec.resources.cpus, limits.cpus),
        pids=limits.pids,
        tmp_bytes=limits.tmp_bytes,
        timeout_s=spec.resources.timeout_s,
        gpus=spec.resources.gpus,
        runtime=limits.runtime,
        labels={"org.sealroom.job": job_id, **labels},
    )


def unpack_bundle(bundle: Path, dest: Path) -> None:
    """Unpack a code bundle with the tar ``data`` filter, capped in files and bytes."""
    try:
        with tarfile.open(bundle, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_BUNDLE_FILES:
                raise InvalidInput(f"code bundle has over {MAX_BUNDLE_FILES} entries")
            if sum(m.size for m in members) > MAX_BUNDLE_BYTES:
                raise InvalidInput(f"code bundle unpacks to over {MAX_BUNDLE_BYTES} bytes")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise InvalidInput(f"code bundle refused: {e}") from e
    for p in [dest, *dest.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
        elif p.is_file():
            p.chmod(0o644)
