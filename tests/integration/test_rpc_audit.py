"""Every RPC leaves exactly one audit record, whatever happens inside it.

The real gateway server over mTLS on ``localhost:0`` with a stub site (no Docker): each test
makes one kind of call (unary, client-streaming, server-streaming) go one way (an answer, a
domain error, an unexpected exception injected into the :class:`gateway.core.Gateway` method
the servicer calls, a refused role, a certificate with no valid role, a client cancelling
mid-stream, an audit log that cannot append) and counts the ``rpc.*`` records it left. An
unexpected exception's text never reaches the caller nor the record: only its type name.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sealroom.v1 import gateway_pb2 as pb
from sealroom.v1 import gateway_pb2_grpc as pb_grpc

from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from gateway._views import JobEvent
from gateway.identity import CertificateAuthority
from policies.errors import NotFound
from policies.identity import Role
from policies.lifecycle import JobState

SECRET = "row 17 of the patients table: alice, 1970-01-01"
"""The text of every injected exception: it must reach neither the caller nor the log."""


class _Janitor(enum.StrEnum):
    JANITOR = "janitor"  # a role no deployment knows


class Server:
    def __init__(self, running: Any, ids: dict[str, IdentityFiles]) -> None:
        self.running = running
        self.gateway = running.gateway
        self.ids = ids
        self.address = f"localhost:{running.port}"

    def stub(self, who: str) -> tuple[grpc.Channel, pb_grpc.GatewayStub]:
        cert, key, ca = self.ids[who].read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        channel = grpc.secure_channel(self.address, creds)
        return channel, pb_grpc.GatewayStub(channel)

    def records(self, action: str) -> list[Any]:
        return list(self.gateway.audit.query(action=action, limit=100))

    def settled(self, action: str, *, wait_s: float = 10.0) -> list[Any]:
        """The action's records once at least one is there (a cancelled stream's record is
        written by gRPC's callback thread), and a moment more for any duplicate to show."""
        deadline = time.monotonic() + wait_s
        while not self.records(action) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        return self.records(action)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    from gateway.server import build

    home = tmp_path / "home"
    ca = CertificateAuthority.init(home / "ca")
    out = home / "identities"
    ids = {
        "theo": ca.issue("theo", role=Role.MODEL_TEAM, team="model-team", out_dir=out),
        "olivia": ca.issue("olivia", role=Role.DATA_OWNER, team="library", out_dir=out),
        "janitor": ca.issue("jan", role=_Janitor.JANITOR, out_dir=out),  # type: ignore[arg-type]
        "claimer": ca.issue("eve", role=Role.UNAUTHENTICATED, out_dir=out),
    }
    running = build(home, site=FakeSite(tmp_path / "site"), address="localhost:0")
    try:
        yield Server(running, ids)
    finally:
        running.stop(grace=0)


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(SECRET)


def _one_error(server: Server, action: str, err: grpc.RpcError) -> None:
    """The caller got INTERNAL without the text; the log holds one ``error`` record naming
    the exception's type only."""
    assert err.code() is grpc.StatusCode.INTERNAL
    assert SECRET not in (err.details() or "")
    assert "RuntimeError" not in (err.details() or "")
    (rec,) = server.settled(action)
    assert (rec.event.principal, rec.event.outcome) == ("theo", "error")
    assert dict(rec.event.details) == {"error": "RuntimeError"}
    assert SECRET not in json.dumps(dict(rec.event.details))


# -- unexpected exceptions, one kind of call each ----------------------------------------------


def test_an_unexpected_exception_in_a_unary_call_is_audited_once(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server.gateway, "datasets", _boom)
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10)
    _one_error(server, "rpc.ListDatasets", err.value)
    assert "RuntimeError" in caplog.text and SECRET not in caplog.text


def test_an_unexpected_exception_in_a_client_stream_is_audited_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.gateway, "submit", _boom)
    header = pb.SubmitJobChunk(header=pb.SubmitJobHeader(spec="name: x\n"))
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.SubmitJob(iter([header]), timeout=10)
    _one_error(server, "rpc.SubmitJob", err.value)


def test_an_unexpected_exception_before_a_server_stream_is_audited_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.gateway, "logs", _boom)
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        list(stub.GetJobLogs(pb.GetJobLogsRequest(job_id="job-1"), timeout=10))
    _one_error(server, "rpc.GetJobLogs", err.value)


def test_an_unexpected_exception_mid_stream_is_audited_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def watch(**kw: Any) -> Iterator[JobEvent]:
        yield JobEvent("job-1", JobState.RUNNING)
        raise RuntimeError(SECRET)

    monkeypatch.setattr(server.gateway, "watch", watch)
    channel, stub = server.stub("theo")
    got: list[pb.JobEvent] = []
    with channel, pytest.raises(grpc.RpcError) as err:
        for event in stub.WatchJob(pb.WatchJobRequest(job_id="job-1"), timeout=10):
            got.append(event)
    assert [e.state for e in got] == ["RUNNING"]
    _one_error(server, "rpc.WatchJob", err.value)


