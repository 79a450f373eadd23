"""The runtime image as an OCI bundle, for runtimes that start containers with ``runc`` directly
(Slurm's ``srun --container``, issue 18): the image's root filesystem, exported once per image
ID, and a ``config.json`` that keeps the isolation promises of
:class:`~enclave.runtime.Runtime` as the Docker options do (:mod:`enclave.runtime.
_docker_options`): a network namespace with only ``lo``, a read-only root, uid 10001 with no
capability and ``no-new-privileges``, the declared mounts only (data, model and code read-only,
``/output`` writable), a capped memory-backed ``/tmp`` and ``/dev/shm``, the memory (no swap),
PID and CPU limits, no core dumps.

Not yet kept here: the engine's default seccomp profile (runc applies none unless the config
names one), and the wall-clock limit (Slurm's own time limit, set by the runtime that submits).

:func:`oci_config` is pure (unit-tested); :func:`export_rootfs` needs the Docker engine that
built the image.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enclave.runtime._base import ContainerSpec
from trainers.contract import JOB_USER

_NO_CAPS: dict[str, list[str]] = {
    k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
}
_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]  # fmt: skip
_READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def oci_config(
    spec: ContainerSpec,
    *,
    mounts: tuple[tuple[Path, str], ...],
    image_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The bundle's ``config.json`` for ``spec``. ``mounts`` are the checked sources
    (:func:`~enclave.runtime.check_mount_sources`), the last one ``/output``; ``image_config``
    is the image's ``Config`` (its ``Env``, ``Entrypoint``, ``Cmd``, ``WorkingDir``). The root
    is the bundle's ``rootfs`` (Slurm insists on it there): one export serves every job's
    bundle when bound read-only at each bundle's ``rootfs``."""
    *read_only, (output_src, output_target) = mounts
    uid, gid = (int(x) for x in JOB_USER.split(":"))
    env = [*image_config.get("Env", []), *(f"{k}={v}" for k, v in sorted(spec.env.items()))]
    args = (
        list(spec.command)
        if spec.command is not None
        else [
            *(image_config.get("Entrypoint") or []),
            *(image_config.get("Cmd") or []),
        ]
    )
    nosuid = ["nosuid", "noexec", "nodev"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": []},
            "args": args,
            "env": env,
            "cwd": image_config.get("WorkingDir") or "/",
            "capabilities": _NO_CAPS,
            # A crashing job must not dump its memory (the data) through the host's core_pattern.
            "rlimits": [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": True,
            "oomScoreAdj": 1000,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sealroom-job",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",  # noqa: S108 - the container's, memory-backed
                "type": "tmpfs",
                "source": "shm",
                "options": [*nosuid, "mode=1777", f"size={spec.shm_bytes}"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "tmpfs",
                "source": "mqueue",
                "options": ["ro", *nosuid, "size=4k", "mode=0555"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", *nosuid]},
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["ro", *nosuid, "relatime"],
            },
            {
                "destination": "/tmp",  # noqa: S108 - the container's, memory-backed
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [*nosuid, "mode=1777", f"size={spec.tmp_bytes}"],
            },
            *(
                {
                    "destination": target,
                    "type": "bind",
                    "source": str(src),
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                }
                for src, target in read_only
            ),
            {
                "destination": output_target,
                "type": "bind",
                "source": str(output_src),
                "options": ["rbind", "rw", "nosuid", "nodev"],
            },
        ],
        "linux": {
            # Its own network namespace has only `lo`: nothing of the node's network.
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                # Swap equal to the limit: none beyond it, so nothing is paged to disk.
                "memory": {"limit": spec.memory_bytes, "swap": spec.memory_bytes},
                "pids": {"limit": spec.pids},
                "cpu": {"quota": int(spec.cpus * 100_000), "period": 100_000},
            },
            "maskedPaths": _MASKED,
            "readonlyPaths": _READ_ONLY,
        },
    }


def export_rootfs(client: Any, image_id: str, dest: Path) -> Path:
    """The image's root filesystem under ``dest/<image id>/rootfs`` (exported once: an image
    ID names its content), through a container created and removed here. Returns the bundle
    directory (``dest/<image id>``)."""
    bundle = dest / image_id.replace(":", "-")
    if (bundle / "rootfs" / ".sealroom-exported").exists():
        return bundle
    partial = dest / f".{bundle.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "rootfs").mkdir(parents=True)
    container = client.containers.create(image_id, network_mode="none")
    try:
        stream = io.BufferedReader(_Chunks(container.export()), 1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(partial / "rootfs", filter=_keep_directory_modes)  # noqa: S202 - filtered
    finally:
        container.remove(force=True)
    (partial / "rootfs" / ".sealroom-exported").touch()
    shutil.rmtree(bundle, ignore_errors=True)
    partial.rename(bundle)
    return bundle


def _keep_directory_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The ``tar`` filter (nothing outside ``dest``, no absolute links, no setuid or
    group/other write bits on files), but a directory keeps its mode: ``/tmp`` is 1777, and
    runc gives a tmpfs mounted there the mode of the directory below it."""
    safe = tarfile.tar_filter(member, dest)
    return safe.replace(mode=member.mode, deep=False) if member.isdir() else safe


class _Chunks(io.RawIOBase):
    """A file-like reader over the engine's chunked export stream."""

    def __init__(self, chunks: Any) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
