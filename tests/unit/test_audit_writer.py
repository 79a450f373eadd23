"""The audit writer: appenders of one batch share one gate, and the WAL is folded into the
database by a thread of its own, never inside an append's commit."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditEvent, AuditLog, AuditRecord
from policies.errors import AuditLogError

KEY = ed25519.Ed25519PrivateKey.generate()


def ev(i: int, **kw: object) -> AuditEvent:
    base: dict[str, object] = {
        "principal": "theo",
        "role": "model-team",
        "action": "rpc.GetJob",
        "outcome": "allowed",
        "job_id": f"job-{i % 7}",
        "details": {"i": i, "pad": "x" * 200},
    }
    base.update(kw)
    return AuditEvent(**base)  # type: ignore[arg-type]


def _append_from_threads(
    log: AuditLog, threads: int, per: int
) -> list[tuple[AuditEvent, AuditRecord]]:
    out: list[tuple[AuditEvent, AuditRecord]] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per):
            e = ev(t * per + i, principal=f"t{t}")
            rec = log.append(e)
            with lock:
                out.append((e, rec))

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_each_appender_gets_its_own_record_from_a_shared_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    monkeypatch.setattr(_log, "_MAX_BATCH", 5)  # batches fill up: new ones are opened
    sizes: list[int] = []
    commit = _log.AuditLog._commit

    def spy(self: AuditLog, batch: _log._Batch) -> None:
        sizes.append(len(batch.events))
        commit(self, batch)

    monkeypatch.setattr(_log.AuditLog, "_commit", spy)
    log = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    try:
        got = _append_from_threads(log, threads=24, per=25)
        assert sorted(rec.seq for _, rec in got) == list(range(600))
        for e, rec in got:  # the record handed back is the one stored for this event
            assert rec.event is e
            assert log.record(rec.seq) == AuditRecord(rec.seq, rec.time, e, rec.leaf_hash)
        assert max(sizes) <= 5 and sum(sizes) == 600
        assert any(s > 1 for s in sizes), "no two appends ever shared a commit"
        assert log.verify().size == 600
    finally:
        log.close()


def test_a_fault_in_the_writer_fails_the_waiters_and_every_later_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    log = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    try:
        log.append(ev(0))

        def broken(self: AuditLog, batch: _log._Batch) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(_log.AuditLog, "_commit", broken)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                log.append(ev(i))
            except AuditLogError as e:
                errors.append(e)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(1, 9)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in ts), "an appender was left waiting"
        assert len(errors) == 8 and all("writer failed" in str(e) for e in errors)
        monkeypatch.undo()  # the writer works again, but the log no longer trusts itself
        with pytest.raises(AuditLogError, match="restart the gateway"):
            log.append(ev(9))
        assert log.size() == 1
    finally:
        log.close()


def test_close_waits_for_every_append_already_made(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    got: list[int] = []
    refused: list[int] = []

    def work(t: int) -> None:
        for i in range(200):
            try:
                got.append(log.append(ev(t * 200 + i)).seq)
            except AuditLogError:
                refused.append(t)
                return

    ts = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    time.sleep(0.05)
    log.close()
    for t in ts:
        t.join()
    again = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    try:
        assert again.size() == len(got) and sorted(got) == list(range(len(got)))
        assert again.verify().size == len(got)
    finally:
        again.close()


def _db_pages(path: Path) -> int:
    """Pages of the database file itself (what checkpoints have copied out of the WAL)."""
    return os.path.getsize(path) // 4096


def test_the_writer_never_checkpoints_and_the_wal_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    monkeypatch.setattr(_log, "WAL_BYTES", 64 << 10)
    monkeypatch.setattr(_log, "_INDEX_IDLE_S", 60.0)
    path = tmp_path / "a.db"
    log = AuditLog(path, signing_key=KEY, checkpoint_interval_s=0)
    try:
        with log._wlock:
            assert log._wdb.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        before = _db_pages(path)
        _append_from_threads(log, threads=8, per=250)  # ~1 MB of records
        deadline = time.monotonic() + 30
        while _db_pages(path) < before + 128 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The records reached the database file while the log is open: checkpoints ran, on
        # the WAL thread (the writer's connection cannot run one).
        assert _db_pages(path) >= before + 128
        # And the WAL was written over from its start, not grown by every record.
        assert os.path.getsize(f"{path}-wal") < 1 << 20
        assert log.verify().size == 2000
    finally:
        log.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM records").fetchone() == (2000,)


def test_an_idle_log_folds_its_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enclave.audit import _log

    monkeypatch.setattr(_log, "_INDEX_IDLE_S", 0.05)
    path = tmp_path / "a.db"
    log = AuditLog(path, signing_key=KEY, checkpoint_interval_s=0)
    try:
        before = _db_pages(path)
        for i in range(50):  # far below WAL_BYTES: only idleness calls for a checkpoint
            log.append(ev(i))
        deadline = time.monotonic() + 30
        while _db_pages(path) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _db_pages(path) > before
    finally:
        log.close()


def test_the_writer_waits_for_a_batch_as_large_as_the_last_and_no_longer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave.audit import _log

    sizes: list[int] = []
    hold = threading.Event()
    commit = _log.AuditLog._commit

    def spy(self: AuditLog, batch: _log._Batch) -> None:
        sizes.append(len(batch.events))
        if len(sizes) == 1:
            hold.wait(30)  # the first commit holds the writer while three appends queue
        commit(self, batch)

    monkeypatch.setattr(_log.AuditLog, "_commit", spy)
    monkeypatch.setattr(_log, "_GATHER_MAX_S", 30.0)
    log = AuditLog(tmp_path / "a.db", signing_key=KEY, checkpoint_interval_s=0)

    def append_in_thread(i: int) -> threading.Thread:
        t = threading.Thread(target=log.append, args=(ev(i),))
        t.start()
        return t

    try:
        threads = [append_in_thread(0)]
        while not sizes:
            time.sleep(0.001)
        threads += [append_in_thread(i) for i in (1, 2, 3)]
        while len(log._open.events) < 3:
            time.sleep(0.001)
        hold.set()
        for t in threads:
            t.join(30)
        assert sizes == [1, 3]
        # The next batch is awaited until it holds three events, however slowly they come.
        log._commit_s = 30.0
        threads = [append_in_thread(4)]
        time.sleep(0.2)
        threads += [append_in_thread(i) for i in (5, 6)]
        for t in threads:
            t.join(30)
        assert sizes == [1, 3, 3]
        # But no longer than the last commit took: a lone append is not held for company.
        log._commit_s = 0.05
        log.append(ev(7))
        assert sizes == [1, 3, 3, 1]
        assert log.verify().size == 8
    finally:
        hold.set()
        log.close()
