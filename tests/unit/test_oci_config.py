"""The OCI bundle config (enclave.runtime._oci) keeps the runtime contract's isolation: each
promise the Docker options keep is a field here, checked field by field (the Slurm tests show
what a job sees under it)."""

from __future__ import annotations

from pathlib import Path

from enclave.runtime import ContainerSpec
from enclave.runtime._oci import oci_config

IMAGE = "sha256:" + "a" * 64
IMAGE_CONFIG = {
    "Env": ["PATH=/usr/bin", "PYTHONPATH=/opt/app"],
    "Entrypoint": ["/usr/bin/python3", "-m", "trainers.harness"],
    "WorkingDir": "/tmp",
}


def _spec(tmp_path: Path, **kw: object) -> ContainerSpec:
    return ContainerSpec(
        image=IMAGE,
        job_id="job-1",
        output_dir=tmp_path / "out",
        memory_bytes=1 << 30,
        cpus=1.5,
        pids=64,
        tmp_bytes=1 << 26,
        timeout_s=60,
        env={"SEALROOM_JOB": "{}"},
        **kw,  # type: ignore[arg-type]
    )


def test_the_config_keeps_every_isolation_promise(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    mounts = ((tmp_path / "books", "/data/books"), (tmp_path / "out", "/output"))
    c = oci_config(spec, mounts=mounts, image_config=IMAGE_CONFIG)
    p = c["process"]
    assert p["user"]["uid"] == 10001 and p["user"]["gid"] == 10001
    assert all(v == [] for v in p["capabilities"].values())
    assert p["noNewPrivileges"] is True and p["terminal"] is False
    assert {"type": "RLIMIT_CORE", "hard": 0, "soft": 0} in p["rlimits"]
    assert p["args"] == ["/usr/bin/python3", "-m", "trainers.harness"]
    assert p["env"] == ["PATH=/usr/bin", "PYTHONPATH=/opt/app", "SEALROOM_JOB={}"]
    assert c["root"] == {"path": "rootfs", "readonly": True}
    assert {"type": "network"} in c["linux"]["namespaces"]  # its own: only lo
    res = c["linux"]["resources"]
    assert res["memory"] == {"limit": 1 << 30, "swap": 1 << 30}  # no swap beyond the limit
    assert res["pids"] == {"limit": 64}
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["devices"] == [{"allow": False, "access": "rwm"}]
    by_dest = {m["destination"]: m for m in c["mounts"]}
    assert "ro" in by_dest["/data/books"]["options"]
    assert "rw" in by_dest["/output"]["options"]
    assert by_dest["/output"]["source"] == str(tmp_path / "out")
    assert f"size={1 << 26}" in by_dest["/tmp"]["options"]
    assert "noexec" in by_dest["/tmp"]["options"]
    assert "ro" in by_dest["/sys"]["options"] and "ro" in by_dest["/sys/fs/cgroup"]["options"]
    # Nothing else of the host is bound in.
    binds = {m["destination"] for m in c["mounts"] if m["type"] == "bind"}
    assert binds == {"/data/books", "/output"}


def test_a_command_replaces_the_entrypoint(tmp_path: Path) -> None:
    spec = _spec(tmp_path, command=("sh", "-c", "true"))
    mounts = ((tmp_path / "out", "/output"),)
    assert oci_config(spec, mounts=mounts, image_config=IMAGE_CONFIG)["process"]["args"] == [
        "sh",
        "-c",
        "true",
    ]
