"""Hostile jobs against the Docker runtime: each case is a script that tries to break out.

Every case runs the real runtime image through :class:`DockerRuntime` with the script mounted as
``/code/attack.py``, and checks what actually happened on the host: a listener that received
nothing, a file that did not change, the state and reason the runtime reported. Where a case
could pass for the wrong reason (a listener that was never reachable), a control run gives the
same script the host's network and shows it does get through.

The script reports on its last stdout line (``REPORT {json}``): stdout still works when
``/output`` is full. Network rule of this workplace: only loopback addresses are ever targeted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave import _beneath, _mounts, _progress
from enclave.gate import run_gate
from enclave.runtime import (
    JOB_LABEL,
    MANAGED_LABEL,
    ContainerSpec,
    ContainerStatus,
    DockerRuntime,
    Handle,
    RunState,
)
from policies.release import CheckName, ReleaseRules
from trainers.contract import JOB_USER

pytestmark = pytest.mark.docker

MiB = 1024**2
SECRET = b"PATIENT-RECORD-7f3a: the data that must never leave\n"

PRELUDE = """
import errno, json, os, socket, sys, time
def report(**kw):
    sys.stdout.flush()
    print("REPORT " + json.dumps(kw), flush=True)
def attempt(fn, *a, **k):
    try:
        fn(*a, **k)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"""


@dataclass
class Ran:
    status: ContainerStatus
    logs: bytes
    output: Path
    handle: Handle

    @property
    def container_id(self) -> str:
        return self.handle.id

    @property
    def report(self) -> dict[str, Any]:
        return parse_report(self.logs)


def parse_report(logs: bytes) -> dict[str, Any]:
    lines = [ln for ln in logs.splitlines() if ln.startswith(b"REPORT ")]
    assert lines, f"the attack printed no report; logs end: {logs[-2000:]!r}"
    return dict(json.loads(lines[-1][len(b"REPORT ") :]))


@pytest.fixture(scope="module")
def runtime(docker_client: Any) -> DockerRuntime:
    return DockerRuntime(docker_client)


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    return make_site(tmp_path)


def make_site(root: Path) -> dict[str, Path]:
    """Host directories for one job: a dataset, a base model and the code, all left writable by
    anyone on the host side so that only the read-only mount can stop a write."""
    root.mkdir(exist_ok=True)
    data = root / "data-ds"
    model = root / "model"
    code = root / "code"
    for d in (data, model, code):
        d.mkdir()
        d.chmod(0o777)
    (data / "secret.txt").write_bytes(SECRET)
    (data / "secret.txt").chmod(0o666)
    (model / "config.json").write_text('{"model_type": "tiny"}')
    (model / "config.json").chmod(0o666)
    (code / "helper.py").write_text("VALUE = 1\n")
    (code / "helper.py").chmod(0o666)
    return {"data": data, "model": model, "code": code, "root": root}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def attack(
    runtime: DockerRuntime,
    image: str,
    site: dict[str, Path],
    labels: dict[str, str],
    script: str,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 60,
    memory_bytes: int = 256 * MiB,
    pids: int = 64,
    output_bytes: int = 16 * MiB,
    tmp_bytes: int = 16 * MiB,
    log_bytes: int = 4 * MiB,
    max_log_bytes: int = 1 * MiB,
) -> Iterator[Ran]:
    """Run ``script`` as a job with every limit and mount of a real run; yield what happened
    while its output mount still exists."""
    (site["code"] / "attack.py").write_text(PRELUDE + textwrap.dedent(script))
    (site["code"] / "attack.py").chmod(0o644)
    job_id = f"hostile-{secrets.token_hex(4)}"
    with _mounts.tmpfs(
        site["root"] / "output", size_bytes=output_bytes, owner=(10001, 10001)
    ) as out:
        spec = ContainerSpec(
            image=image,
            job_id=job_id,
            output_dir=out,
            memory_bytes=memory_bytes,
            cpus=1.0,
            pids=pids,
            tmp_bytes=tmp_bytes,
            timeout_s=timeout_s,
            env=env or {},
            read_only_mounts={
                site["data"]: "/data/ds",
                site["model"]: "/model/base",
                site["code"]: "/code",
            },
            labels=labels,
            command=("python3", "/code/attack.py"),
            log_bytes=log_bytes,
        )
        handle = runtime.prepare(spec)
        try:
            runtime.start(handle)
            status = runtime.wait(handle, timeout_s=timeout_s + 30)
            logs = runtime.logs(handle, max_bytes=max_log_bytes)
            yield Ran(status, logs, out, handle)
        finally:
            runtime.cleanup(handle)


def control_run(
    docker_client: Any,
    image: str,
    site: dict[str, Path],
    labels: dict[str, str],
    script: str,
    *,
    env: dict[str, str],
) -> dict[str, Any]:
    """The same script with the host's network namespace (docker SDK directly): proves the
    listener is reachable, so the isolated run's silence means something."""
    from docker.types import Mount

    (site["code"] / "attack.py").write_text(PRELUDE + textwrap.dedent(script))
    (site["code"] / "attack.py").chmod(0o644)
    c = docker_client.containers.create(
        image,
        entrypoint=["python3", "/code/attack.py"],
        network_mode="host",
        user=JOB_USER,
        environment=env,
        mounts=[Mount("/code", str(site["code"]), type="bind", read_only=True)],
        labels=labels,
    )
    try:
        c.start()
        c.wait(timeout=60)
        logs = c.logs()
    finally:
        c.remove(force=True)
    lines = [ln for ln in logs.splitlines() if ln.startswith(b"REPORT ")]
    assert lines, logs
    return dict(json.loads(lines[-1][len(b"REPORT ") :]))