def test_a_domain_error_is_audited_once_with_its_status(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(**kw: Any) -> bytes:
        raise NotFound("no job job-9")

    monkeypatch.setattr(server.gateway, "logs", missing)
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        list(stub.GetJobLogs(pb.GetJobLogsRequest(job_id="job-9"), timeout=10))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    (rec,) = server.settled("rpc.GetJobLogs")
    assert rec.event.outcome == "error"
    assert dict(rec.event.details) == {"error": "NotFound", "message": "no job job-9"}


# -- answers, refusals, unauthenticated peers ---------------------------------------------------


def test_answers_are_audited_once(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.gateway, "logs", lambda **kw: b"x" * 10)
    channel, stub = server.stub("theo")
    with channel:
        assert stub.WhoAmI(pb.WhoAmIRequest(), timeout=10).role == "model-team"
        chunks = list(stub.GetJobLogs(pb.GetJobLogsRequest(job_id="job-1"), timeout=10))
    assert b"".join(c.data for c in chunks) == b"x" * 10
    for action in ("rpc.WhoAmI", "rpc.GetJobLogs"):
        (rec,) = server.settled(action)
        assert (rec.event.principal, rec.event.role, rec.event.outcome) == (
            "theo",
            "model-team",
            "allowed",
        )


def test_a_refused_role_is_audited_once(server: Server) -> None:
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.PutPolicy(pb.PutPolicyRequest(dataset="books", document="x"), timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    (rec,) = server.settled("rpc.PutPolicy")
    assert (rec.event.principal, rec.event.outcome) == ("theo", "denied")
    assert "may not call PutPolicy" in rec.event.details["reason"]


@pytest.mark.parametrize(("who", "role"), [("janitor", "janitor"), ("claimer", "unauthenticated")])
def test_a_certificate_without_a_valid_role_is_recorded_as_unauthenticated(
    server: Server, who: str, role: str
) -> None:
    """Client certificates are required (no certificate fails the TLS handshake itself), so
    the unauthenticated peer that reaches a handler holds one whose role is unknown, or one
    that claims ``unauthenticated``: no certificate grants that role."""
    channel, stub = server.stub(who)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert f"unknown role {role!r}" in (err.value.details() or "")
    (rec,) = server.settled("rpc.WhoAmI")
    assert (rec.event.principal, rec.event.role, rec.event.outcome) == (
        "unauthenticated",
        "unauthenticated",
        "denied",
    )


# -- a client that leaves, an audit log that cannot append --------------------------------------


def test_a_client_cancelling_mid_stream_leaves_one_cancelled_record(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    finished = threading.Event()

    def watch(**kw: Any) -> Iterator[JobEvent]:
        try:
            yield JobEvent("job-1", JobState.RUNNING)
            release.wait(10)  # a job that takes its time: the watcher leaves meanwhile
            yield JobEvent("job-1", JobState.CHECKING)
            yield JobEvent("job-1", JobState.RELEASED)
        finally:
            finished.set()

    monkeypatch.setattr(server.gateway, "watch", watch)
    channel, stub = server.stub("theo")
    with channel:
        call = stub.WatchJob(pb.WatchJobRequest(job_id="job-1"), timeout=10)
        assert next(call).state == "RUNNING"
        call.cancel()
        (rec,) = server.settled("rpc.WatchJob")
        assert (rec.event.principal, rec.event.outcome) == ("theo", "cancelled")
        release.set()  # the stream's generator now runs on, finds the client gone, and ends
        assert finished.wait(10)
    (again,) = server.settled("rpc.WatchJob")
    assert again.seq == rec.seq


def _failing_rpc_appends(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    record = server.gateway.record

    def record_or_fail(principal: Any, action: str, **kw: Any) -> int:
        if action.startswith("rpc."):
            raise OSError(SECRET)
        return int(record(principal, action, **kw))

    monkeypatch.setattr(server.gateway, "record", record_or_fail)


@pytest.mark.parametrize("rpc", ["WhoAmI", "GetJobLogs", "PutPolicy"])
def test_no_answer_without_its_record(
    server: Server, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """The audit append fails: the call fails closed, INTERNAL, never a success (nor even
    the refusal) without its record."""
    monkeypatch.setattr(server.gateway, "logs", lambda **kw: b"log")
    _failing_rpc_appends(server, monkeypatch)
    calls: dict[str, Callable[[pb_grpc.GatewayStub], object]] = {
        "WhoAmI": lambda s: s.WhoAmI(pb.WhoAmIRequest(), timeout=10),
        "GetJobLogs": lambda s: list(s.GetJobLogs(pb.GetJobLogsRequest(job_id="j"), timeout=10)),
        "PutPolicy": lambda s: s.PutPolicy(pb.PutPolicyRequest(dataset="b"), timeout=10),
    }
    channel, stub = server.stub("theo")
    with channel, pytest.raises(grpc.RpcError) as err:
        calls[rpc](stub)
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert SECRET not in (err.value.details() or "")
    assert server.records(f"rpc.{rpc}") == []
