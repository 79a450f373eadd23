"""After every kind of job end, no decrypted byte remains on the host.

A dataset holding a random marker is registered in a real vault, staged for a job the way the site
agent does it (staging tmpfs, capped output tmpfs, then the container through
:class:`DockerRuntime`), and the job copies every byte it can read to each place it can write
(``/output``, ``/tmp``, ``/dev/shm``) and prints it to stdout and stderr. It then ends one way:
success, failure, a crash, its timeout, a cancel, an OOM kill, or the agent itself is killed while
it runs (and the next agent's start-up cleans up). Each test then scans the site's directories,
the engine's files for the container and ``/proc/self/mountinfo`` for the marker and for leftover
mounts. Self-checks while the job still exists show the scans find the marker where it is.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave import _mounts
from enclave.runtime import JOB_LABEL, ContainerSpec, DockerRuntime, Handle, RunState
from enclave.vault import StagingEvent, StagingEventKind, Vault, wipe_leftovers

pytestmark = pytest.mark.docker

MiB = 1024**2
SITE_LABEL = "org.sealroom.site"
TOP = Path(__file__).resolve().parents[2]

# Reads every staged byte, copies it everywhere writable, prints it, then ends as ENDING says.
JOB = """
import os, sys, time
ending = os.environ["ENDING"]
data = b"".join(
    open(os.path.join(top, n), "rb").read()
    for top, _, names in os.walk("/data/corpus") for n in sorted(names)
)
for d in ("/output", "/tmp", "/dev/shm"):
    with open(d + "/copy", "wb") as f:
        f.write(data)
sys.stdout.buffer.write(data); sys.stdout.flush()
sys.stderr.buffer.write(data); sys.stderr.flush()
print("\\nREADY", flush=True)
if ending == "success":
    sys.exit(0)
if ending == "failure":
    raise RuntimeError("the job failed")
if ending == "crash":
    import ctypes
    os.chdir("/output")  # where a core would land
    ctypes.string_at(0)
if ending == "oom":
    hog = [data]
    while True:
        hog.append(b"\\x01" * (8 << 20))
while True:  # timeout, cancel, agent-crash: run until someone ends it
    time.sleep(1)
"""


@dataclass
class Site:
    """A site's directories (as the agent lays them out), its vault and the staged marker."""

    root: Path
    vault: Vault
    staging: Path
    runs: Path
    marker: bytes
    labels: dict[str, str]


@pytest.fixture
def site(tmp_path: Path, test_labels: dict[str, str]) -> Iterator[Site]:
    if os.geteuid() != 0:
        msg = "staging and output mounts need root (the site agent runs as root)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(msg)
        pytest.skip(msg)
    marker = f"SEALROOM-PLAINTEXT-{secrets.token_hex(12)}".encode()
    vault = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    files = {
        "train.txt": marker + b" first record\n" * 64,
        "nested/valid.txt": b"prefix " + marker + b" second record\n",
        "blob.bin": os.urandom(3000) + marker + os.urandom(3000),
    }
    vault.register(
        "corpus", [(p, io.BytesIO(b)) for p, b in files.items()], max_bytes=MiB, max_files=10
    )
    staging, runs = tmp_path / "staging", tmp_path / "runs"
    staging.mkdir(mode=0o700)
    runs.mkdir(mode=0o700)
    labels = {**test_labels, SITE_LABEL: f"np-{secrets.token_hex(4)}"}
    yield Site(tmp_path, vault, staging, runs, marker, labels)
    # Whatever a failing test left: the same clean-up as an agent's start-up.
    DockerRuntime().remove_stale(labels={SITE_LABEL: labels[SITE_LABEL]})
    wipe_leftovers(staging)
    _mounts.wipe_leftovers(runs)


# -- scanning ----------------------------------------------------------------------------------


def files_holding(root: Path, marker: bytes, *, this_fs_only: bool = False) -> list[str]:
    """Regular files under ``root`` whose bytes contain ``marker`` (links never followed);
    with ``this_fs_only``, nothing mounted below ``root`` is looked at."""
    if not root.exists():
        return []
    root_dev = os.lstat(root).st_dev
    hits = []
    for top, dirs, names in os.walk(root, followlinks=False):
        if this_fs_only:
            dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == root_dev]
        for name in names:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or (this_fs_only and st.st_dev != root_dev):
                continue
            tail = b""
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if marker in tail + chunk:
                        hits.append(path)
                        break
                    tail = chunk[-len(marker) :]
    return hits


