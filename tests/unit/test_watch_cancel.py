"""Watchers that go away do not keep the gateway's threads: a hostile (or flaky) client that
opens more WatchJob streams than the server has threads, on a job with nothing to report, and
drops each one, must leave the gateway answering everyone else.

Before the fix, a watch of a job waiting for its owner looped inside the gateway until the job's
next event, never back in the handler where the stream's cancellation is seen: each dropped
watch held one of the server's threads, and SERVER_THREADS of them stopped every other call.
The real gateway server over mTLS, with a fake local site.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sealroom.v1 import gateway_pb2 as gpb
from sealroom.v1 import gateway_pb2_grpc as gpb_grpc

from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from enclave.link import channel
from gateway._servicer import MAX_WATCHES
from gateway.client import Client
from gateway.identity import CertificateAuthority
from gateway.server import SERVER_THREADS, Running
from tests.bench._fast import FAST_SPEC
from tests.integration._deployment import PEOPLE, policy


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Running, dict[str, IdentityFiles]]]:
    from gateway.server import build

    home = tmp_path / "home"
    ca = CertificateAuthority.init(home / "ca")
    running = build(home, site=FakeSite(tmp_path / "site"), address="localhost:0")
    ids = {
        name: ca.issue(name, role=PEOPLE[name][0], team=PEOPLE[name][1], out_dir=home / "ids")
        for name in ("theo", "olivia")
    }
    try:
        yield running, ids
    finally:
        running.stop(grace=0)


def _waiting_job(address: str, ids: dict[str, IdentityFiles], tmp: Path) -> str:
    """A job that will report nothing: it waits for its owner's approval."""
    archive = tmp / "books.tar"
    with tarfile.open(archive, mode="w") as tar:
        data = b"a small protected text\n" * 64
        info = tarfile.TarInfo("doc-0.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with Client(address, ids["olivia"]) as owner, Client(address, ids["theo"]) as team:
        owner.register_dataset("books", archive)
        owner.put_policy("books", policy("books", mode="manual", memorization=False))
        job = team.submit(FAST_SPEC.format(name="quiet", dataset="books"))
        assert job.state == "PENDING_APPROVAL", job.reasons
        return job.id


def test_dropped_watches_free_their_threads(
    gateway: tuple[Running, dict[str, IdentityFiles]], tmp_path: Path
) -> None:
    running, ids = gateway
    address = f"localhost:{running.port}"
    job_id = _waiting_job(address, ids, tmp_path)
    with channel(address, ids["theo"]) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        streams = []
        for _ in range(SERVER_THREADS + 16):
            call = stub.WatchJob(gpb.WatchJobRequest(job_id=job_id))
            streams.append(call)
        time.sleep(1.0)  # every stream reaches its handler (or waits for a thread)
        for call in streams:
            call.cancel()
    # Every other caller is answered again once the dropped watches have noticed (a poll).
    deadline = time.monotonic() + 20
    with Client(address, ids["theo"], timeout_s=5) as team:
        while True:
            try:
                assert team.job(job_id).state == "PENDING_APPROVAL"
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        # A new watch is served at once: its first event (the job's state so far) arrives.
        with channel(address, ids["theo"]) as ch:
            call = gpb_grpc.GatewayStub(ch).WatchJob(gpb.WatchJobRequest(job_id=job_id), timeout=5)
            assert next(call).state
            call.cancel()


def test_watches_held_open_cannot_take_every_thread(
    gateway: tuple[Running, dict[str, IdentityFiles]], tmp_path: Path
) -> None:
    """Watches that stay open (a flood of them, all reading) are capped below the server's
    threads: past the cap a new watch is refused with RESOURCE_EXHAUSTED naming it, and every
    other call is still answered; once they close, watching works again."""
    import grpc

    running, ids = gateway
    address = f"localhost:{running.port}"
    job_id = _waiting_job(address, ids, tmp_path)
    cap = MAX_WATCHES
    with channel(address, ids["theo"]) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        held = [stub.WatchJob(gpb.WatchJobRequest(job_id=job_id)) for _ in range(cap)]
        for call in held:
            assert next(call).state  # each one is being served, and stays open
        refused = stub.WatchJob(gpb.WatchJobRequest(job_id=job_id), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            next(refused)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{cap} job watches are open" in (e.value.details() or "")
        with Client(address, ids["olivia"], timeout_s=5) as owner:
            assert owner.job(job_id).state == "PENDING_APPROVAL"  # answered at once
        for call in held:
            call.cancel()
    deadline = time.monotonic() + 10
    with channel(address, ids["theo"]) as ch:
        while True:
            call = gpb_grpc.GatewayStub(ch).WatchJob(gpb.WatchJobRequest(job_id=job_id), timeout=5)
            try:
                assert next(call).state
                call.cancel()
                break
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the closed watches were never released"
                time.sleep(0.2)
