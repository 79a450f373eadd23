"""The runtime image under Slurm (issue 18, step 2): exported to an OCI bundle whose
``config.json`` (enclave.runtime._oci) keeps the runtime contract's isolation, and started by
``srun --container`` through runc on either node of the test cluster. What the job sees is
checked from inside, as a hostile job would probe it: the user, the network, the root, the
mounts, the capabilities, ``no-new-privileges`` and the limits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from enclave.runtime import ContainerSpec, check_mount_sources
from enclave.runtime._oci import export_rootfs, oci_config

pytestmark = [pytest.mark.docker, pytest.mark.slurm]

PROBE = r"""
set -u
echo "id=$(id -u):$(id -g)"
echo "ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ,)"
touch /rootfile 2>/dev/null && echo root=writable || echo root=readonly
touch /data/books/new 2>/dev/null && echo data=writable || echo data=readonly
echo "content=$(cat /data/books/a.txt)"
echo written > /output/result && echo output=writable
touch /tmp/t && echo tmp=writable
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status | tr -d '\t' | sed 's/:/=/'
m=/sys/fs/cgroup/memory
echo "memory=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat $m/memory.limit_in_bytes)"
echo "pids=$(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)"
echo "core=$(ulimit -c)"
python3 -c "import torch, trainers.harness; print('harness=ok')"
"""


@pytest.fixture(scope="module")
def bundle_root(runtime_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import docker

    client = docker.from_env()
    try:
        return export_rootfs(client, runtime_image, tmp_path_factory.mktemp("bundles"))
    finally:
        client.close()


def _probe(bundle_root: Path, tmp: Path, image: str, node: str, partition: str) -> dict[str, str]:
    import docker

    data, output = tmp / "books", tmp / "output"
    data.mkdir()
    output.mkdir()
    output.chmod(0o777)
    (data / "a.txt").write_text("plain")
    spec = ContainerSpec(
        image=image,
        job_id=f"slurm-{node}",
        output_dir=output,
        memory_bytes=512 * 1024**2,
        cpus=1.0,
        pids=128,
        tmp_bytes=64 * 1024**2,
        timeout_s=120,
        read_only_mounts={data: "/data/books"},
    )
    client = docker.from_env()
    try:
        image_config: dict[str, Any] = client.images.get(image).attrs["Config"]
    finally:
        client.close()
    config = oci_config(spec, mounts=check_mount_sources(spec), image_config=image_config)
    bundle = tmp / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(config))
    # One export serves every bundle, as the lower layer of an overlay of this bundle's own
    # (the mount points runc makes land in its upper layer; runc then makes the root read-only).
    (tmp / "upper").mkdir()
    (tmp / "work").mkdir()
    layers = f"lowerdir={bundle_root / 'rootfs'},upperdir={tmp / 'upper'},workdir={tmp / 'work'}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", layers, str(bundle / "rootfs")], check=True
    )
    env = ",".join(e for e in config["process"]["env"] if "," not in e)
    try:
        done = subprocess.run(
            ["srun", "-p", partition, "-w", node, f"--export=NONE,{env}",
             f"--container={bundle}", "sh", "-c", PROBE],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(bundle / "rootfs")], check=False)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    seen["output_on_host"] = (output / "result").read_text().strip()
    return seen


@pytest.mark.parametrize("node", ["node-a", "node-b"])
def test_the_runtime_image_runs_isolated_under_srun_container(
    bundle_root: Path, runtime_image: str, slurm_cluster: str, tmp_path: Path, node: str
) -> None:
    seen = _probe(bundle_root, tmp_path, runtime_image, node, slurm_cluster)
    assert seen["id"] == "10001:10001", seen
    assert seen["ifaces"] == "lo,", seen["ifaces"]  # no network but loopback
    assert seen["root"] == "readonly"
    assert seen["data"] == "readonly" and seen["content"] == "plain"
    assert seen["tmp"] == "writable" and seen["output"] == "writable"
    assert seen["output_on_host"] == "written"
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapBnd"], 16) == 0
    assert seen["NoNewPrivs"] == "1"
    assert int(seen["memory"]) == 512 * 1024**2
    assert seen["pids"] == "128"
    assert seen["core"] == "0"
    assert seen["harness"] == "ok"