class Listener:
    """A host-side listener on 127.0.0.1 (TCP, UDP or an abstract unix socket) that records
    every connection or datagram it gets."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.received: list[bytes] = []
        if kind in ("tcp", "tcp6"):
            family, self.host = (
                (socket.AF_INET, "127.0.0.1") if kind == "tcp" else (socket.AF_INET6, "::1")
            )
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.bind((self.host, 0))
            self.sock.listen(8)
        elif kind == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.name = f"\0sealroom-test-{secrets.token_hex(6)}"
            self.sock.bind(self.name)
            self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.kind == "udp":
                    data, _ = self.sock.recvfrom(65536)
                    self.received.append(data)
                else:
                    conn, _ = self.sock.accept()
                    conn.settimeout(1)
                    try:
                        self.received.append(conn.recv(65536) or b"<connected>")
                    except OSError:
                        self.received.append(b"<connected>")
                    conn.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> list[bytes]:
        time.sleep(0.5)  # anything in flight lands
        self._stop.set()
        self._t.join()
        self.sock.close()
        return self.received


# -- network -------------------------------------------------------------------------------

TCP_SCRIPT = """
    host = os.environ["HOST"]
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET); s.settimeout(3)
    r = attempt(s.connect, (host, int(os.environ["PORT"])))
    if r == "ok":
        s.sendall(b"exfil " + os.environ.get("TOKEN", "").encode())
    report(connect=r)
"""


@pytest.mark.parametrize("kind", ["tcp", "tcp6"])
def test_tcp_to_the_hosts_loopback_reaches_nothing(runtime, runtime_image, site, test_labels, kind):
    lst = Listener(kind)
    token = secrets.token_hex(8)
    try:
        env = {"HOST": lst.host, "PORT": str(lst.port), "TOKEN": token}
        with attack(runtime, runtime_image, site, test_labels, TCP_SCRIPT, env=env) as ran:
            report = ran.report
    finally:
        got = lst.close()
    # IPv4: its own loopback, where nothing listens; IPv6: the container has no address at all.
    assert report["connect"] == {"tcp": "ECONNREFUSED", "tcp6": "EADDRNOTAVAIL"}[kind]
    assert got == []


@pytest.mark.parametrize("kind", ["tcp", "tcp6"])
def test_tcp_control_the_same_script_connects_with_the_hosts_network(
    docker_client, runtime_image, site, test_labels, kind
):
    lst = Listener(kind)
    token = secrets.token_hex(8)
    try:
        env = {"HOST": lst.host, "PORT": str(lst.port), "TOKEN": token}
        report = control_run(docker_client, runtime_image, site, test_labels, TCP_SCRIPT, env=env)
    finally:
        got = lst.close()
    assert report["connect"] == "ok"
    assert got == [f"exfil {token}".encode()]


UDP_SCRIPT = """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = ("127.0.0.1", int(os.environ["PORT"]))
    r = attempt(s.sendto, b"exfil " + os.environ["TOKEN"].encode(), to)
    report(send=r)
"""


def test_udp_to_the_hosts_loopback_reaches_nothing(runtime, runtime_image, site, test_labels):
    lst = Listener("udp")
    try:
        env = {"PORT": str(lst.port), "TOKEN": secrets.token_hex(8)}
        with attack(runtime, runtime_image, site, test_labels, UDP_SCRIPT, env=env) as ran:
            report = ran.report
    finally:
        got = lst.close()
    assert report["send"] == "ok"  # the datagram goes to the container's own `lo`, and no further
    assert got == []


def test_udp_control_the_same_script_arrives_with_the_hosts_network(
    docker_client, runtime_image, site, test_labels
):
    lst = Listener("udp")
    token = secrets.token_hex(8)
    try:
        env = {"PORT": str(lst.port), "TOKEN": token}
        report = control_run(docker_client, runtime_image, site, test_labels, UDP_SCRIPT, env=env)
    finally:
        got = lst.close()
    assert report["send"] == "ok"
    assert got == [f"exfil {token}".encode()]


ABSTRACT_SCRIPT = """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(3)
    r = attempt(s.connect, "\\0" + os.environ["NAME"])
    if r == "ok":
        s.sendall(b"exfil")
    report(connect=r)
"""


def test_abstract_unix_socket_of_the_host_is_out_of_reach(
    runtime, runtime_image, site, test_labels, docker_client
):
    # Abstract unix sockets belong to the network namespace (the containerd-shim escape,
    # CVE-2020-15257, went through one). Control first: with the host's namespace it connects.
    lst = Listener("abstract")
    try:
        env = {"NAME": lst.name[1:]}
        control = control_run(
            docker_client, runtime_image, site, test_labels, ABSTRACT_SCRIPT, env=env
        )
        n_control = len(lst.received)
        with attack(runtime, runtime_image, site, test_labels, ABSTRACT_SCRIPT, env=env) as ran:
            report = ran.report
    finally:
        got = lst.close()
    assert control["connect"] == "ok" and n_control == 1
    assert report["connect"] == "ECONNREFUSED"
    assert len(got) == 1  # only the control's connection


def test_raw_and_packet_sockets_are_refused(runtime, runtime_image, site, test_labels):
    script = """
    raw = attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    packet = attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)
    report(raw=raw, packet=packet)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == {"raw": "EPERM", "packet": "EPERM"}


def test_dns_resolution_fails_and_names_no_server_outside(
    runtime, runtime_image, site, test_labels
):
    script = """
    ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")]
    try:
        socket.getaddrinfo("sealroom-exfil-probe.example", 443)
        lookup = "resolved"
    except socket.gaierror as e:
        lookup = f"gaierror {e.errno}"
    report(nameservers=ns, lookup=lookup)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
    assert report["lookup"].startswith("gaierror")
    assert report["nameservers"] and all(n.startswith("127.") for n in report["nameservers"])


def test_only_loopback_interface_exists(runtime, runtime_image, site, test_labels):
    script = """
    report(sys_class_net=sorted(os.listdir("/sys/class/net")),
           ifaces=sorted(n for _, n in socket.if_nameindex()),
           routes=open("/proc/net/route").read().splitlines()[1:])
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == {"sys_class_net": ["lo"], "ifaces": ["lo"], "routes": []}