def mounts_naming(*needles: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if any(n in line for n in needles)]


@dataclass
class Engine:
    """Where the engine keeps a container's files on the host."""

    container_id: str
    log_path: Path
    dirs: list[Path]

    @classmethod
    def of(cls, client: Any, container_id: str) -> Engine:
        attrs = client.api.inspect_container(container_id)
        data = attrs.get("GraphDriver", {}).get("Data") or {}
        dirs = [Path(attrs["LogPath"]).parent]
        dirs += [Path(p) for k, p in data.items() if k in ("UpperDir", "WorkDir", "MergedDir")]
        return cls(container_id, Path(attrs["LogPath"]), dirs)


def check_nothing_left(site: Site, client: Any, engine: Engine, job_id: str) -> None:
    """The whole promise, checked from the host once the job has ended and been cleaned up."""
    assert files_holding(site.root, site.marker) == []  # vault, staging, runs: every byte
    assert list(site.staging.iterdir()) == []
    assert not (site.runs / job_id / "output").exists()
    assert mounts_naming(str(site.root), engine.container_id) == []
    assert [d for d in engine.dirs if d.exists()] == []  # log, layers: removed with the container
    docker_root = Path(client.info()["DockerRootDir"])
    assert files_holding(docker_root / "containers", site.marker) == []
    assert client.containers.list(all=True, filters={"label": f"{JOB_LABEL}={job_id}"}) == []


def check_found_while_running(site: Site, engine: Engine, staged: Path, output: Path) -> None:
    """Self-check: the scans see the marker where it is while the job exists, and the site's
    disk holds none of it even then (only memory-backed mounts and the engine's log do)."""
    assert files_holding(staged, site.marker)  # the staging tmpfs
    assert files_holding(output, site.marker) == [str(output / "copy")]  # the job's copy
    assert site.marker in engine.log_path.read_bytes()  # stdout and stderr, on the engine's disk
    assert files_holding(site.root, site.marker, this_fs_only=True) == []


# -- running a job as the agent does -----------------------------------------------------------


def write_code(run_dir: Path) -> Path:
    code = run_dir / "code"
    code.mkdir(mode=0o755)
    (code / "job.py").write_text(JOB)
    (code / "job.py").chmod(0o644)
    return code


def container_spec(
    site: Site, *, job_id: str, image: str, data: Path, code: Path, output: Path, ending: str
) -> ContainerSpec:
    return ContainerSpec(
        image=image,
        job_id=job_id,
        output_dir=output,
        memory_bytes=96 * MiB,
        cpus=1.0,
        pids=32,
        tmp_bytes=8 * MiB,
        timeout_s=2.0 if ending == "timeout" else 60.0,
        env={"ENDING": ending},
        read_only_mounts={data: "/data/corpus", code: "/code"},
        labels=site.labels,
        command=("python3", "/code/job.py"),
        log_bytes=MiB,
    )


def wait_ready(client: Any, container_id: str) -> None:
    end = time.monotonic() + 60
    while b"READY" not in client.api.logs(container_id):
        assert time.monotonic() < end, "the job never got ready"
        time.sleep(0.1)


EXPECTED = {
    "success": (RunState.EXITED, 0, ""),
    "failure": (RunState.EXITED, 1, "exited with code 1"),
    "crash": (RunState.EXITED, 139, "exited with code 139"),
    "timeout": (RunState.KILLED_TIMEOUT, 137, "ran past its timeout of 2 s and was killed"),
    "cancel": (RunState.STOPPED, 137, "stopped on request"),
    "oom": (RunState.KILLED_OOM, 137, f"hit its memory limit of {96 * MiB} bytes and was killed"),
}


