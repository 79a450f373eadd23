"""Bench entries for the gateway: authorised and audited RPCs, transfers, and launch latency.

``bench_rpc``: WhoAmI calls per second over mTLS from N client threads, each call authorised from
the client certificate and audited durably before its answer, against a bare gRPC echo served
with the same certificates, thread pool and message limits, in the same run.

``bench_transfers``: a bundle upload (SubmitJob) and a release download (DownloadRelease) of S
bytes, file to file, against raw TLS over loopback moving the same S bytes file to file with the
same certificates; and the gateway's resident memory while they run (the transfers must stream:
its growth should be a small fraction of S).

``bench_launch``: approved-to-running through the real gateway and its Docker site (from the
owner's DecideJob call to the RUNNING event a watcher gets) against a bare ``docker create`` +
``start`` of the same image; the issue's goal is at most bare + 0.3 s.

Servers run in child processes (:mod:`tests.bench._serve`) so that the clients' interpreter is
not the servers' and the gateway's memory is its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from enclave.identity import IdentityFiles
from enclave.writebehind import WriteBehind
from gateway.client import Client
from tests.bench._fast import (
    CUSTOM_SPEC,
    FAST_SPEC,
    ONE_STEP_SPEC,
    Home,
    make_home,
    prepare,
    write_payload,
)
from tests.bench._proc import RssSampler, Served, cpu_seconds
from tests.bench._serve import ECHO_METHOD
from tests.bench._stats import Paired

MB = 1 << 20


# -- RPC rate -------------------------------------------------------------------------------


def _rate(threads: int, seconds: float, make_call: Callable[[], Callable[[], object]]) -> float:
    """Calls per second from ``threads`` threads, each with its own channel, for ``seconds``."""
    calls = [make_call() for _ in range(threads)]
    for call in calls:  # connect and warm up, outside the timing
        for _ in range(20):
            call()
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        call = calls[i]
        start.wait()
        n = 0
        while time.perf_counter() < stop_at[0]:
            call()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _channel(address: str, identity: IdentityFiles) -> grpc.Channel:
    cert, key, ca = identity.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(address, creds)


def bench_rpc(tmp: Path, *, quick: bool) -> dict[str, Any]:
    threads, seconds, rounds = (8, 2.0, 2) if quick else (16, 3.0, 3)
    h = make_home(tmp)
    gw = Served("gateway", h.home, log=tmp / "gateway.log")
    echo = Served("echo", h.home, log=tmp / "echo.log")
    clients: list[Client] = []
    channels: list[grpc.Channel] = []
    try:
        payload = b"x" * 48  # about a WhoAmI answer

        def whoami() -> Callable[[], object]:
            c = h.client(gw.address, "theo")
            clients.append(c)
            return c.whoami

        def bare() -> Callable[[], object]:
            ch = _channel(echo.address, h.identities["theo"])
            channels.append(ch)
            call = ch.unary_unary(ECHO_METHOD)
            return lambda: call(payload, timeout=60)

        with h.client(gw.address, "carol") as carol:
            size_before = carol.audit_checkpoint(fresh=True).size
            paired = Paired()
            for _ in range(rounds):
                limit = _rate(threads, seconds, bare)
                paired.add(_rate(threads, seconds, whoami), limit)
            size_after = carol.audit_checkpoint(fresh=True).size
            calls = size_after - size_before
            recent = carol.audit_query(action="rpc.WhoAmI", limit=5)
        if not recent or any(
            r.event.principal != "theo" or r.event.outcome != "allowed" for r in recent
        ):
            raise RuntimeError(f"the WhoAmI calls were not audited as expected: {recent}")
    finally:
        for c in clients:
            c.close()
        for ch in channels:
            ch.close()
        gw.stop()
        echo.stop()
    return paired.result(
        f"RPC: authorised + audited WhoAmI vs bare gRPC echo (mTLS, {threads} threads)",
        unit="calls/s",
        goal=0.5,
        digits=1,
        audit_records_written=calls,
        threads=threads,
    )


# -- transfers ------------------------------------------------------------------------------


def _tls_context(identity: IdentityFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(identity.cert, identity.key)
    ctx.load_verify_locations(identity.ca_cert)
    return ctx


def _tls_put(port: int, ctx: ssl.SSLContext, source: Path, size: int) -> float:
    t0 = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(f"PUT {size}\n".encode())
        with source.open("rb") as f:
            while data := f.read(MB):
                conn.sendall(data)
        if conn.recv(3) != b"OK\n":
            raise RuntimeError("the TLS sink did not acknowledge the upload")
    return time.perf_counter() - t0


def _tls_get(port: int, ctx: ssl.SSLContext, dest: Path, size: int) -> float:
    t0 = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
        WriteBehind.create(dest) as out,
    ):
        conn.sendall(f"GET {size}\n".encode())
        buf = bytearray(MB)
        view = memoryview(buf)
        left = size
        while left:
            got = conn.recv_into(view, min(left, MB))
            if not got:
                raise RuntimeError("the TLS source stopped early")
            out.write(view[:got])
            left -= got
    return time.perf_counter() - t0


def _wait_released(client: Client, job_id: str) -> None:
    for _ in client.watch(job_id, timeout=600):
        pass
    job = client.job(job_id)
    if job.state != "RELEASED":
        raise RuntimeError(f"job {job_id} ended {job.state}: {list(job.reasons)}")


class _CpuBook:
    """CPU seconds a server process spent in each transfer, by kind (median over the runs)."""

    def __init__(self) -> None:
        self.spent: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def measure(self, kind: str, pid: int) -> Iterator[None]:
        before = cpu_seconds(pid)
        yield
        self.spent.setdefault(kind, []).append(cpu_seconds(pid) - before)

    def per_gb(self, kind: str, mb: float) -> float:
        return round(statistics.median(self.spent[kind]) * 1024 / mb, 2)


def _sha256_mb_s(total_mb: int = 256) -> float:
    block = os.urandom(MB)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(total_mb):
        h.update(block)
    return round(total_mb / (time.perf_counter() - t0), 1)


def _rss_growth(sampler: RssSampler, before: int) -> int:
    return max(0, sampler.peak - before)


def bench_transfers(tmp: Path, *, quick: bool) -> list[dict[str, Any]]:
    """Upload and download against raw TLS in turns (raw put, upload, raw get, download, and
    again), each side's files written and removed alike, so that the page cache and the
    machine's memory are in the same state for both sides of a pair."""
    size = (256 if quick else 2048) * MB
    runs = 2 if quick else 3
    h = make_home(tmp)
    data = tmp / "data"
    data.mkdir()
    source = write_payload(data / "bundle.bin", size)
    gw = Served(
        "gateway",
        h.home,
        "--release-bytes",
        str(size),
        "--max-bundle-bytes",
        str(size + MB),
        log=tmp / "gateway.log",
    )
    sink = Served("tls", h.home, "--dir", str(data), "--source", str(source), log=tmp / "tls.log")
    up, down = Paired(), Paired()
    up_rss: list[tuple[int, int, int]] = []
    down_rss: list[tuple[int, int, int]] = []
    ctx = _tls_context(h.identities["theo"])
    mb = size / MB
    cpu = _CpuBook()
    sha256_mb_s = _sha256_mb_s()
    try:
        with h.client(gw.address, "olivia") as owner, h.client(gw.address, "theo") as team:
            prepare(owner, "upload", tmp=tmp, mode="manual")
            prepare(owner, "download", tmp=tmp, mode="automatic")
            # Warm up every path once with a small transfer, so that start-up allocations
            # (channels, thread pools, SQLite caches) are in the baseline, not the growth.
            small = write_payload(data / "small.bin", min(size // 4, 64 * MB))
            team.submit(CUSTOM_SPEC.format(name="warm", dataset="upload"), bundle=small)
            released = team.submit(FAST_SPEC.format(name="big", dataset="download"))
            _wait_released(team, released.id)

            for i in range(runs):
                with cpu.measure("raw_put", sink.pid):
                    raw_put = _tls_put(sink.port, ctx, source, size)
                for p in data.glob("put-*"):
                    p.unlink()
                before = gw.rss()
                with RssSampler(gw.pid) as sampler, cpu.measure("upload", gw.pid):
                    t0 = time.perf_counter()
                    job = team.submit(
                        CUSTOM_SPEC.format(name=f"upload-{i}", dataset="upload"), bundle=source
                    )
                    upload_s = time.perf_counter() - t0
                if job.state != "PENDING_APPROVAL":
                    raise RuntimeError(f"the upload's job is {job.state}: {list(job.reasons)}")
                up.add(mb / upload_s, mb / raw_put)
                up_rss.append((_rss_growth(sampler, before), before, sampler.peak))

                got_file = data / "got.bin"
                with cpu.measure("raw_get", sink.pid):
                    raw_get = _tls_get(sink.port, ctx, got_file, size)
                got_file.unlink()
                dest = data / f"release-{i}"
                before = gw.rss()
                with RssSampler(gw.pid) as sampler, cpu.measure("download", gw.pid):
                    t0 = time.perf_counter()
                    team.download_release(released.id, dest)
                    download_s = time.perf_counter() - t0
                down.add(mb / download_s, mb / raw_get)
                down_rss.append((_rss_growth(sampler, before), before, sampler.peak))
                got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
                if got < size:
                    raise RuntimeError(f"the release download brought {got} bytes, not {size}")
                shutil.rmtree(dest)
    finally:
        gw.stop()
        sink.stop()
    label = f"{mb / 1024:g} GB" if mb >= 1024 else f"{mb:g} MB"
    return [
        up.result(
            f"upload: SubmitJob with a {label} bundle vs raw TLS (file to file)",
            unit="MB/s",
            goal=0.8,
            digits=1,
            bytes=size,
            cpu_s_per_gb={"ours": cpu.per_gb("upload", mb), "raw_tls": cpu.per_gb("raw_put", mb)},
            sha256_mb_s=sha256_mb_s,
            note=(
                "client and gateway share this machine's cores: the upload does two SHA-256 "
                "passes raw TLS does not (the gateway's content address, the client's check of "
                "what the gateway recorded); cpu_s_per_gb and sha256_mb_s show their cost"
            ),
        ),
        down.result(
            f"download: DownloadRelease of a {label} release vs raw TLS (file to file)",
            unit="MB/s",
            goal=0.8,
            digits=1,
            bytes=size,
            cpu_s_per_gb={"ours": cpu.per_gb("download", mb), "raw_tls": cpu.per_gb("raw_get", mb)},
        ),
        _rss_result(f"the {label} uploads", up_rss, size),
        _rss_result(f"the {label} downloads", down_rss, size),
    ]


def _rss_result(what: str, runs: list[tuple[int, int, int]], size: int) -> dict[str, Any]:
    """The gateway's resident growth during each transfer against its size: streaming keeps
    it a small fraction, and the same from one transfer to the next (constant memory). The
    figure is the largest growth of any run."""
    growths = [g for g, _, _ in runs]
    worst = max(growths)
    return {
        "name": f"gateway RSS growth during {what} vs their size (largest of the runs)",
        "value": round(worst / MB, 1),
        "limit": round(size / MB, 1),
        "unit": "MB",
        "ratio": round(worst / size, 4),
        "ratio_spread": [round(min(growths) / size, 4), round(worst / size, 4)],
        "goal": 0.05,
        "higher_is_better": False,
        "runs": len(runs),
        "growth_mb": [round(g / MB, 1) for g in growths],
        "rss_before_mb": [round(b / MB, 1) for _, b, _ in runs],
        "rss_peak_mb": [round(p / MB, 1) for _, _, p in runs],
    }


# -- launch ---------------------------------------------------------------------------------


def _launch_once(team: Client, owner: Client, name: str) -> float:
    job = team.submit(ONE_STEP_SPEC.format(name=name))
    if job.state != "PENDING_APPROVAL":
        raise RuntimeError(f"job {name} is {job.state}: {list(job.reasons)}")
    running = threading.Event()
    at: list[float] = []
    states: list[str] = []

    def watch() -> None:
        for e in team.watch(job.id, timeout=600):
            states.append(e.state)
            if e.state == "RUNNING" and not at:
                at.append(time.perf_counter())
                running.set()

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    time.sleep(0.2)  # the watch is open before the approval
    t0 = time.perf_counter()
    owner.decide(job.id, approve=True, reason="bench")
    if not running.wait(300):
        raise RuntimeError(f"job {name} never reached RUNNING: {states}")
    w.join(600)
    return at[0] - t0


def _bare_docker(image: str) -> float:
    import docker

    client = docker.from_env()
    try:
        t0 = time.perf_counter()
        c = client.containers.create(
            image,
            command=["python", "-c", "import time; time.sleep(30)"],
            labels={"org.sealroom.bench": "launch"},
        )
        c.start()
        took = time.perf_counter() - t0
        c.reload()
        if c.status != "running":
            raise RuntimeError(f"the bare container is {c.status}")
        c.remove(force=True)
        return took
    finally:
        client.close()


def bench_launch(tmp: Path, *, quick: bool) -> dict[str, Any]:
    from enclave.runtime import DockerRuntime
    from tests.integration._deployment import deploy, policy
    from trainers.synthetic import write_corpus

    runs = 2 if quick else 5
    image = DockerRuntime().resolve_image("sealroom-runtime:latest")
    d = deploy(tmp)
    paired = Paired(higher_is_better=False)
    try:
        with d.client("olivia") as owner, d.client("theo") as team:
            books = tmp / "books"
            write_corpus(books, documents=4, seed=7)
            owner.register_dataset("books", books)
            owner.put_policy("books", policy("books", memorization=False))
            _launch_once(team, owner, "warm")  # first use: imports, caches
            _bare_docker(image)
            for i in range(runs):
                bare = _bare_docker(image)
                paired.add(_launch_once(team, owner, f"launch-{i}"), bare)
    finally:
        d.stop()
    return paired.result(
        "launch: approved to RUNNING via gateway + Docker site vs bare docker create+start",
        unit="s",
        max_overhead=0.3,
    )


__all__ = ["bench_launch", "bench_rpc", "bench_transfers"]
_ = (os, Home)