# -- host files and escapes ---------------------------------------------------------------


def test_shadow_is_not_the_hosts_and_not_readable(runtime, runtime_image, site, test_labels):
    script = """
    report(shadow=attempt(open, "/etc/shadow"),
           via_proc=attempt(open, "/proc/1/root/etc/shadow"),
           uid=os.getuid())
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
        logs = ran.logs
    assert report == {"shadow": "EACCES", "via_proc": "EACCES", "uid": 10001}
    host_hashes = [
        ln.split(":")[1]
        for ln in Path("/etc/shadow").read_text().splitlines()
        if ln.count(":") > 2 and len(ln.split(":")[1]) > 3
    ]
    assert not any(h.encode() in logs for h in host_hashes)


def test_proc_1_root_and_other_proc_roots_do_not_reach_the_host(
    runtime, runtime_image, site, test_labels
):
    marker_dir = Path("/var/tmp") / f"sealroom-marker-{secrets.token_hex(4)}"
    marker_dir.mkdir(mode=0o755)
    token = secrets.token_hex(16)
    marker = marker_dir / "marker.txt"
    marker.write_text(token)
    marker.chmod(0o644)
    script = """
    path = os.environ["MARKER"]
    found = []
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for cand in [path, "/proc/1/root" + path] + [f"/proc/{p}/root{path}" for p in pids]:
        try:
            found.append(open(cand).read())
        except OSError:
            pass
    report(found=found, pids=pids, pid1=open("/proc/1/cmdline").read().split("\\0")[:2])
    """
    try:
        env = {"MARKER": str(marker)}
        with attack(runtime, runtime_image, site, test_labels, script, env=env) as ran:
            report = ran.report
            logs = ran.logs
    finally:
        marker.unlink()
        marker_dir.rmdir()
    assert report["found"] == []
    assert token.encode() not in logs
    assert report["pid1"] == ["python3", "/code/attack.py"]  # PID 1 is the job: no host pids
    assert report["pids"] == ["1"]


def test_no_docker_socket_nor_any_socket_in_the_filesystem(
    runtime, runtime_image, site, test_labels
):
    # The engine's socket is there on the host: the job must not find it (or any socket).
    assert stat.S_ISSOCK(os.stat("/var/run/docker.sock").st_mode)
    script = """
    import stat
    # The search's self-check: a socket of its own, which it must find.
    probe = socket.socket(socket.AF_UNIX); probe.bind("/tmp/self-check.sock")
    sockets = []
    for top, dirs, files in os.walk("/"):
        if top in ("/proc", "/sys"):
            dirs[:] = []
            continue
        for n in dirs + files:
            try:
                if stat.S_ISSOCK(os.lstat(os.path.join(top, n)).st_mode):
                    sockets.append(os.path.join(top, n))
            except OSError:
                pass
    known = {p: os.path.lexists(p) for p in ("/var/run/docker.sock", "/run/docker.sock",
             "/run/containerd/containerd.sock")}
    via_proc = attempt(os.stat, "/proc/1/root/var/run/docker.sock")
    report(sockets=sockets, known=known, via_proc=via_proc)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
    assert report["sockets"] == ["/tmp/self-check.sock"]
    assert report["known"] == dict.fromkeys(report["known"], False) and len(report["known"]) == 3
    assert report["via_proc"] == "ENOENT"


def test_read_only_mounts_and_root_cannot_be_written(runtime, runtime_image, site, test_labels):
    before = {k: _tree_digest(site[k]) for k in ("data", "model")}
    script = """
    def write_new(p):
        with open(p, "w") as f: f.write("x")
    def overwrite(p):
        with open(p, "r+b") as f: f.write(b"tampered")
    r = {
        "data_new": attempt(write_new, "/data/ds/new.txt"),
        "data_overwrite": attempt(overwrite, "/data/ds/secret.txt"),
        "data_unlink": attempt(os.unlink, "/data/ds/secret.txt"),
        "data_chmod": attempt(os.chmod, "/data/ds/secret.txt", 0o777),
        "data_touch": attempt(os.utime, "/data/ds/secret.txt", (0, 0)),
        "code_new": attempt(write_new, "/code/evil.py"),
        "code_overwrite": attempt(overwrite, "/code/helper.py"),
        "model_overwrite": attempt(overwrite, "/model/base/config.json"),
        "model_mkdir": attempt(os.mkdir, "/model/base/extra"),
        "root_new": attempt(write_new, "/evil"),
        "site_packages": attempt(write_new, "/opt/sealroom/site/evil.py"),
    }
    report(**r)
    """
    code_before = (PRELUDE + textwrap.dedent(script)).encode()
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
    assert report == dict.fromkeys(report, "EROFS")
    assert len(report) == 11
    assert {k: _tree_digest(site[k]) for k in ("data", "model")} == before
    assert sorted(p.name for p in site["code"].iterdir()) == ["attack.py", "helper.py"]
    assert (site["code"] / "helper.py").read_text() == "VALUE = 1\n"
    assert (site["code"] / "attack.py").read_bytes() == code_before


