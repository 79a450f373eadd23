"""The audit log as a store: durable appends, queries, proofs, verification of the database."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import (
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
    base: dict[str, object] = {
        "principal": "theo",
        "role": "model-team",
        "action": "rpc.GetJob",
        "outcome": "allowed",
        "job_id": f"job-{i % 4}",
        "details": {"i": i},
    }
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


# Queries as a compliance officer asks them, and the same answers worked out in Python.
QUERIES: list[dict[str, str]] = [
    {"job": "job-1"},
    {"dataset": "books"},
    {"dataset": "books@v2"},
    {"action": "data.*"},
    {"principal": "mallory"},
    {"action": "rpc.GetJob", "job": "job-2"},
    {"role": "model-team", "outcome": "denied"},
    {"dataset": "books", "file": "a.txt"},
    {},
]


def _matches(e: AuditEvent, q: dict[str, str]) -> bool:
    for key, want in q.items():
        if key == "dataset":
            name = (e.dataset or "").split("@v")[0]
            if (e.dataset != want) and ("@" in want or name != want):
                return False
        elif key == "action" and want.endswith("*"):
            if not e.action.startswith(want[:-1]):
                return False
        elif getattr(e, "job_id" if key == "job" else key) != want:
            return False
    return True


def _mixed(i: int) -> AuditEvent:
    return ev(
        i,
        action=("data.read", "rpc.GetJob", "job.submit")[i % 3],
        principal=("theo", "mallory", "ada")[i % 5 % 3],
        outcome=("allowed", "denied")[i % 7 == 0],
        dataset=(None, "books@v1", "books@v2", "bookshelf@v1")[i % 4],
        file=("a.txt", "b.txt")[i % 2] if i % 4 else None,
    )


def _answers(lg: AuditLog) -> list[list[int]]:
    return [[r.seq for r in lg.query(limit=10_000, **q)] for q in QUERIES]  # type: ignore[arg-type]


def _indexed(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM lookup").fetchone()[0])


def test_queries_find_the_same_records_indexed_or_not_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    monkeypatch.setattr(_log, "_INDEX_IDLE_S", 60.0)  # only close() indexes here
    events = [_mixed(i) for i in range(60)]
    expected = [[i for i, e in enumerate(events) if _matches(e, q)] for q in QUERIES]
    assert all(expected[:-1]) and expected[-1] == list(range(60))
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for e in events[:40]:
        lg.append(e)
    assert _indexed(tmp_path / "a.db") == 0  # every record in the unindexed tail
    assert _answers(lg) == [[i for i in x if i < 40] for x in expected]
    lg.close()
    assert _indexed(tmp_path / "a.db") == 40
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for e in events[40:]:
        lg.append(e)
    assert _indexed(tmp_path / "a.db") == 40  # 40 through the index, 20 in the tail
    assert _answers(lg) == expected
    lg.close()
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    assert _indexed(tmp_path / "a.db") == 60 and _answers(ro) == expected
    ro.close()


def test_the_tail_is_indexed_when_it_grows_long_or_the_log_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    monkeypatch.setattr(_log, "_INDEX_ROWS", 10)
    monkeypatch.setattr(_log, "_INDEX_IDLE_S", 60.0)
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(25):
        lg.append(ev(i))
    deadline = time.monotonic() + 10
    while _indexed(tmp_path / "a.db") < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _indexed(tmp_path / "a.db") == 20  # two tails of 10; 5 wait for more
    lg.close()
    monkeypatch.setattr(_log, "_INDEX_ROWS", 4096)
    monkeypatch.setattr(_log, "_INDEX_IDLE_S", 0.05)
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(25, 30):
        lg.append(ev(i))
    deadline = time.monotonic() + 10
    while _indexed(tmp_path / "a.db") < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _indexed(tmp_path / "a.db") == 30  # idle: indexed without a close
    lg.close()


@pytest.mark.parametrize(
    "q",
    [{"job": "job-1"}, {"dataset": "books"}, {"action": "data.*"}, {"principal": "mallory"}],
    ids=lambda q: next(iter(q)),
)
def test_queries_by_the_indexed_fields_read_the_index_not_the_whole_log(
    log: AuditLog, q: dict[str, str]
) -> None:
    for i in range(20):
        log.append(_mixed(i))
    statements: list[str] = []  # what the query ran, its values written in
    log._rdb.set_trace_callback(statements.append)
    log.query(**q)  # type: ignore[arg-type]
    log._rdb.set_trace_callback(None)
    (sql,) = statements
    with contextlib.closing(sqlite3.connect(log.path)) as db:
        plan = " / ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql))
    assert "SCAN" not in plan, plan
    assert "USING INDEX lookup_" in plan or "USING COVERING INDEX lookup_" in plan, plan


def test_names_match_as_written_not_as_patterns(log: AuditLog) -> None:
    for i, name in enumerate(["a*b@v1", "axb@v1", "a[b]@v1", "A*B@v1", "a?b@v2", "a_b@v1"]):
        log.append(ev(i, dataset=name, action=f"x{name}.read"))
    assert [r.event.dataset for r in log.query(dataset="a*b")] == ["a*b@v1"]
    assert [r.event.dataset for r in log.query(dataset="a[b]")] == ["a[b]@v1"]
    assert [r.event.dataset for r in log.query(dataset="a?b")] == ["a?b@v2"]
    assert [r.event.dataset for r in log.query(dataset="a_b")] == ["a_b@v1"]
    assert [r.event.dataset for r in log.query(action="xa*b*")] == ["a*b@v1"]
    assert len(log.query(action="xa*")) == 5 and len(log.query(action="x*")) == 6  # not xA*B


def test_a_changed_query_index_is_named_by_verify(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(10):
        lg.append(ev(i))
    lg.close()
    cases = [
        (
            "UPDATE lookup SET job_id='job-x' WHERE seq=6",
            "record 6: its entry in the query index differs",
        ),
        ("DELETE FROM lookup WHERE seq=3", "record 3: its entry in the query index is missing"),
        (
            "INSERT INTO lookup VALUES (10, 'theo', 'rpc.GetJob', 'job-1', NULL)",
            "record 10: the query index lists it",
        ),
    ]
    for change, named in cases:
        with sqlite3.connect(tmp_path / "a.db") as db:
            db.execute("SAVEPOINT s")
            db.execute(change)
            db.execute("RELEASE s")
        ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
        with pytest.raises(RecordError, match=named):
            ro.verify()
        ro.close()
        with sqlite3.connect(tmp_path / "a.db") as db:  # put it back for the next case
            db.execute("DELETE FROM lookup")
            db.execute(
                "INSERT INTO lookup SELECT seq, principal, action, job_id, dataset FROM records"
            )
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    assert ro.verify().size == 10
    ro.close()


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM lookup WHERE seq=3",
        "INSERT INTO lookup VALUES (10, 'theo', 'rpc.GetJob', 'job-1', NULL)",
        "DELETE FROM lookup WHERE seq>5",
    ],
    ids=["a gap", "a row ahead of the log", "behind the log"],
)
def test_a_query_index_that_does_not_fit_the_log_is_filled_again_on_open(
    tmp_path: Path, change: str
) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(10):
        lg.append(ev(i))
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute(change)
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    assert _indexed(tmp_path / "a.db") == 10
    assert lg.verify().size == 10 and len(lg.query(job="job-1")) == 3
    for i in range(10, 14):  # and later fills go on (a row ahead would block them)
        lg.append(ev(i))
    lg.close()
    assert _indexed(tmp_path / "a.db") == 14


def test_a_log_from_before_the_query_index_gets_one(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    events = [_mixed(i) for i in range(30)]
    for e in events:
        lg.append(e)
    expected = _answers(lg)
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:  # the schema as it was: indexes on records
        db.execute("DROP TABLE lookup")
        for col in ("job_id", "dataset", "action", "principal"):
            db.execute(f"CREATE INDEX records_{col.split('_')[0]} ON records({col})")
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    assert _answers(ro) == expected and ro.verify().size == 30
    ro.close()
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    assert _indexed(tmp_path / "a.db") == 30 and _answers(lg) == expected
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not any(n.startswith("records_") for n in names), names


def test_proofs_from_the_log_verify_against_its_checkpoints(log: AuditLog) -> None:
    for i in range(9):
        log.append(ev(i))
    old = log.checkpoint()
    for i in range(9, 30):
        log.append(ev(i))
    new = log.checkpoint()
    rec = log.record(4)
    verify_inclusion(
        index=4,
        size=new.size,
        leaf=rec.leaf_hash,
        proof=log.inclusion_proof(4, new.size),
        expected_root=new.root,
    )
    verify_consistency(
        old_size=old.size,
        new_size=new.size,
        old_root=old.root,
        new_root=new.root,
        proof=log.consistency_proof(old.size, new.size),
    )
    with pytest.raises(InvalidInput):
        log.consistency_proof(5, 99)


def test_an_export_extends_an_earlier_checkpoint(log: AuditLog, tmp_path: Path) -> None:
    for i in range(5):
        log.append(ev(i))
    earlier = log.checkpoint()
    for i in range(5, 12):
        log.append(ev(i))
    log.export(tmp_path / "x.jsonl")
    assert (
        verify_export(tmp_path / "x.jsonl", public_key=KEY.public_key(), previous=earlier).size
        == 12
    )
    forged = KEY.sign(b"x")
    from enclave.audit import SignedCheckpoint

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


def test_an_export_carries_every_checkpoint_and_the_proofs_between_them(
    log: AuditLog, tmp_path: Path
) -> None:
    import json

    sizes = []
    for i in range(20):
        log.append(ev(i))
        if i in (2, 6, 13):
            sizes.append(log.checkpoint().size)
    final = log.export(tmp_path / "x.jsonl")
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    cps = [json.loads(x) for x in lines if x.startswith('{"checkpoint"')]
    assert [c["checkpoint"]["size"] for c in cps] == [*sizes, 20] and final.size == 20
    assert [c["extends"]["size"] for c in cps] == [0, *sizes]
    assert all(len(c["extends"]["proof"]) > 0 for c in cps[1:])
    result = verify_export(tmp_path / "x.jsonl", public_key=KEY.public_key())
    assert (result.size, result.root, result.checkpoint) == (20, log.root(20), final)
    assert result.unvouched == 0


def test_a_read_only_verify_counts_records_no_checkpoint_covers_yet(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(5):
        lg.append(ev(i))
    lg.checkpoint()
    for i in range(5, 8):
        lg.append(ev(i))  # durable, not yet under a checkpoint (as after a crash)
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    try:
        r = ro.verify()
        assert (r.size, r.checkpoint.size if r.checkpoint else None, r.unvouched) == (8, 5, 3)
        with pytest.raises(AuditLogError, match="closed"):
            ro.append(ev(9))
    finally:
        ro.close()
        lg.close()


def test_a_failed_commit_records_nothing_and_the_log_goes_on(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON records WHEN NEW.principal='boom' "
            "BEGIN SELECT RAISE(ABORT, 'the disk is on fire'); END"
        )
    try:
        lg.append(ev(0))
        with pytest.raises(AuditLogError, match="cannot write the audit log: the disk is on"):
            lg.append(ev(1, principal="boom"))
        assert lg.size() == 1
        assert lg.append(ev(2)).seq == 1  # the failed event took no number
        assert lg.verify().size == 2
        assert [r.event.details["i"] for r in lg.query()] == [0, 2]
    finally:
        lg.close()


def test_a_damaged_database_is_not_grown(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(4):
        lg.append(ev(i))
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("DELETE FROM records WHERE seq=1")
    with pytest.raises(RecordError, match="record 1: the database's records are not numbered"):
        AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)


def test_the_database_verify_names_an_edited_leaf_and_a_broken_chain(tmp_path: Path) -> None:
    lg = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(6):
        lg.append(ev(i))
    lg.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        (leaf,) = db.execute("SELECT leaf FROM records WHERE seq=4").fetchone()
        db.execute(
            "UPDATE records SET leaf=? WHERE seq=4", (bytes(leaf).replace(b'"i":4', b'"i":5'),)
        )
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    with pytest.raises(RecordError, match="record 4: its content does not match"):
        ro.verify()
    ro.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("UPDATE records SET leaf=? WHERE seq=4", (leaf,))
        db.execute("UPDATE records SET chain=? WHERE seq=2", (b"\x07" * 32,))
    ro = AuditLog.open_readonly(tmp_path / "a.db", public_key=KEY.public_key())
    with pytest.raises(RecordError, match="record 2: the hash chain breaks"):
        ro.verify()
    ro.close()


def test_events_are_plain_copied_values(log: AuditLog) -> None:
    from enum import StrEnum

    class Role(StrEnum):
        OPERATOR = "operator"

    details: dict[object, object] = {"n": 1, "nested": {"k": [1, 2]}, 3: "three"}
    e = AuditEvent(principal="p", role=Role.OPERATOR, action="a", outcome="o", details=details)  # type: ignore[arg-type]
    details["n"] = 2
    details["nested"]["k"].append(3)  # type: ignore[index]
    assert type(e.role) is str and e.role == "operator"
    assert dict(e.details) == {"n": 1, "nested": {"k": [1, 2]}, "3": "three"}
    rec = log.append(e)
    assert log.record(rec.seq).event == e
    with pytest.raises(InvalidInput, match="job_id must be"):
        AuditEvent(principal="p", role="r", action="a", outcome="o", job_id=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="details must be JSON"):
        AuditEvent(principal="p", role="r", action="a", outcome="o", details={"x": float("nan")})


def test_the_takedown_report_names_accesses_reads_and_derived_releases(log: AuditLog) -> None:
    def e(**kw: object) -> AuditEvent:
        base: dict[str, object] = {
            "principal": "olivia",
            "role": "data-owner",
            "action": "dataset.register",
            "outcome": "ok",
        }
        base.update(kw)
        return AuditEvent(**base)  # type: ignore[arg-type]

    log.append(e(dataset="books@v1"))
    log.append(
        e(
            principal="site",
            role="operator",
            action="data.read",
            job_id="j1",
            dataset="books@v1",
            file="b.txt",
        )
    )
    log.append(
        e(
            principal="site",
            role="operator",
            action="data.read",
            job_id="j1",
            dataset="books@v1",
            file="a.txt",
        )
    )
    log.append(
        e(
            principal="site",
            role="operator",
            action="data.read",
            job_id="j2",
            dataset="bookshelf@v1",
            file="z.txt",
        )
    )
    log.append(
        e(
            principal="gateway",
            role="operator",
            action="release.sign",
            job_id="j1",
            details={"manifest_sha256": "ab" * 32},
        )
    )
    log.append(
        e(
            principal="gateway",
            role="operator",
            action="release.sign",
            job_id="j2",
            details={"manifest_sha256": "cd" * 32},
        )
    )
    # j3 was submitted against books@v2 and approved, read nothing recorded, and released:
    # it derives from books all the same, and who downloaded it must be found.
    log.append(
        e(
            principal="theo",
            role="model-team",
            action="job.submit",
            job_id="j3",
            details={"datasets": ["books@v2"]},
        )
    )
    log.append(
        e(principal="olivia", action="job.approve", job_id="j3", details={"datasets": ["books@v2"]})
    )
    log.append(
        e(
            principal="theo",
            role="model-team",
            action="job.submit",
            job_id="j4",
            details={"datasets": ["bookshelf@v1"]},
        )
    )
    log.append(
        e(
            principal="gateway",
            role="operator",
            action="release.sign",
            job_id="j3",
            details={"manifest_sha256": "ef" * 32},
        )
    )
    log.append(e(principal="theo", role="model-team", action="release.download", job_id="j3"))
    log.append(e(principal="theo", role="model-team", action="release.download", job_id="j2"))
    r = log.report("books")
    assert r.reads == {"j1": ("a.txt", "b.txt")}
    assert [(d.job_id, d.manifest_sha256) for d in r.releases] == [
        ("j1", "ab" * 32),
        ("j3", "ef" * 32),
    ]
    assert {(a.principal, a.action, a.count) for a in r.accesses} == {
        ("olivia", "dataset.register", 1),
        ("site", "data.read", 2),
        ("theo", "job.submit", 1),
        ("olivia", "job.approve", 1),
        ("theo", "release.download", 1),
    }
    assert [d.job_id for d in log.report("books@v1").releases] == ["j1"]
    with pytest.raises(InvalidInput, match="dataset"):
        log.report("")
