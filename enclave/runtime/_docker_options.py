"""How a :class:`~enclave.runtime.ContainerSpec` becomes the Docker engine's create arguments.

:func:`container_options` is pure (unit-tested without an engine): every isolation promise of
:class:`~enclave.runtime.Runtime` that the engine keeps is one of these options (no network,
read-only root, read-only data/model/code, a capped ``/output`` and ``/tmp``, no capabilities,
the memory, CPU and process limits, capped logs). :class:`~enclave.runtime.DockerRuntime`
creates every container with them.
"""

from __future__ import annotations

import secrets
from typing import Any

from enclave.runtime._base import JOB_LABEL, MANAGED_LABEL, ContainerSpec
from trainers.contract import JOB_USER


def container_options(
    spec: ContainerSpec, *, mounts: tuple[tuple[Any, str], ...]
) -> dict[str, Any]:
    """The keyword arguments of ``client.containers.create`` that keep the isolation promises.

    ``mounts`` are the checked sources from :func:`check_mount_sources`, the last one
    ``/output``.
    """
    from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

    *read_only, (output_src, output_target) = mounts
    receiving = set(spec.receive_mounts.values())
    opts: dict[str, Any] = {
        "image": spec.image,
        "name": f"sealroom-{spec.job_id}-{secrets.token_hex(4)}",
        "hostname": "sealroom-job",
        "user": JOB_USER,
        "environment": dict(spec.env),
        "labels": {**spec.labels, JOB_LABEL: spec.job_id, MANAGED_LABEL: "true"},
        # Network: a namespace of its own with only `lo`. The resolver is pointed at the
        # container's own loopback, where nothing answers, so no lookup targets any server.
        "network_mode": "none",
        "dns": ["127.0.0.1"],
        "read_only": True,
        "mounts": [
            *(
                Mount(
                    target,
                    str(src),
                    type="bind",
                    read_only=True,
                    # A warm container's /data and /model: the site's read-only mounts below
                    # them on the host reach it (slave: never the other way).
                    propagation="rslave" if target in receiving else None,
                )
                for src, target in read_only
            ),
            Mount(output_target, str(output_src), type="bind", read_only=False),
        ],
        # The container's own /tmp, in its memory cgroup; not the host's /tmp.
        "tmpfs": {
            "/tmp": f"rw,noexec,nosuid,nodev,size={spec.tmp_bytes},mode=1777",  # noqa: S108
            # The engine mounts a writable POSIX message-queue filesystem here by default; jobs
            # need none, and every writable place is one more to account for.
            "/dev/mqueue": "ro,noexec,nosuid,nodev,size=4k,mode=0555",
        },
        "ipc_mode": "private",
        "shm_size": spec.shm_bytes,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "pids_limit": spec.pids,
        "mem_limit": spec.memory_bytes,
        # Equal to the memory limit: no swap, so the limit is real and nothing is paged to disk.
        "memswap_limit": spec.memory_bytes,
        "nano_cpus": int(spec.cpus * 1e9),
        # A crashing job must not dump its memory (the data) through the host's core_pattern.
        "ulimits": [Ulimit(name="core", soft=0, hard=0)],
        # The host's OOM killer takes the job before the agent.
        "oom_score_adj": 1000,
        "cgroupns": "private",
        "runtime": spec.runtime,
        # Stdout and stderr can carry data: the engine keeps at most log_bytes of them, on the
        # site's disk, and nothing more however much the job prints.
        "log_config": LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": str(spec.log_bytes), "max-file": "1"},
        ),
        "stdin_open": False,
        "tty": False,
    }
    if spec.command is not None:
        opts["entrypoint"] = [spec.command[0]]
        opts["command"] = list(spec.command[1:])
    if spec.gpus > 0:
        opts["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
    return opts