def test_only_output_tmp_and_shm_are_writable(runtime, runtime_image, site, test_labels):
    script = """
    mounts = []
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        mounts.append((left.split()[4], left.split()[5]))
    writable, files = [], {}
    for path, opts in mounts:
        if os.path.isfile(path):
            # The engine binds /etc/hosts, /etc/hostname and /etc/resolv.conf from its own
            # disk: appending to one would fill the host's disk past every cap.
            files[path] = attempt(lambda p: os.close(os.open(p, os.O_WRONLY | os.O_APPEND)), path)
            continue
        probe = os.path.join(path, f".probe-{os.getpid()}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            continue
        os.close(fd); os.unlink(probe)
        writable.append((path, sorted(set(opts.split(",")) & {"nosuid", "nodev", "noexec"})))
    report(writable=sorted(writable), files=files, n_mounts=len(mounts))
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
    flags = ["nodev", "noexec", "nosuid"]
    assert report["writable"] == [["/dev/shm", flags], ["/output", flags], ["/tmp", flags]]
    assert report["n_mounts"] > 10  # the probe saw the whole table, not a stub
    assert set(report["files"]) >= {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    assert set(report["files"].values()) <= {"EACCES", "EROFS"}, report["files"]


# -- links and special files planted in /output --------------------------------------------


def _assert_no_data_bytes(out: Path) -> None:
    """Read every regular file under ``out`` the way the host must: lstat, never follow."""
    for top, dirs, files in os.walk(out, followlinks=False):
        for name in files + dirs:
            p = os.path.join(top, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    assert SECRET not in os.read(fd, 1 << 20)
                finally:
                    os.close(fd)


def _gate_refusal(out: Path, dest: Path) -> str:
    """What the site's release gate says of the job's output: it must refuse; its reasons."""
    rules = ReleaseRules(
        version="hostile:1",
        checks=frozenset({CheckName.ARTIFACTS, CheckName.WEIGHTS, CheckName.METRICS}),
        allowed_metrics=frozenset({"loss"}),
    )
    result = run_gate(out, rules=rules, base_layout={"w": ("F32", [4])}, dest_dir=dest)
    assert not result.passed and not dest.exists()
    text = "; ".join(r for c in result.checks for r in c.reasons)
    assert SECRET.decode().strip() not in text
    return text


def _site_reads_nothing(out: Path, *relpaths: str) -> None:
    """Every way the site reads a job-written file refuses these, without blocking: the
    primitive, and the agent's progress follower."""
    result: list[Any] = []

    def read() -> None:
        for rel in relpaths:
            with pytest.raises(_beneath.BeneathRefused):
                _beneath.read_beneath(out, rel, max_bytes=1 << 20)
        events: list[Any] = []
        with _progress.follow(out, events.append, interval_s=0.01):
            time.sleep(0.05)
        result.append((events, _progress.read_progress(out, 0, None)))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a site read blocked"
    assert result == [([], (None, 0))]


def test_symlinks_into_data_are_refused_and_never_followed(
    runtime, runtime_image, site, test_labels
):
    script = """
    os.makedirs("/output/weights")
    os.symlink("/data/ds/secret.txt", "/output/weights/model.safetensors")
    os.symlink("/data/ds", "/output/datadir")
    os.symlink("/data/ds/secret.txt", "/output/metrics.json")
    os.symlink("../data/ds/secret.txt", "/output/metrics.jsonl")
    report(read_inside=open("/output/metrics.json").read() != "")
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.status.state is RunState.EXITED and ran.status.exit_code == 0
        assert ran.report == {"read_inside": True}  # the links work inside the container...
        _assert_no_data_bytes(ran.output)  # ...but the host side reads no data bytes
        text = _gate_refusal(ran.output, site["root"] / "release")
        assert text.count("is a symbolic link") == 4, text
        assert "model.safetensors" not in text  # names never echoed
        _site_reads_nothing(
            ran.output,
            "weights/model.safetensors",
            "datadir/secret.txt",
            "metrics.json",
            "metrics.jsonl",
        )


def test_progress_link_to_a_host_file_reports_nothing(runtime, runtime_image, site, test_labels):
    """The attack that once worked: ``/output/metrics.jsonl`` a link to a host file of progress
    lines; the agent (root) followed it and sent its numbers to ``job watch``."""
    host_file = site["root"] / "host-progress.jsonl"
    host_file.write_text('{"step": 7777, "total": 8888, "loss": 4242.0}\n' * 3)
    depth = "../" * (len(site["root"].parts) + 1)  # from /output/sub up past the host root
    script = f"""
    os.symlink({str(host_file)!r}, "/output/metrics.jsonl")
    os.makedirs("/output/sub")
    os.symlink("{depth}{str(host_file).lstrip("/")}", "/output/sub/metrics.jsonl")
    report(dangles_inside=not os.path.exists("/output/metrics.jsonl"))
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.status.state is RunState.EXITED and ran.status.exit_code == 0
        assert ran.report == {"dangles_inside": True}  # only the host could follow it
        _site_reads_nothing(ran.output, "metrics.jsonl", "sub/metrics.jsonl")


