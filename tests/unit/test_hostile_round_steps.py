"""A hostile gateway's round steps at a site (enclave.federated._serve): whatever it sends, the
site answers with an error that names the problem, calls nothing it should not, and writes
nothing outside its own state: a step id that is a path, a payload cut short or not JSON, an
unknown step, a start that is not the one its digest names, an order of another job, and fields
of the wrong shape. A ``forget`` is never answered."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sealroom.v1 import site_pb2 as pb

from enclave.contract import RunOrder
from enclave.federated import _wire as wire
from enclave.federated._serve import RoundServer
from enclave.linkwire import order_json
from policies.spec import parse_spec

SPEC = parse_spec("""\
name: fed
datasets: [books-a, books-b]
base_model: tiny-lm
trainer: causal-lm-lora
purpose: testing
federation: {rounds: 2, local_steps: 3}
""")
GOOD_ID = "0123456789abcdef0123456789abcdef"


class _Stub:
    def __init__(self) -> None:
        self.answers: list[pb.RoundStepHeader] = []

    def AnswerRound(self, chunks: Any, timeout: float) -> pb.AnswerRoundResponse:
        parts = list(chunks)
        self.answers.append(parts[0].header)
        return pb.AnswerRoundResponse()


class _Untouchable:
    """A site's rounds that no malformed step may reach."""

    name = "site-a"
    forgotten: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} was called for a malformed step")

    def forget(self, job: str, round_no: int) -> None:
        self.forgotten.append((job, round_no))


def _order(job_id: str) -> str:
    return order_json(RunOrder(
        job_id=job_id, spec=SPEC, spec_sha256=SPEC.digest(), bundle=None, bundle_sha256="",
        datasets=(("books-a", 1), ("books-b", 1)), policy_versions={}, policy_documents={},
        approval_binding="", approvals=(), audit_root="0" * 64,
    ))  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> tuple[RoundServer, _Stub]:
    stub = _Stub()
    server = RoundServer(
        stub,  # type: ignore[arg-type]
        _Untouchable(),  # type: ignore[arg-type]
        state=tmp_path / "state",
        record=lambda job, r: None,
        stop=threading.Event(),
    )
    return server, stub


@pytest.mark.parametrize(
    ("step_id", "kind", "payload", "why", "error_kind"),
    [
        ("../../etc/x", "join", wire.pack({}), "malformed step id", "InvalidInput"),
        (GOOD_ID, "join", b"\x00" * 4, "too short", "InvalidInput"),
        (GOOD_ID, "join", b"\x00" * 7 + b"\xff" + b"{}", "runs past its end", "InvalidInput"),
        (GOOD_ID, "join", b"\x00" * 7 + b"\x02" + b"[]", "not a JSON object", "InvalidInput"),
        (GOOD_ID, "rm -rf", wire.pack({}), "unknown", "InvalidInput"),
        (GOOD_ID, "join", wire.pack({"order": 7}), "no order", "InvalidInput"),
        (GOOD_ID, "join", wire.pack({"order": _order("job-2")}), "another job's", "InvalidInput"),
        (
            GOOD_ID,
            "join",
            wire.pack({"order": _order("job-1"), "start_sha256": "0" * 64}, b"not the start"),
            "does not match its digest",
            "IntegrityError",
        ),
        (GOOD_ID, "share", wire.pack({"adverts": [1, 2]}), "no adverts", "InvalidInput"),
        (GOOD_ID, "mask", wire.pack({"inbox": {"site-b": "%%%"}}), "not base64", "InvalidInput"),
        (GOOD_ID, "confirm", wire.pack({"survivors": "site-a"}), "not a list", "InvalidInput"),
        (GOOD_ID, "reveal", wire.pack({"survivors": []}), "no confirmations", "InvalidInput"),
    ],
)
def test_a_malformed_step_is_refused_naming_why_and_touches_nothing(
    served: tuple[RoundServer, _Stub],
    tmp_path: Path,
    step_id: str,
    kind: str,
    payload: bytes,
    why: str,
    error_kind: str,
) -> None:
    server, stub = served
    server._take(pb.RoundStepHeader(step_id=step_id, kind=kind, job_id="job-1", round=0), payload)
    (answer,) = stub.answers
    assert why in answer.error and answer.error_kind == error_kind
    assert answer.step_id == step_id
    state = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert state == [Path("state"), Path("state/round-starts")]  # nothing written, nothing left


def test_a_forget_is_done_and_never_answered(served: tuple[RoundServer, _Stub]) -> None:
    server, stub = served
    server._take(
        pb.RoundStepHeader(step_id=GOOD_ID, kind="forget", job_id="job-1", round=1), wire.pack({})
    )
    assert stub.answers == [] and ("job-1", 1) in _Untouchable.forgotten