@pytest.mark.parametrize("ending", list(EXPECTED))
def test_no_plaintext_left_after_the_job_ends(
    site: Site, docker_client: Any, runtime_image: str, ending: str
) -> None:
    runtime = DockerRuntime(docker_client)
    job_id = f"np-{ending}-{secrets.token_hex(4)}"
    events: list[StagingEvent] = []
    version = site.vault.get("corpus", 1)
    with ExitStack() as stack:  # the agent's order: staging, output, container (undone LIFO)
        staging = stack.enter_context(
            site.vault.stage(job_id, [version], dest_root=site.staging, on_event=events.append)
        )
        run_dir = site.runs / job_id
        run_dir.mkdir(mode=0o700)
        code = write_code(run_dir)
        output = stack.enter_context(
            _mounts.tmpfs(run_dir / "output", size_bytes=32 * MiB, owner=(10001, 10001))
        )
        spec = container_spec(
            site,
            job_id=job_id,
            image=runtime_image,
            data=staging.path("corpus"),
            code=code,
            output=output,
            ending=ending,
        )
        handle: Handle = runtime.prepare(spec)
        stack.callback(runtime.cleanup, handle)
        runtime.start(handle)
        if ending == "cancel":
            wait_ready(docker_client, handle.id)
            runtime.stop(handle)
            status = runtime.status(handle)
        else:
            status = runtime.wait(handle, timeout_s=90)
        assert (status.state, status.exit_code, status.reason) == EXPECTED[ending]
        engine = Engine.of(docker_client, handle.id)
        check_found_while_running(site, engine, staging.root, output)
    assert [e.kind for e in events] == [
        StagingEventKind.KEY_RELEASED,
        StagingEventKind.STAGED,
        StagingEventKind.DESTROYED,
    ]
    check_nothing_left(site, docker_client, engine, job_id)


CRASHING_AGENT = """
import json, os, sys, time
from pathlib import Path
from enclave import _mounts
from enclave.runtime import ContainerSpec, DockerRuntime
from enclave.vault import Vault

a = json.loads(sys.argv[1])
vault = Vault(Path(a["vault"]), site_key_path=Path(a["key"]))
staging = vault.stage(a["job"], [vault.get("corpus", 1)], dest_root=Path(a["staging"]),
                      on_event=lambda e: None)
output = Path(a["run_dir"]) / "output"
os.mkdir(output, 0o700)
_mounts.mount_tmpfs(output, size_bytes=32 << 20, owner=(10001, 10001))
runtime = DockerRuntime()
handle = runtime.prepare(ContainerSpec(
    image=a["image"], job_id=a["job"], output_dir=output, memory_bytes=96 << 20, cpus=1.0,
    pids=32, tmp_bytes=8 << 20, timeout_s=600, env={"ENDING": "agent-crash"},
    read_only_mounts={staging.path("corpus"): "/data/corpus", Path(a["run_dir"]) / "code": "/code"},
    labels=a["labels"], command=("python3", "/code/job.py"), log_bytes=1 << 20))
runtime.start(handle)
print(handle.id, flush=True)
time.sleep(3600)
"""


def test_no_plaintext_left_after_the_agent_is_killed_mid_job(
    site: Site, docker_client: Any, runtime_image: str
) -> None:
    job_id = f"np-agent-crash-{secrets.token_hex(4)}"
    run_dir = site.runs / job_id
    run_dir.mkdir(mode=0o700)
    write_code(run_dir)
    args = {
        "vault": str(site.vault.root),
        "key": str(site.root / "site.key"),
        "job": job_id,
        "staging": str(site.staging),
        "run_dir": str(run_dir),
        "image": runtime_image,
        "labels": site.labels,
    }
    agent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASHING_AGENT), json.dumps(args)],
        cwd=TOP,
        env={**os.environ, "PYTHONPATH": f"{TOP}{os.pathsep}{TOP / 'proto'}"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        container_id = agent.stdout.readline().strip()
        assert container_id, "the agent never started the job"
        wait_ready(docker_client, container_id)
        engine = Engine.of(docker_client, container_id)
    finally:
        agent.send_signal(signal.SIGKILL)  # no finally, no atexit, no clean-up of any kind
        agent.wait(30)
        if agent.stdout is not None:
            agent.stdout.close()
    # What the crash left: the job still running, the data staged, the output mounted.
    assert docker_client.containers.get(container_id).status == "running"
    (staged,) = site.staging.iterdir()
    check_found_while_running(site, engine, staged, run_dir / "output")

    # The next agent's start-up, in the order the contract asks: containers first (a running
    # one keeps its mounts' memory alive whatever the host unmounts), then the mounts.
    assert DockerRuntime(docker_client).remove_stale(labels={SITE_LABEL: site.labels[SITE_LABEL]})
    assert wipe_leftovers(site.staging) == (staged,)
    assert _mounts.wipe_leftovers(site.runs) == [run_dir / "output"]
    check_nothing_left(site, docker_client, engine, job_id)