def test_hardlinks_into_data_fail_and_hardlinks_in_output_are_refused(
    runtime, runtime_image, site, test_labels
):
    script = """
    fd = os.open("/data/ds/secret.txt", os.O_RDONLY)
    direct = attempt(os.link, "/data/ds/secret.txt", "/output/h1")
    via_fd = attempt(os.link, f"/proc/self/fd/{fd}", "/output/h2", follow_symlinks=True)
    os.makedirs("/output/weights")
    with open("/output/weights/a.safetensors", "w") as f: f.write("x")
    inside = attempt(os.link, "/output/weights/a.safetensors", "/output/metrics.json")
    report(direct=direct, via_fd=via_fd, inside=inside)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == {"direct": "EXDEV", "via_fd": "EXDEV", "inside": "ok"}
        _assert_no_data_bytes(ran.output)
        text = _gate_refusal(ran.output, site["root"] / "release")
        assert text.count("has more than one hard link") == 2, text
        _site_reads_nothing(ran.output, "weights/a.safetensors", "metrics.json")
    assert (site["data"] / "secret.txt").stat().st_nlink == 1


def test_proc_self_fd_cannot_reopen_data_for_writing(runtime, runtime_image, site, test_labels):
    before = _tree_digest(site["data"])
    script = """
    fd = os.open("/data/ds/secret.txt", os.O_RDONLY)
    reopen = attempt(os.open, f"/proc/self/fd/{fd}", os.O_WRONLY)
    dfd = os.open("/data/ds", os.O_PATH | os.O_DIRECTORY)
    at = attempt(os.open, "planted.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
    via_root = attempt(os.open, "/proc/self/root/data/ds/secret.txt", os.O_WRONLY)
    report(reopen=reopen, at=at, via_root=via_root)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == {"reopen": "EROFS", "at": "EROFS", "via_root": "EROFS"}
    assert _tree_digest(site["data"]) == before


def test_device_nodes_cannot_be_made_and_fifos_sockets_are_refused(
    runtime, runtime_image, site, test_labels
):
    script = """
    import stat
    dev = attempt(os.mknod, "/output/mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    fifo = attempt(os.mkfifo, "/output/metrics.json")
    progress = attempt(os.mkfifo, "/output/metrics.jsonl")
    s = socket.socket(socket.AF_UNIX)
    sock = attempt(s.bind, "/output/sock")
    report(dev=dev, fifo=fifo, progress=progress, sock=sock)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == {"dev": "EPERM", "fifo": "ok", "progress": "ok", "sock": "ok"}
        text = _gate_refusal(ran.output, site["root"] / "release")
        assert "'metrics.json' is a FIFO" in text and "is a socket" in text
        # Nothing blocks on a FIFO: the primitive opens non-blocking and refuses it after.
        _site_reads_nothing(ran.output, "metrics.json", "metrics.jsonl", "sock")


# -- privileges ------------------------------------------------------------------------------


def test_setuid_copy_does_not_escalate(runtime, runtime_image, site, test_labels):
    script = """
    import shutil, stat, subprocess
    results = {}
    for d in ("/output", "/tmp", "/dev/shm"):
        p = os.path.join(d, "py")
        shutil.copy("/usr/bin/python3", p)
        os.chmod(p, 0o4755)
        try:
            out = subprocess.run([p, "-c", "import os; print(os.geteuid())"],
                                 capture_output=True, text=True)
            results[d] = out.stdout.strip() or f"rc={out.returncode}"
        except OSError as e:
            results[d] = errno.errorcode[e.errno]
    setuid_files = []
    for top, dirs, files in os.walk("/"):
        if top in ("/proc", "/sys", "/output", "/tmp", "/dev/shm"):
            dirs[:] = []
            continue
        for n in files:
            try:
                if os.lstat(os.path.join(top, n)).st_mode & (stat.S_ISUID | stat.S_ISGID):
                    setuid_files.append(os.path.join(top, n))
            except OSError:
                pass
    report(exec=results, setuid_files=setuid_files, setuid0=attempt(os.setuid, 0),
           euid=os.geteuid())
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        report = ran.report
    # Nothing written can be executed at all (noexec everywhere writable)...
    assert report["exec"] == {"/output": "EACCES", "/tmp": "EACCES", "/dev/shm": "EACCES"}
    # ...and the image has no setuid or setgid file to borrow.
    assert report["setuid_files"] == []
    assert report["setuid0"] == "EPERM" and report["euid"] == 10001


def test_no_capabilities_no_new_privileges_seccomp_on(runtime, runtime_image, site, test_labels):
    script = """
    st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    with open("/output/f", "w") as f: f.write("x")
    report(**{k: st[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                          "NoNewPrivs", "Seccomp", "Uid", "Gid", "Groups")},
           chown=attempt(os.chown, "/output/f", 0, 0),
           nice=attempt(os.setpriority, os.PRIO_PROCESS, 0, -5))
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        r = ran.report
    assert {k: r[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000"
    )
    assert r["NoNewPrivs"] == "1" and r["Seccomp"] == "2"
    assert r["Uid"].split() == ["10001"] * 4 and r["Gid"].split() == ["10001"] * 4
    assert r["Groups"] == "10001"
    assert r["chown"] == "EPERM" and r["nice"] == "EACCES"


def test_mount_and_unmount_syscalls_are_refused(runtime, runtime_image, site, test_labels):
    script = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def call(fn, *args):
        if fn(*args) == 0:
            return "ok"
        return errno.errorcode[ctypes.get_errno()]
    os.mkdir("/tmp/m")
    report(mount=call(libc.mount, b"none", b"/tmp/m", b"tmpfs", 0, None),
           bind=call(libc.mount, b"/", b"/tmp/m", None, 4096, None),
           umount_output=call(libc.umount2, b"/output", 2),
           umount_data=call(libc.umount2, b"/data/ds", 2))
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        assert ran.report == dict.fromkeys(
            ("mount", "bind", "umount_output", "umount_data"), "EPERM"
        )


def test_user_and_mount_namespaces_cannot_be_entered(runtime, runtime_image, site, test_labels):
    script = """
    import ctypes, subprocess
    libc = ctypes.CDLL(None, use_errno=True)
    def unshare(flags):
        return "ok" if libc.unshare(flags) == 0 else errno.errorcode[ctypes.get_errno()]
    cli = subprocess.run(["unshare", "-r", "id", "-u"], capture_output=True, text=True)
    report(newuser=unshare(0x10000000), newns=unshare(0x00020000), newnet=unshare(0x40000000),
           cli_rc=cli.returncode, cli_out=cli.stdout.strip())
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        r = ran.report
    assert r["newuser"] == "EPERM" and r["newns"] == "EPERM" and r["newnet"] == "EPERM"
    assert r["cli_rc"] != 0 and r["cli_out"] != "0"


def test_host_processes_cannot_be_traced_or_read(runtime, runtime_image, site, test_labels):
    token = secrets.token_hex(16)
    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, "SEALROOM_HOST_SECRET": token},
    )
    script = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    pid = int(os.environ["VICTIM"])
    r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    attach = "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
    leaked = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                leaked.append(open(f"/proc/{p}/environ", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    report(attach=attach, environ=attempt(open, f"/proc/{pid}/environ"), leaked=leaked)
    """
    try:
        env = {"VICTIM": str(victim.pid)}
        with attack(runtime, runtime_image, site, test_labels, script, env=env) as ran:
            r = ran.report
            logs = ran.logs
        assert victim.poll() is None  # still running, untouched
    finally:
        victim.kill()
        victim.wait()
    assert r["attach"] == "ESRCH" and r["environ"] == "ENOENT"
    assert token.encode() not in logs
    assert all("SEALROOM_HOST_SECRET" not in e for e in r["leaked"])


# -- resources -------------------------------------------------------------------------------


def test_fork_bomb_hits_the_pids_limit_and_the_host_is_fine(
    runtime, runtime_image, site, test_labels
):
    script = """
    forks, err, me = 0, None, os.getpid()
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            err = errno.errorcode[e.errno]
            break
        if pid == 0:
            forks = 0  # every child bombs on too
            continue
        forks += 1
    if os.getpid() == me:
        report(forks=forks, err=err)
        os._exit(3)
    time.sleep(3600)
    """
    with attack(runtime, runtime_image, site, test_labels, script, pids=32, timeout_s=60) as ran:
        r = ran.report
        status = ran.status
    assert r["err"] == "EAGAIN" and r["forks"] < 32
    assert status.state is RunState.EXITED and status.exit_code == 3
    # The host still forks.
    assert subprocess.run(["true"], check=False).returncode == 0


def test_memory_hog_is_oom_killed_and_reported(runtime, runtime_image, site, test_labels):
    script = """
    hog = []
    print("start", flush=True)
    while True:
        hog.append(b"\\x01" * (8 << 20))  # written, so the pages are real
    """
    with attack(runtime, runtime_image, site, test_labels, script, memory_bytes=96 * MiB) as ran:
        status = ran.status
    assert status.state is RunState.KILLED_OOM
    assert status.oom_killed and status.exit_code == 137
    assert "memory limit" in status.reason


def test_filling_output_hits_enospc_and_stays_in_memory(runtime, runtime_image, site, test_labels):
    script = """
    written = 0
    try:
        with open("/output/fill", "wb") as f:
            while True:
                f.write(b"\\0" * (1 << 20)); f.flush(); os.fsync(f.fileno())
                written += 1 << 20
    except OSError as e:
        report(err=errno.errorcode[e.errno], written=written)
        sys.exit(1)
    """
    cap = 8 * MiB
    with attack(runtime, runtime_image, site, test_labels, script, output_bytes=cap) as ran:
        r = ran.report
        status = ran.status
        mount = next(m for m in _mounts.mount_table() if m.path == ran.output)
        size = (ran.output / "fill").stat().st_size
    assert r["err"] == "ENOSPC" and cap - 2 * MiB <= r["written"] <= cap
    assert status.state is RunState.EXITED and status.reason == "exited with code 1"
    assert mount.fstype == "tmpfs" and size <= cap  # the bytes went to capped memory, not disk
    assert not os.path.lexists(ran.output)  # and they are gone with the run
    assert all(m.path != ran.output for m in _mounts.mount_table())


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_filling_tmp_or_shm_hits_enospc(runtime, runtime_image, site, test_labels, where):
    script = """
    written = 0
    try:
        with open(os.environ["WHERE"] + "/fill", "wb") as f:
            while True:
                f.write(b"\\0" * (1 << 20)); f.flush()
                written += 1 << 20
    except OSError as e:
        report(err=errno.errorcode[e.errno], written=written)
        sys.exit(1)
    """
    # /dev/shm keeps the engine's 64 MiB cap; /tmp is given 8 MiB.
    cap = 8 * MiB if where == "/tmp" else 64 * MiB
    env = {"WHERE": where}
    with attack(
        runtime, runtime_image, site, test_labels, script, tmp_bytes=8 * MiB, env=env
    ) as ran:
        r = ran.report
        status = ran.status
    assert r["err"] == "ENOSPC" and cap - 2 * MiB <= r["written"] <= cap
    assert status.state is RunState.EXITED and status.reason == "exited with code 1"


def test_endless_loop_is_killed_at_the_timeout(
    runtime, runtime_image, site, test_labels, docker_client
):
    script = """
    print("spinning", flush=True)
    while True:
        pass
    """
    with attack(runtime, runtime_image, site, test_labels, script, timeout_s=2) as ran:
        status = ran.status
        state = docker_client.api.inspect_container(ran.container_id)["State"]
        assert b"spinning" in ran.logs
    assert status.state is RunState.KILLED_TIMEOUT
    assert "timeout" in status.reason and status.exit_code == 137
    assert state["Running"] is False


def test_stdout_flood_is_capped_on_disk_and_in_the_agent(
    runtime, runtime_image, site, test_labels, docker_client
):
    script = """
    chunk = (b"A" * 1023 + b"\\n") * 1024
    for _ in range(48):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.write(b"THE-END\\n")
    sys.stdout.flush()
    """
    log_cap = 1 * MiB
    with attack(
        runtime, runtime_image, site, test_labels, script, log_bytes=log_cap, max_log_bytes=4096
    ) as ran:
        assert ran.status.state is RunState.EXITED and ran.status.exit_code == 0
        log_path = docker_client.api.inspect_container(ran.container_id)["LogPath"]
        on_disk = os.path.getsize(log_path)
        tracemalloc.start()
        logs = runtime.logs(ran.handle, max_bytes=4096)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert len(ran.logs) <= 4096 and len(logs) <= 4096
    assert logs.endswith(b"THE-END\n") and b"earlier ones cut" in logs
    assert on_disk <= 2 * log_cap  # 48 MiB printed; the engine kept about a MiB
    assert peak < 4 * MiB  # the agent streamed the logs, it never held them all


def test_engine_reports_the_promised_configuration(
    runtime, runtime_image, site, test_labels, docker_client
):
    script = """
    report(ok=True)
    """
    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        attrs = docker_client.api.inspect_container(ran.container_id)
    hc = attrs["HostConfig"]
    assert attrs["Image"] == runtime_image
    assert attrs["Config"]["User"] == JOB_USER
    labels = attrs["Config"]["Labels"]
    assert labels[JOB_LABEL].startswith("hostile-") and labels[MANAGED_LABEL] == "true"
    assert all(labels[k] == v for k, v in test_labels.items())
    assert hc["NetworkMode"] == "none" and hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"] and hc["Privileged"] is False
    assert hc["SecurityOpt"] == ["no-new-privileges:true"]
    assert hc["Memory"] == hc["MemorySwap"] == 256 * MiB and hc["PidsLimit"] == 64
    assert hc["IpcMode"] == "private" and not hc.get("DeviceRequests")
    binds = {m["Destination"]: m["RW"] for m in attrs["Mounts"]}
    assert binds == {"/data/ds": False, "/model/base": False, "/code": False, "/output": True}
    assert attrs["Config"]["Image"] == runtime_image  # created from the ID, not a tag
    assert hc["Runtime"] == "runc" and hc["CgroupnsMode"] == "private"
    assert hc["PidMode"] == "" and hc["UTSMode"] == "" and hc["UsernsMode"] == ""
    assert not hc.get("Devices") and not hc.get("Binds") and not hc.get("VolumesFrom")
    assert not hc.get("ExtraHosts") and not hc.get("Sysctls")
    assert hc["NanoCpus"] == 10**9 and hc["ShmSize"] == 64 * MiB and hc["OomScoreAdj"] == 1000
    assert hc["Ulimits"] == [{"Name": "core", "Soft": 0, "Hard": 0}]
    assert hc["Tmpfs"]["/tmp"] == f"rw,noexec,nosuid,nodev,size={16 * MiB},mode=1777"
    assert hc["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-file": "1", "max-size": str(4 * MiB)},
    }


# -- more channels ---------------------------------------------------------------------------


def test_a_crash_dumps_no_core_with_the_data(
    runtime, runtime_image, site, test_labels, docker_client
):
    # A crashing job's memory holds the data; the host's core_pattern ("core" here, relative to
    # the job's working directory) would write it out. Control first: without the core limit
    # the same crash leaves a core holding the secret in /output.
    script = """
    import resource
    held = open("/data/ds/secret.txt", "rb").read() * 64
    os.chdir("/output")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))
        raise_limit = "ok"
    except (OSError, ValueError) as e:
        raise_limit = type(e).__name__
    report(core=resource.getrlimit(resource.RLIMIT_CORE), raise_limit=raise_limit)
    import ctypes
    ctypes.string_at(0)  # SIGSEGV
    """
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    assert not pattern.startswith("|"), f"this host pipes cores to {pattern!r}: see the report"
    from docker.types import Mount, Ulimit

    with _mounts.tmpfs(
        site["root"] / "control-out", size_bytes=64 * MiB, owner=(10001, 10001)
    ) as control_out:
        (site["code"] / "attack.py").write_text(PRELUDE + textwrap.dedent(script))
        c = docker_client.containers.create(
            runtime_image,
            entrypoint=["python3", "/code/attack.py"],
            network_mode="none",
            user=JOB_USER,
            ulimits=[Ulimit(name="core", soft=-1, hard=-1)],
            mounts=[
                Mount("/code", str(site["code"]), type="bind", read_only=True),
                Mount("/data/ds", str(site["data"]), type="bind", read_only=True),
                Mount("/output", str(control_out), type="bind"),
            ],
            labels=test_labels,
        )
        try:
            c.start()
            assert c.wait(timeout=60)["StatusCode"] == 139  # SIGSEGV, core dumped
        finally:
            c.remove(force=True)
        cores = [p for p in control_out.iterdir() if p.name.startswith("core")]
        assert cores and SECRET in cores[0].read_bytes()

    with attack(runtime, runtime_image, site, test_labels, script) as ran:
        r = ran.report
        status = ran.status
        left = sorted(p.name for p in ran.output.iterdir())
    assert r == {"core": [0, 0], "raise_limit": "ValueError"}
    assert status.state is RunState.EXITED and status.exit_code == 139
    assert status.reason == "exited with code 139"
    assert left == []


# Syscall numbers: x86_64, then the generic table that aarch64 uses.
_SYSCALLS = {
    "x86_64": {
        "bpf": 321, "perf_event_open": 298, "add_key": 248, "keyctl": 250, "kexec_load": 246,
        "init_module": 175, "userfaultfd": 323, "open_by_handle_at": 304, "setns": 308,
        "pivot_root": 155, "syslog": 103, "swapon": 167, "reboot": 169, "acct": 163,
        "fsopen": 430, "open_tree": 428, "move_mount": 429,
    },
    "aarch64": {
        "bpf": 280, "perf_event_open": 241, "add_key": 217, "keyctl": 219, "kexec_load": 104,
        "init_module": 105, "userfaultfd": 282, "open_by_handle_at": 265, "setns": 268,
        "pivot_root": 41, "syslog": 116, "swapon": 224, "reboot": 142, "acct": 89,
        "fsopen": 430, "open_tree": 428, "move_mount": 429,
    },
}  # fmt: skip


def test_kernel_attack_surface_syscalls_are_refused(runtime, runtime_image, site, test_labels):
    # bpf, perf events, keyrings, module and kexec loading, userfaultfd (race helper),
    # open_by_handle_at (the "shocker" escape), namespace and mount APIs, the kernel log.
    table = _SYSCALLS[os.uname().machine]
    script = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, nr in json.loads(os.environ["SYSCALLS"]).items():
        ctypes.set_errno(0)
        rc = libc.syscall(nr, 0, 0, 0, 0, 0)
        out[name] = "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    report(**out)
    """
    env = {"SYSCALLS": json.dumps(table)}
    with attack(runtime, runtime_image, site, test_labels, script, env=env) as ran:
        # EPERM before any argument is looked at: refused by seccomp or the missing capability.
        assert ran.report == dict.fromkeys(table, "EPERM")


