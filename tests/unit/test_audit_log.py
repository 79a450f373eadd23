"""The audit log as a store: durable appends, queries, proofs, verification of the database."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import (
    AuditEvent,
    AuditLog,
    RecordError,
    verify_consistency,
    verify_export,
    verify_inclusion,
)
from policies.errors import AuditLogError, InvalidInput

KEY = ed25519.Ed25519PrivateKey.generate()


def ev(i: int, **kw: object) -> AuditEvent:
    base: dict[str, object] = {"principal": "theo", "role": "model-team",
                               "action": "rpc.GetJob", "outcome": "allowed",
                               "job_id": f"job-{i % 4}", "details": {"i": i}}
    base.update(kw)
    return AuditEvent(**base)  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    yield lg
    lg.close()


def test_appends_are_numbered_and_survive_a_reopen(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    recs = [lg.append(ev(i)) for i in range(5)]
    assert [r.seq for r in recs] == [0, 1, 2, 3, 4]
    root = lg.root()
    lg.close()
    again = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    assert again.size() == 5 and again.root() == root
    assert again.append(ev(5)).seq == 5
    assert again.verify().size == 6
    again.close()


def test_concurrent_appends_lose_nothing_and_share_commits(log: AuditLog) -> None:
    def work(t: int) -> None:
        for i in range(200):
            log.append(ev(i, principal=f"t{t}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.size() == 1600
    seqs = [r.seq for r in log.query(limit=10_000)]
    assert seqs == list(range(1600))
    for t in range(8):
        assert len(log.query(principal=f"t{t}", limit=10_000)) == 200
    assert log.verify().size == 1600


def test_queries_filter_by_every_field(log: AuditLog) -> None:
    log.append(ev(0, action="data.read", dataset="books@v1", file="a.txt", job_id="job-x"))
    log.append(ev(1, action="data.read", dataset="books@v2", file="b.txt", job_id="job-y"))
    log.append(ev(2, action="rpc.PutPolicy", outcome="denied", principal="mallory"))
    log.append(ev(3, action="data.read", dataset="bookshelf@v1", file="a.txt"))
    assert [r.event.file for r in log.query(dataset="books")] == ["a.txt", "b.txt"]
    assert [r.event.job_id for r in log.query(dataset="books@v2")] == ["job-y"]
    assert len(log.query(file="a.txt")) == 2
    assert [r.event.principal for r in log.query(outcome="denied")] == ["mallory"]
    assert len(log.query(action="data.*")) == 3
    assert len(log.query(action="rpc.PutPolicy", role="model-team")) == 1
    first = log.query()[0].time
    assert len(log.query(since=first)) == 4 and len(log.query(until=first)) == 1
    with pytest.raises(InvalidInput, match="RFC 3339"):
        log.query(since="yesterday")


def test_proofs_from_the_log_verify_against_its_checkpoints(log: AuditLog) -> None:
    for i in range(9):
        log.append(ev(i))
    old = log.checkpoint()
    for i in range(9, 30):
        log.append(ev(i))
    new = log.checkpoint()
    rec = log.record(4)
    verify_inclusion(index=4, size=new.size, leaf=rec.leaf_hash,
                     proof=log.inclusion_proof(4, new.size), expected_root=new.root)
    verify_consistency(old_size=old.size, new_size=new.size, old_root=old.root,
                       new_root=new.root, proof=log.consistency_proof(old.size, new.size))
    with pytest.raises(InvalidInput):
        log.consistency_proof(5, 99)


def test_an_export_extends_an_earlier_checkpoint(log: AuditLog, tmp_path: Path) -> None:
    for i in range(5):
        log.append(ev(i))
    earlier = log.checkpoint()
    for i in range(5, 12):
        log.append(ev(i))
    log.export(tmp_path / "x.jsonl")
    assert verify_export(tmp_path / "x.jsonl", public_key=KEY.public_key(),
                         previous=earlier).size == 12
    forged = KEY.sign(b"x")
    from gateway.audit import SignedCheckpoint

    other = SignedCheckpoint(earlier.size, b"\x01" * 32, earlier.time, forged)
    with pytest.raises(AuditLogError):
        verify_export(tmp_path / "x.jsonl", public_key=KEY.public_key(), previous=other)


def test_editing_the_database_is_named_by_verify(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(10):
        lg.append(ev(i))
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("UPDATE records SET principal='nobody' WHERE seq=6")
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    with pytest.raises(RecordError, match="record 6: its query columns differ") as e:
        ro.verify()
    assert e.value.seq == 6
    ro.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("UPDATE records SET principal='theo' WHERE seq=6")
        db.execute("DELETE FROM records WHERE seq=3")
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    with pytest.raises(RecordError, match="record 3"):
        ro.verify()
    ro.close()


def test_bad_events_are_refused_and_a_closed_log_records_nothing(log: AuditLog) -> None:
    with pytest.raises(InvalidInput, match="principal"):
        AuditEvent(principal="", role="r", action="a", outcome="o")
    with pytest.raises(InvalidInput, match="details must be JSON"):
        AuditEvent(principal="p", role="r", action="a", outcome="o", details={"x": object()})
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.append(ev(0))
