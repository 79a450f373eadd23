"""Attacks on warm containers (:mod:`enclave._warm`): a container started ahead of any job, then
given one job's data, model and limits while it runs.

Each property the module promises is tried as a class of attack by code running *inside* the
warm container (a stand-in for the harness that, unlike it, attacks): what it can see before it
is given a job, whether what it is given can be written, executed or remounted, whether the
limits it runs under are the job's, whether its isolation is a cold container's, whether what it
wrote while warm reaches a job, whether it can be given a second job, and whether anything of it
outlives the job or an agent's crash.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import pytest

from enclave import _mounts, _warm
from enclave._jobcontainer import DEFAULT_LIMITS, SiteLimits
from enclave.runtime import ContainerSpec, DockerRuntime, Handle, RunState
from enclave.vault import Vault, wipe_leftovers
from policies.errors import InvalidInput, InvalidState

pytestmark = pytest.mark.docker

MiB = 1024**2
SITE = "org.sealroom.site"

# Stands in for the warm harness: looks around before its job, then attacks what it is given
# and reports to /output/report.json (never before its job: that would stop it being given one,
# unless told to "plant").
ATTACK = textwrap.dedent(
    """
    import ctypes, errno, json, os, subprocess, sys, time
    def tried(f):
        try:
            f()
            return "allowed"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    def listing(top):
        out = []
        for d, subs, names in os.walk(top):
            out += [os.path.join(d, n) for n in subs + names]
        return sorted(out)
    places = ("/data", "/model", "/code", "/output", "/tmp", "/dev/shm")
    before = {p: listing(p) for p in places}
    env_before = sorted(k for k in os.environ if k.startswith(("SEALROOM", "JOB_")))
    if sys.argv[1:] == ["plant"]:
        open("/tmp/planted", "w").write("from the warm-up")
        open("/output/planted", "w").write("from the warm-up")
    print("sealroom-harness: warm", flush=True)
    while not os.path.exists("/code/.sealroom-job.json"):
        time.sleep(0.01)
    os.environ.update(json.load(open("/code/.sealroom-job.json"))["env"])
    libc = ctypes.CDLL(None, use_errno=True)
    def syscall_ok(rc):
        if rc != 0:
            raise OSError(ctypes.get_errno(), "refused")
    data = listing("/data/books")
    first = next(p for p in data if os.path.isfile(p))
    report = {
        "before": before,
        "env_before": env_before,
        "data": data,
        "read": open(first, "rb").read().decode(errors="replace"),
        "model": listing("/model/base"),
        "attempts": {
            "create a file in /data/books": tried(lambda: open("/data/books/new", "w")),
            "write a data file": tried(lambda: open(first, "r+b")),
            "make a directory in /data": tried(lambda: os.mkdir("/data/evil")),
            "chmod a data file": tried(lambda: os.chmod(first, 0o777)),
            "rename a data file": tried(lambda: os.rename(first, first + ".x")),
            "create a file in /model/base": tried(lambda: open("/model/base/new", "w")),
            "run a program from /model/base": tried(
                lambda: subprocess.run(["/model/base/run.sh"], check=True)
            ),
            "unmount /data/books": tried(lambda: syscall_ok(libc.umount2(b"/data/books", 2))),
            "remount /data/books read-write": tried(
                lambda: syscall_ok(libc.mount(None, b"/data/books", None, 32 | 4096, None))
            ),
            "mount over /data": tried(
                lambda: syscall_ok(libc.mount(b"none", b"/data", b"tmpfs", 0, None))
            ),
        },
        "mountinfo": [
            line for line in open("/proc/self/mountinfo").read().splitlines()
            if " /data/books " in line or " /model/base " in line
        ],
    }
    def first_line(*paths):
        for p in paths:
            if os.path.exists(p):
                return open(p).read().split()[0]
        return None
    v1, v2 = "/sys/fs/cgroup/", "/sys/fs/cgroup/"
    report["limits"] = {
        "memory": first_line(v1 + "memory/memory.limit_in_bytes", v2 + "memory.max"),
        "memory+swap": first_line(
            v1 + "memory/memory.memsw.limit_in_bytes", v2 + "memory.swap.max"
        ),
        "cpu quota": first_line(v1 + "cpu/cpu.cfs_quota_us", v2 + "cpu.max"),
        "pids": first_line(v1 + "pids/pids.max", v2 + "pids.max"),
    }
    json.dump(report, open("/output/report.json", "w"))
    attack = os.environ.get("JOB_ATTACK", "")
    if attack == "memory":
        hog = []
        while True:
            hog.append(b"x" * (16 << 20))
    if attack == "forks":
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError:
            json.dump({"children": children}, open("/output/forks.json", "w"))
    """
)


@dataclass
class Env:
    root: Path
    runtime: DockerRuntime
    image: str
    limits: SiteLimits
    labels: dict[str, str]
    staged: Path
    model: Path
    stack: ExitStack

    def pool(self, *, plant: bool = False, harness: bool = False) -> _warm.WarmPool:
        command = (
            _warm.HARNESS_WARM
            if harness
            else ("/usr/bin/python3", "-c", ATTACK, *(["plant"] if plant else []))
        )
        pool = _warm.WarmPool(
            self.root / "warm",
            runtime=self.runtime,
            image=self.image,
            limits=self.limits,
            labels=self.labels,
            command=command,
        )
        self.stack.callback(pool.close)
        return pool

    def job(self, slot: _warm.Slot, **changes: Any) -> ContainerSpec:
        spec = ContainerSpec(
            image=self.image,
            job_id=f"job-{secrets.token_hex(4)}",
            output_dir=slot.output,
            memory_bytes=512 * MiB,
            cpus=1.0,
            pids=64,
            tmp_bytes=self.limits.tmp_bytes,
            timeout_s=120,
            env={"SEALROOM_JOB": "{}", "JOB_ATTACK": ""},
            read_only_mounts={
                self.staged: "/data/books",
                self.model: "/model/base",
                slot.code: "/code",
            },
            runtime=self.limits.runtime,
            labels=self.labels,
        )
        return replace(spec, **changes)


@pytest.fixture
def env(tmp_path: Path, runtime_image: str, test_labels: dict[str, str]) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("warm containers' mounts need root (the site agent runs as root)")
    vault = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    version = vault.register(
        "books",
        [("a.txt", io.BytesIO(b"the staged text\n")), ("b/c.txt", io.BytesIO(b"more\n"))],
        max_bytes=MiB,
        max_files=10,
    )
    staging_root = tmp_path / "staging"
    staging_root.mkdir(mode=0o700)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (model / "run.sh").chmod(0o755)
    labels = {**test_labels, SITE: f"warm-{secrets.token_hex(4)}"}
    with ExitStack() as stack:
        staging = stack.enter_context(
            vault.stage(
                f"s{secrets.token_hex(4)}", [version], dest_root=staging_root, on_event=print
            )
        )
        limits = replace(DEFAULT_LIMITS, warm_containers=1, output_bytes=64 * MiB)
        rt = DockerRuntime()
        yield Env(tmp_path, rt, runtime_image, limits, labels, staging.path("books"), model, stack)
        stack.close()
        rt.remove_stale(labels={SITE: labels[SITE]})
        _warm.WarmPool.wipe_leftovers(tmp_path / "warm")
        wipe_leftovers(staging_root)


def warmed(pool: _warm.WarmPool) -> _warm.Slot:
    pool.fill()
    assert pool.ready(timeout_s=120), pool.last_error
    slot = pool.take()
    assert slot is not None and slot.handle is not None
    return slot


def given(
    env: Env, pool: _warm.WarmPool, **changes: Any
) -> tuple[_warm.Slot, Handle, dict[str, Any]]:
    """A warm container given a job; its report once it wrote one."""
    slot = warmed(pool)
    spec = env.job(slot, **changes)
    handle = pool.give(slot, spec, env.stack)
    deadline = time.monotonic() + 60
    report = slot.output / "report.json"
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # written whole
    return slot, handle, json.loads(report.read_text())


def inspect(env: Env, handle: Handle) -> dict[str, Any]:
    return dict(env.runtime._client.api.inspect_container(handle.id))


# -- before its job ------------------------------------------------------------------------------


def test_a_warm_container_holds_nothing_of_a_job_before_it_is_given_one(env: Env) -> None:
    pool = env.pool()
    slot = warmed(pool)
    attrs = inspect(env, slot.handle)  # type: ignore[arg-type]
    sources = {m["Source"] for m in attrs["Mounts"]}
    assert all(Path(s).is_relative_to(slot.root) for s in sources), sources
    assert not any(e.startswith(("SEALROOM_JOB=", "JOB_")) for e in attrs["Config"]["Env"])
    # On the host: nothing mounted below what it receives, nothing in its code or output.
    assert _mounts.mounts_under(slot.data) == [] and _mounts.mounts_under(slot.model) == []
    assert os.listdir(slot.data) == os.listdir(slot.model) == os.listdir(slot.code) == []
    assert os.listdir(slot.output) == []
    # From inside, once given a job, what it had seen before.
    spec = env.job(slot)
    pool.give(slot, spec, env.stack)
    report = _wait_report(slot)
    assert report["env_before"] == []
    for place in ("/data", "/model", "/code", "/output", "/tmp", "/dev/shm"):
        assert report["before"][place] == [], (place, report["before"][place])
    assert report["read"] == "the staged text\n"  # and then it has the job's data


def test_the_real_harness_writes_nothing_a_job_could_read_while_warm(env: Env) -> None:
    """The image's harness, warm: its writable places hold no file, and no job's variable."""
    pool = env.pool(harness=True)
    slot = warmed(pool)
    found = env.runtime._client.containers.get(slot.handle.id).exec_run(  # type: ignore[union-attr]
        ["sh", "-c", "find /output /tmp /dev/shm -type f; env | grep -c ^SEALROOM_JOB= || true"],
        user="10001:10001",
    )
    assert found.output.decode().split() == ["0"], found.output
    assert os.listdir(slot.output) == []


# -- what it is given ----------------------------------------------------------------------------


def test_given_data_and_model_are_read_only_and_nothing_there_runs(env: Env) -> None:
    _, _, report = given(env, env.pool())
    assert report["data"] and report["model"]
    assert {k: v for k, v in report["attempts"].items() if v == "allowed"} == {}
    assert report["attempts"]["run a program from /model/base"] == "EACCES"  # noexec
    for line in report["mountinfo"]:
        options = set(line.split(" ")[5].split(","))
        assert {"ro", "nosuid", "nodev", "noexec"} <= options, line
    assert len(report["mountinfo"]) == 2
    # The host's staging is as it was.
    assert sorted(p.name for p in env.staged.rglob("*")) == ["a.txt", "b", "c.txt"]


def test_the_limits_are_the_jobs_before_anything_of_it_arrives(env: Env) -> None:
    _, handle, report = given(env, env.pool(), memory_bytes=384 * MiB, cpus=0.5, pids=48)
    limits = report["limits"]
    assert limits["memory"] == str(384 * MiB)
    assert limits["memory+swap"] in (str(384 * MiB), "0")  # v1: the sum; v2: no swap at all
    assert limits["cpu quota"] == "50000"
    assert limits["pids"] == "48"
    host = inspect(env, handle)["HostConfig"]
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"], host["PidsLimit"]) == (
        384 * MiB,
        384 * MiB,
        500_000_000,
        48,
    )


@pytest.mark.parametrize("attack", ["memory", "forks"])
def test_a_job_in_a_warm_container_cannot_go_past_its_own_limits(env: Env, attack: str) -> None:
    """The warm container started under the site's largest limits (16 GiB, 512 processes):
    the job given it must meet its own."""
    pool = env.pool()
    slot = warmed(pool)
    spec = env.job(
        slot,
        memory_bytes=256 * MiB,
        pids=40,
        env={"SEALROOM_JOB": "{}", "JOB_ATTACK": attack},
    )
    handle = pool.give(slot, spec, env.stack)
    if attack == "memory":
        st = env.runtime.wait(handle, timeout_s=120)
        assert st.state is RunState.KILLED_OOM, st
    else:
        forks = slot.output / "forks.json"
        deadline = time.monotonic() + 60
        while not forks.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        assert json.loads(forks.read_text())["children"] < 40


def test_isolation_is_a_cold_containers(env: Env) -> None:
    """Every isolation option of the warm container, once given the job, is what a cold
    container of the same job gets."""
    slot, handle, _ = given(env, env.pool())
    warm_attrs = inspect(env, handle)
    cold_out = env.root / "cold-out"
    cold_out.mkdir()
    os.chown(cold_out, 10001, 10001)
    cold_code = env.root / "cold-code"
    cold_code.mkdir()
    spec = env.job(slot)
    cold_spec = replace(
        spec,
        job_id=f"cold-{secrets.token_hex(4)}",
        output_dir=cold_out,
        read_only_mounts={env.staged: "/data/books", env.model: "/model/base", cold_code: "/code"},
    )
    cold = env.runtime.prepare(cold_spec)
    env.stack.callback(env.runtime.cleanup, cold)
    cold_attrs = inspect(env, cold)
    keys = (
        "NetworkMode",
        "ReadonlyRootfs",
        "CapDrop",
        "CapAdd",
        "SecurityOpt",
        "Privileged",
        "IpcMode",
        "CgroupnsMode",
        "PidMode",
        "UsernsMode",
        "Tmpfs",
        "ShmSize",
        "Ulimits",
        "OomScoreAdj",
        "Runtime",
        "LogConfig",
        "Memory",
        "MemorySwap",
        "NanoCpus",
        "PidsLimit",
        "Devices",
        "DeviceRequests",
        "Dns",
    )
    assert {k: warm_attrs["HostConfig"].get(k) for k in keys} == {
        k: cold_attrs["HostConfig"].get(k) for k in keys
    }
    for k in ("User", "Hostname"):
        assert warm_attrs["Config"][k] == cold_attrs["Config"][k]


# -- state, one job, leftovers ---------------------------------------------------------------


def test_a_warm_container_that_wrote_before_its_job_is_never_given_it(env: Env) -> None:
    pool = env.pool(plant=True)
    slot = warmed(pool)
    assert slot.handle is not None
    with pytest.raises(_warm.NotUsable):
        pool.give(slot, env.job(slot), env.stack)
    assert not slot.root.exists()  # destroyed at once
    with pytest.raises(docker.errors.NotFound):
        env.runtime._client.api.inspect_container(slot.handle.id)


def test_a_warm_container_is_given_one_job_and_goes_with_it(env: Env) -> None:
    pool = env.pool()
    slot = warmed(pool)
    warm_handle = slot.handle
    assert warm_handle is not None
    spec = env.job(slot)
    with ExitStack() as run:
        handle = pool.give(slot, spec, run)
        assert pool.take() is None  # it left the pool for good
        for again in (warm_handle, handle):
            with pytest.raises(InvalidState):
                env.runtime.assign(again, env.job(slot))
        _wait_report(slot)
        assert _mounts.mounts_under(slot.root)  # the job's data and model, while it runs
    # The run is over: the container, the data and model mounts and the slot are gone.
    with pytest.raises(docker.errors.NotFound):
        env.runtime._client.api.inspect_container(handle.id)
    assert not slot.root.exists()
    assert _mounts.mounts_under(env.root / "warm") == []


def test_a_job_it_cannot_be_is_refused_before_anything_reaches_it(env: Env) -> None:
    pool = env.pool()
    slot = warmed(pool)
    assert slot.handle is not None
    bad = [
        env.job(slot, gpus=1),
        env.job(slot, command=("/bin/sh",)),
        env.job(slot, tmp_bytes=env.limits.tmp_bytes * 2),
        env.job(slot, runtime="runsc"),
        env.job(slot, read_only_mounts={env.staged: "/data/books", env.model: "/code"}),
    ]
    for spec in bad:
        with pytest.raises(InvalidInput):
            env.runtime.assign(slot.handle, spec)
    assert _mounts.mounts_under(slot.data) == [] and os.listdir(slot.code) == []
    assert env.runtime.status(slot.handle).state is RunState.RUNNING
    slot.destroy(env.runtime)


def test_an_agent_start_destroys_warm_containers_and_their_mounts(
    tmp_path: Path, runtime_image: str
) -> None:
    """A site keeping a warm container crashes (its agent never closes); the next agent's start
    leaves neither the container nor a mount of its slot."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from enclave.agent import SiteAgent, signer_dir
    from gateway.identity import CertificateAuthority

    root = tmp_path / "site"
    ca = CertificateAuthority.init(tmp_path / "ca")
    signer = ca.site_signer("local-site", out_dir=signer_dir(root))
    first = SiteAgent.open(root, signer=signer)
    try:
        first.keep_warm(1)
        assert first.warm_ready(timeout_s=120)
        (slot,) = first._warm._idle
        assert slot.handle is not None
        # The crash: a job's data was being given to it (a staging bind below its /data).
        staged = tmp_path / "staged"
        staged.mkdir()
        (staged / "x.txt").write_text("plaintext")
        (slot.data / "books").mkdir()
        _warm.bind_read_only(staged, slot.data / "books")
        second = SiteAgent.open(root, signer=signer)
        with pytest.raises(docker.errors.NotFound):
            DockerRuntime()._client.api.inspect_container(slot.handle.id)
        assert list((root / "warm").iterdir()) == []
        assert [m.path for m in _mounts.mount_table() if root in m.path.parents] == []
        second.close()
    finally:
        first._warm._closed = True
        DockerRuntime().remove_stale(labels={"org.sealroom.site-instance": first.instance})
        _warm.WarmPool.wipe_leftovers(root / "warm")


