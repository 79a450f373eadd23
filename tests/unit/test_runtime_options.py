"""The container's create options and the spec's checks, without an engine.

:func:`container_options` is pure: every isolation promise that is a create option is checked
here; what the engine then does with them is shown by ``tests/integration/test_hostile_jobs.py``.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import pytest

from enclave.runtime import (
    JOB_LABEL,
    MANAGED_LABEL,
    ContainerSpec,
    TailBuffer,
    cap_tail,
    check_mount_sources,
    container_options,
)
from policies.errors import InvalidInput

MiB = 1024**2
IMAGE = "sha256:" + "ab" * 32


def make_spec(tmp_path: Path, **overrides: Any) -> ContainerSpec:
    values: dict[str, Any] = {
        "image": IMAGE,
        "job_id": "job-1",
        "output_dir": tmp_path / "out",
        "memory_bytes": 512 * MiB,
        "cpus": 1.5,
        "pids": 128,
        "tmp_bytes": 32 * MiB,
        "timeout_s": 600.0,
        "env": {"SEALROOM_JOB": "{}"},
        "read_only_mounts": {
            tmp_path / "ds": "/data/ds",
            tmp_path / "model": "/model/base",
            tmp_path / "code": "/code",
        },
        "labels": {"org.sealroom.site": "site-a"},
    }
    values.update(overrides)
    return ContainerSpec(**values)


def options(spec: ContainerSpec) -> dict[str, Any]:
    mounts = (*((h, t) for h, t in spec.read_only_mounts.items()), (spec.output_dir, "/output"))
    return container_options(spec, mounts=mounts)


@pytest.fixture
def opts(tmp_path: Path) -> dict[str, Any]:
    return options(make_spec(tmp_path))


def test_no_network_and_a_resolver_pointing_nowhere(opts: dict[str, Any]) -> None:
    assert opts["network_mode"] == "none"
    assert opts["dns"] == ["127.0.0.1"]
    assert "ports" not in opts and "extra_hosts" not in opts and "network" not in opts


def test_read_only_root_unprivileged_user_no_capabilities(opts: dict[str, Any]) -> None:
    assert opts["read_only"] is True
    assert opts["user"] == "10001:10001"
    assert opts["cap_drop"] == ["ALL"] and "cap_add" not in opts
    assert opts["privileged"] is False
    # no-new-privileges, and nothing that would turn seccomp or AppArmor off.
    assert opts["security_opt"] == ["no-new-privileges:true"]


def test_no_host_namespace_device_or_extra_mount(opts: dict[str, Any]) -> None:
    for key in (
        "pid_mode",
        "userns_mode",
        "uts_mode",
        "devices",
        "device_cgroup_rules",
        "volumes",
        "volumes_from",
        "sysctls",
        "device_requests",
    ):
        assert key not in opts, key
    assert opts["ipc_mode"] == "private" and opts["cgroupns"] == "private"


def test_limits(opts: dict[str, Any]) -> None:
    assert opts["pids_limit"] == 128
    assert opts["mem_limit"] == opts["memswap_limit"] == 512 * MiB  # no swap on top
    assert opts["nano_cpus"] == 1_500_000_000
    assert opts["shm_size"] == 64 * MiB
    assert opts["oom_score_adj"] == 1000
    assert [(u["Name"], u["Soft"], u["Hard"]) for u in opts["ulimits"]] == [("core", 0, 0)]
    assert opts["log_config"]["Type"] == "json-file"
    assert opts["log_config"]["Config"] == {"max-size": str(16 * MiB), "max-file": "1"}


def test_tmp_is_a_capped_noexec_tmpfs_and_mqueue_read_only(opts: dict[str, Any]) -> None:
    tmp = opts["tmpfs"]["/tmp"].split(",")
    assert {"rw", "noexec", "nosuid", "nodev", f"size={32 * MiB}"} <= set(tmp)
    assert opts["tmpfs"]["/dev/mqueue"].startswith("ro,")
    assert set(opts["tmpfs"]) == {"/tmp", "/dev/mqueue"}


def test_only_the_declared_mounts_read_only_but_output(
    tmp_path: Path, opts: dict[str, Any]
) -> None:
    got = {(m["Target"], m["Source"], m["Type"], m["ReadOnly"]) for m in opts["mounts"]}
    assert got == {
        ("/data/ds", str(tmp_path / "ds"), "bind", True),
        ("/model/base", str(tmp_path / "model"), "bind", True),
        ("/code", str(tmp_path / "code"), "bind", True),
        ("/output", str(tmp_path / "out"), "bind", False),
    }


def test_labels_always_name_the_job_and_mark_it_managed(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, labels={"org.sealroom.site": "a", JOB_LABEL: "someone-else"})
    labels = options(spec)["labels"]
    assert labels == {"org.sealroom.site": "a", JOB_LABEL: "job-1", MANAGED_LABEL: "true"}


def test_image_by_id_environment_as_given(opts: dict[str, Any]) -> None:
    assert opts["image"] == IMAGE
    assert opts["environment"] == {"SEALROOM_JOB": "{}"}
    assert opts["name"].startswith("sealroom-job-1-")
    assert opts["stdin_open"] is False and opts["tty"] is False
    assert "entrypoint" not in opts and "command" not in opts  # the image's harness runs


def test_command_overrides_the_entrypoint(tmp_path: Path) -> None:
    opts = options(make_spec(tmp_path, command=("python3", "-c", "print(1)")))
    assert opts["entrypoint"] == ["python3"] and opts["command"] == ["-c", "print(1)"]


def test_gpus_only_by_device_request_and_only_when_asked(tmp_path: Path) -> None:
    assert "device_requests" not in options(make_spec(tmp_path, gpus=0))
    (req,) = options(make_spec(tmp_path, gpus=2))["device_requests"]
    assert req["Count"] == 2 and req["Capabilities"] == [["gpu"]]
    assert not req.get("DeviceIDs")


def test_runtime_name_is_configurable(tmp_path: Path) -> None:
    assert options(make_spec(tmp_path))["runtime"] == "runc"
    assert options(make_spec(tmp_path, runtime="runsc"))["runtime"] == "runsc"
    assert options(make_spec(tmp_path, runtime="kata-runtime"))["runtime"] == "kata-runtime"


def test_two_containers_of_one_spec_get_different_names(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    assert options(spec)["name"] != options(spec)["name"]


# -- spec validation: each error names its field --------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", "sealroom-runtime:latest"),
        ("image", "sha256:abc"),
        ("image", "SHA256:" + "ab" * 32),
        ("job_id", "../etc"),
        ("job_id", ""),
        ("job_id", "a b"),
        ("memory_bytes", 0),
        ("memory_bytes", -1),
        ("memory_bytes", True),
        ("memory_bytes", 1.5),
        ("pids", 0),
        ("tmp_bytes", 0),
        ("shm_bytes", -5),
        ("log_bytes", 0),
        ("gpus", -1),
        ("gpus", True),
        ("gpus", 1.0),
        ("cpus", 0),
        ("cpus", "2"),
        ("cpus", math.inf),
        ("cpus", math.nan),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("timeout_s", math.inf),
        ("timeout_s", math.nan),
        ("runtime", ""),
        ("runtime", "run c"),
        ("runtime", "../runc"),
        ("output_dir", Path("relative/out")),
        ("output_dir", Path("/srv/../etc")),
        ("env", {"LD PRELOAD": "x"}),
        ("env", {"A=B": "x"}),
        ("env", {"A": "x\0y"}),
        ("env", {"A": 1}),
        ("labels", {"Bad Label": "x"}),
        ("labels", {"org.x": 1}),
        ("command", ()),
        ("command", ("python3", "a\0b")),
    ],
)
def test_bad_fields_are_refused_by_name(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(InvalidInput, match=f"^{field}: "):
        make_spec(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "target",
    [
        "/etc",
        "/output",
        "/data",
        "/data/",
        "/data/.",
        "/data/a/b",
        "/data/../etc",
        "/model",
        "/model/base/x",
        "/code/",
        "code",
        "/var/run/docker.sock",
    ],
)
def test_mounts_only_at_contract_paths(tmp_path: Path, target: str) -> None:
    with pytest.raises(InvalidInput, match=r"^read_only_mounts: .* is not a contract path"):
        make_spec(tmp_path, read_only_mounts={tmp_path / "x": target})


def test_mount_sources_must_be_absolute_and_apart_from_output(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^read_only_mounts: host path"):
        make_spec(tmp_path, read_only_mounts={Path("rel"): "/code"})
    with pytest.raises(InvalidInput, match=r"^read_only_mounts: host path"):
        make_spec(tmp_path, read_only_mounts={tmp_path / ".." / "x": "/code"})
    for host in (tmp_path / "out", tmp_path, tmp_path / "out" / "sub"):
        with pytest.raises(InvalidInput, match="overlaps the writable output"):
            make_spec(tmp_path, read_only_mounts={host: "/code"})
    with pytest.raises(InvalidInput, match="mounted twice"):
        make_spec(tmp_path, read_only_mounts={tmp_path / "a": "/code", tmp_path / "b": "/code"})


def test_a_spec_is_frozen_all_the_way_down(tmp_path: Path) -> None:
    env = {"A": "1"}
    spec = make_spec(tmp_path, env=env, command=["python3"])
    env["LD_PRELOAD"] = "/tmp/evil.so"
    assert dict(spec.env) == {"A": "1"}
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.read_only_mounts[Path("/x")] = "/code"  # type: ignore[index]
    assert spec.command == ("python3",)
    with pytest.raises(AttributeError):
        spec.image = "sha256:" + "cd" * 32  # type: ignore[misc]


# -- mount sources, checked on the host ------------------------------------------------------


def test_mount_sources_are_checked_and_resolved(tmp_path: Path) -> None:
    for d in ("ds", "model", "real-code", "out"):
        (tmp_path / d).mkdir()
    (tmp_path / "code").symlink_to(tmp_path / "real-code")
    spec = make_spec(tmp_path)
    got = dict((t, h) for h, t in check_mount_sources(spec))
    assert got["/code"] == tmp_path / "real-code"  # the engine binds what was checked
    assert got["/output"] == tmp_path / "out"


def test_a_socket_or_file_is_never_a_mount_source(tmp_path: Path) -> None:
    for d in ("ds", "model", "out"):
        (tmp_path / d).mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "code"))  # as /var/run/docker.sock would be
    try:
        with pytest.raises(InvalidInput, match=r"mount source for /code: .* is not a directory"):
            check_mount_sources(make_spec(tmp_path))
    finally:
        sock.close()
    spec = make_spec(tmp_path, read_only_mounts={tmp_path / "missing": "/code"})
    with pytest.raises(InvalidInput, match=r"mount source for /code: .* does not exist"):
        check_mount_sources(spec)


def test_a_link_into_the_output_is_refused_once_resolved(tmp_path: Path) -> None:
    for d in ("ds", "model", "out"):
        (tmp_path / d).mkdir()
    (tmp_path / "code").symlink_to(tmp_path / "out")
    with pytest.raises(InvalidInput, match="/code overlaps the writable output"):
        check_mount_sources(make_spec(tmp_path))


# -- log tails -------------------------------------------------------------------------------


def test_tail_buffer_keeps_the_tail_under_the_cap() -> None:
    buf = TailBuffer(64)
    for i in range(1000):
        buf.feed(f"line {i}\n".encode())
        assert len(buf._buf) <= 128  # bounded memory however much is fed
    out = buf.value()
    assert len(out) == 64 and out.endswith(b"line 999\n")
    assert out.startswith(b"[sealroom: 8890 bytes of output, earlier ones cut]\n")
    tiny = TailBuffer(16)
    tiny.feed(b"x" * 100 + b"END")
    assert tiny.value() == b"x" * 13 + b"END"  # no room for the marker: the tail alone
    big = TailBuffer(200)
    big.feed(b"x" * 1000 + b"END")
    value = big.value()
    assert len(value) == 200 and value.endswith(b"END")
    assert value.startswith(b"[sealroom: 1003 bytes of output, earlier ones cut]\n")


def test_cap_tail() -> None:
    assert cap_tail(b"short", 100) == b"short"
    assert cap_tail(b"", 1) == b""
    assert len(cap_tail(b"x" * 500, 100)) == 100
    with pytest.raises(InvalidInput, match="max_bytes"):
        cap_tail(b"x", 0)
    with pytest.raises(InvalidInput, match="max_bytes"):
        TailBuffer(True)  # type: ignore[arg-type]