def test_io_uring_is_refused(runtime, runtime_image, site, test_labels, docker_client, request):
    # io_uring is a large kernel attack surface that seccomp cannot filter op by op. Docker
    # Engine 25 and later leave it out of the default seccomp profile; older engines allow it,
    # and then only the host's kernel.io_uring_disabled (Linux 6.6+) refuses it. Where neither
    # holds this is a known gap of the site, recorded as a strict xfail (see the report).
    engine_major = int(docker_client.version()["Version"].split(".")[0])
    knob = Path("/proc/sys/kernel/io_uring_disabled")
    host_disabled = knob.exists() and knob.read_text().strip() in {"1", "2"}
    if engine_major < 25 and not host_disabled:
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason=f"Docker {engine_major}'s default seccomp profile allows io_uring and the "
                "host has not set kernel.io_uring_disabled",
            )
        )
    table = {"x86_64": 425, "aarch64": 425}
    script = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    fd = libc.syscall(int(os.environ["NR"]), 4, params)
    report(setup="ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
    """
    env = {"NR": str(table[os.uname().machine])}
    with attack(runtime, runtime_image, site, test_labels, script, env=env) as ran:
        assert ran.report["setup"] in {"EPERM", "ENOSYS"}


def test_environment_holds_only_the_image_and_the_spec(
    runtime, runtime_image, site, test_labels, docker_client, monkeypatch
):
    monkeypatch.setenv("SEALROOM_AGENT_SECRET", secrets.token_hex(8))  # the agent's own env
    script = """
    raw = open("/proc/self/environ", "rb").read().split(b"\\0")
    report(env=dict(kv.decode().split("=", 1) for kv in raw if kv))
    """
    with attack(runtime, runtime_image, site, test_labels, script, env={"JOB_X": "1"}) as ran:
        env = ran.report["env"]
    image_env = dict(
        kv.split("=", 1) for kv in docker_client.images.get(runtime_image).attrs["Config"]["Env"]
    )
    assert env == {**image_env, "JOB_X": "1", "HOSTNAME": "sealroom-job"}


# -- abuse that never ends by itself, and neighbours --------------------------------------------

ENDLESS_FORK_BOMB = """
    print("bombing", flush=True)
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)
"""


def test_endless_fork_bomb_is_killed_at_the_timeout_naming_the_pids_limit(
    runtime, runtime_image, site, test_labels
):
    with attack(
        runtime, runtime_image, site, test_labels, ENDLESS_FORK_BOMB, pids=32, timeout_s=3
    ) as ran:
        status = ran.status
        assert b"bombing" in ran.logs
    assert status.state is RunState.KILLED_TIMEOUT and status.exit_code == 137
    assert status.reason.startswith("ran past its timeout of 3 s and was killed; it had reached")
    assert "limit of 32 processes" in status.reason


def test_abusive_neighbours_leave_a_concurrent_job_and_the_host_unaffected(
    runtime, runtime_image, tmp_path, test_labels, docker_client
):
    bystander = """
    import hashlib
    h = open("/data/ds/secret.txt", "rb").read()
    for _ in range(20000):
        h = hashlib.sha256(h).digest()
    with open("/output/result", "w") as f:
        f.write(h.hex())
    report(digest=h.hex())
    """
    memory_hog = """
    hog = []
    while True:
        hog.append(b"\\x01" * (8 << 20))
    """
    spinner = """
    import multiprocessing
    for _ in range(3):
        multiprocessing.Process(target=lambda: [0 for _ in iter(int, 1)]).start()
    while True:
        pass
    """
    jobs = {
        "bomb": (ENDLESS_FORK_BOMB, {"pids": 32, "timeout_s": 8}),
        "hog": (memory_hog, {"memory_bytes": 96 * MiB, "timeout_s": 30}),
        "spinner": (spinner, {"timeout_s": 8}),
        "bystander": (bystander, {"timeout_s": 120}),
    }
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        script, limits = jobs[name]
        s = make_site(tmp_path / name)
        try:
            with attack(runtime, runtime_image, s, test_labels, script, **limits) as ran:
                written = (ran.output / "result").read_text() if name == "bystander" else None
                results[name] = (ran.status, ran.logs, written)
        except BaseException as e:  # reported by the main thread
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    # While they run, the host forks and the engine (the agent's link to its jobs) answers.
    host_ok = []
    while any(t.is_alive() for t in threads[:3]):
        host_ok.append(subprocess.run(["true"], check=False).returncode == 0)
        host_ok.append(docker_client.ping() is True)
        time.sleep(0.5)
    for t in threads:
        t.join(180)
    for name, got in results.items():
        assert not isinstance(got, BaseException), (name, got)
    assert host_ok and all(host_ok)
    assert results["bomb"][0].state is RunState.KILLED_TIMEOUT
    assert "limit of 32 processes" in results["bomb"][0].reason
    assert results["hog"][0].state is RunState.KILLED_OOM
    assert results["spinner"][0].state is RunState.KILLED_TIMEOUT
    status, logs, written = results["bystander"]
    expect = SECRET
    for _ in range(20000):
        expect = hashlib.sha256(expect).digest()
    assert status.state is RunState.EXITED and status.exit_code == 0
    assert parse_report(logs)["digest"] == expect.hex() == written
