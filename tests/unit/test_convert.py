"""The client's conversion layer: every domain value the servicer sends comes back equal from
the message, and the CLI's ``--json`` of it keeps the keys it printed from the messages."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from enclave.audit import AuditEvent, AuditRecord, DatasetReport, SignedCheckpoint
from enclave.audit._report import Access, DerivedRelease
from gateway import _convert as c
from gateway._views import JobEvent
from gateway.cli._common import to_json
from gateway.store import (
    ApprovalRecord,
    DatasetFileRecord,
    DatasetRecord,
    JobRecord,
    PinnedDataset,
    PolicyRecord,
)
from policies.errors import IntegrityError
from policies.identity import Principal, Role
from policies.lifecycle import JobState
from policies.review import CheckResult, ReviewReport, WeightsCapacity

JOB = JobRecord(
    id="job-1",
    name="ft",
    state=JobState.RELEASED,
    submitter="theo",
    team="model-team",
    spec='{"name": "ft"}',
    spec_sha256="a" * 64,
    bundle_sha256="b" * 64,
    datasets=(PinnedDataset("books", 2, "c" * 64),),
    policy_versions={"books": 3},
    reasons=("released",),
    image_id="sha256:d",
    metrics={"eval_loss": 1.25},
    release_id="e" * 64,
    created_at="2026-01-01T00:00:00.000+00:00",
    updated_at="2026-01-01T00:01:00.000+00:00",
    details=("exit 0",),
    channel_bits=12.5,
)
APPROVAL = ApprovalRecord("job-1", "olivia", "approve", "ok", "f" * 64, "2026-01-01T00:00:30")
DATASET = DatasetRecord(
    "books", 1, "olivia", "c" * 64, 10, (DatasetFileRecord("a.txt", 10, "0" * 64),), "d", "t"
)
POLICY = PolicyRecord("books", 2, "schema: x\n", "1" * 64, "olivia", "t")
EVENT = JobEvent("job-1", JobState.RUNNING, progress=(10, 100, 0.5), time="t")
RECORD = AuditRecord(
    seq=7,
    time="2026-01-01T00:00:00.000000Z",
    event=AuditEvent("carol", "compliance", "data.read", "ok", job_id="job-1", details={"n": 1}),
    leaf_hash=bytes(range(32)),
)
REVIEW = ReviewReport(
    job_id="job-1",
    release_id="e" * 64,
    capacity=WeightsCapacity(bits=160, elements=10, bits_per_element={"BF16": 16}, scrub_bits=0),
    checks=(CheckResult("books", "files", True, {"count": 3}),),
    reviewers=frozenset({"olivia", "otto"}),
    approved_by=frozenset({"otto"}),
)
REPORT = DatasetReport(
    dataset="books",
    accesses=(Access("theo", "model-team", "job.submit", "ok", 2, "t0", "t1"),),
    reads={"job-1": ("a.txt", "b.txt")},
    releases=(DerivedRelease("job-1", "e" * 64, "t2"),),
)
CHECKPOINT = SignedCheckpoint(size=8, root=bytes(32), time="t", signature=b"\x01" * 64)

CASES: list[tuple[str, Any]] = [
    ("principal", Principal("theo", Role.MODEL_TEAM, "model-team")),
    ("dataset", DATASET),
    ("policy", POLICY),
    ("event", EVENT),
    ("review", REVIEW),
    ("rotation", c.SiteKeyRotation("local", "k-1", 3)),
    ("audit_record", RECORD),
    ("checkpoint", CHECKPOINT),
    ("proof", c.AuditProof((bytes(32),), 8, leaf_hash=b"\x02" * 32, index=3)),
    ("report", REPORT),
]


@pytest.mark.parametrize(("kind", "value"), CASES, ids=[k for k, _ in CASES])
def test_a_value_comes_back_equal_from_its_message(kind: str, value: Any) -> None:
    msg = getattr(c, f"{kind}_message")(value)
    assert getattr(c, f"{kind}_value")(msg) == value


def test_a_job_comes_back_with_its_approvals_and_without_its_binding() -> None:
    bound = JobRecord(**{**vars(JOB), "binding": "9" * 64})
    got = c.job_value(c.job_message(bound, [APPROVAL]))
    assert got == c.JobView(**vars(JOB), approvals=(APPROVAL,))
    assert got.state is JobState.RELEASED and got.state == "RELEASED"


def _old_json(msg: Message) -> dict[str, Any]:
    """What the CLI printed before: proto3's JSON mapping of the message."""
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


@pytest.mark.parametrize(
    ("value", "msg"),
    [
        (c.job_value(c.job_message(JOB, [APPROVAL])), c.job_message(JOB, [APPROVAL])),
        (DATASET, c.dataset_message(DATASET)),
        (POLICY, c.policy_message(POLICY)),
        (EVENT, c.event_message(EVENT)),
        (RECORD, c.audit_record_message(RECORD)),
        (REPORT, c.report_message(REPORT)),
        (
            c.SiteKeyRotation("local", "k-1", 3),
            c.rotation_message(c.SiteKeyRotation("local", "k-1", 3)),
        ),
    ],
    ids=["job", "dataset", "policy", "event", "audit_record", "report", "rotation"],
)
def test_the_json_of_a_value_keeps_the_keys_the_cli_printed(value: Any, msg: Message) -> None:
    _holds(_old_json(msg), to_json(value))


def _holds(old: Any, new: Any, at: str = "") -> None:
    """Every key the old JSON had is in the new one, with the same value (a number where the
    old mapping wrote a 64-bit integer as text; extra keys allowed)."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and set(old) <= set(new), (at, old, new)
        for k, v in old.items():
            _holds(v, new[k], f"{at}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), (at, old, new)
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _holds(a, b, f"{at}[{i}]")
    elif isinstance(old, str) and isinstance(new, int):
        assert str(new) == old, at
    else:
        assert new == old, at


def test_the_json_of_a_progress_point_names_its_parts() -> None:
    assert to_json(EVENT)["progress"] == {"step": 10, "total": 100, "loss": 0.5}
    assert "progress" not in to_json(JobEvent("job-1", JobState.QUEUED))


def test_a_malformed_response_is_an_integrity_error() -> None:
    from gateway.client import _value

    with pytest.raises(IntegrityError, match="malformed Job"):
        _value(c.job_value, c.job_message(JOB, []).__class__(id="j", state="NO-SUCH-STATE"))
    with pytest.raises(IntegrityError, match="malformed AuditRecord"):
        bad = c.audit_record_message(RECORD)
        bad.leaf_hash = "not hex"
        _value(c.audit_record_value, bad)