def _wait_report(slot: _warm.Slot) -> dict[str, Any]:
    report = slot.output / "report.json"
    deadline = time.monotonic() + 60
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return dict(json.loads(report.read_text()))


# -- through the gateway ------------------------------------------------------------------------

BUILT_IN = """\
name: {name}
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters: {{max_steps: 3, batch_size: 2, block_size: 32, seed: 0}}
resources: {{cpus: 1, memory_mb: 1536, timeout_s: 300}}
"""

CUSTOM = """\
name: {name}
datasets: [books]
base_model: tiny-lm
trainer: custom
entrypoint: "job:Module"
purpose: testing
resources: {{cpus: 1, memory_mb: 1536, timeout_s: 300}}
"""


def test_a_site_gives_warm_containers_to_built_in_jobs_only(
    tmp_path: Path, runtime_image: str
) -> None:
    """Through the gateway: a built-in job runs in the warm container (the audit says so) and is
    released; a job with a code bundle starts cold; each start leaves the next warm container
    ready and none of the last."""
    from tests.integration._deployment import bundle, deploy, policy
    from trainers.synthetic import write_corpus

    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = deploy(tmp_path)
    site = d.running.site
    try:
        site.keep_warm(1)
        with d.client("olivia") as owner, d.client("theo") as team, d.client("carol") as carol:
            books = tmp_path / "books"
            write_corpus(books, documents=4, seed=7)
            owner.register_dataset("books", books)
            owner.put_policy("books", policy("books", custom_code=True, memorization=False))
            code = bundle(tmp_path / "code.tgz", {"job.py": "raise SystemExit(3)\n"})
            started: dict[str, bool] = {}
            for name, spec, code_bundle in (
                ("built-in", BUILT_IN, None),
                ("custom", CUSTOM, code),
            ):
                assert site.warm_ready(timeout_s=180)
                warm_before = {s.handle.id for s in site._warm._idle if s.handle}
                job = team.submit(spec.format(name=name), bundle=code_bundle)
                owner.decide(job.id, approve=True, reason="test")
                for event in team.watch(job.id, timeout=600):
                    if event.state == "AWAITING_REVIEW":
                        owner.decide_release(job.id, approve=False, reason="test")
                (record,) = carol.audit_query(action="container.start", job_id=job.id)
                started[name] = bool(record.event.details["warm_container"])
                if name == "built-in":
                    assert team.job(job.id).state == "RELEASED"
                    # The warm container it was given is gone, and a new one is warming.
                    client = DockerRuntime()._client
                    for cid in warm_before:
                        with pytest.raises(docker.errors.NotFound):
                            client.api.inspect_container(cid)
            assert started == {"built-in": True, "custom": False}
    finally:
        site.close()
        d.stop()
    assert _mounts.mounts_under(tmp_path / "home" / "site" / "warm") == []
