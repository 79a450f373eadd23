"""kill -9 of a process appending to the audit log under load, at many random points.

A child process appends from 8 threads and prints ``<seq> <event id>`` on stdout only after
``append`` has returned (the acknowledgement a caller would get). The parent kills it with
SIGKILL at a random moment, reopens the log and checks: every acknowledged event is there at
its sequence number, no event is there twice, and the whole log verifies. The same database is
reused across kills, so later runs append after a crash, as a restarted gateway would.

The second form folds the WAL into the database every 32 KiB instead of every 4 MiB, from 16
threads with larger events, so that kills land during checkpoints (the PASSIVE one beside the
commits, the one with the writer held off) and during the writer's restart of the WAL from its
start.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditLog

CHILD = textwrap.dedent("""
    import sys, threading, uuid
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from enclave.audit import AuditEvent, AuditLog, _log
    wal_bytes, threads, pad = (int(a) for a in sys.argv[3:6])
    if wal_bytes:
        _log.WAL_BYTES = wal_bytes
    key = serialization.load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    log = AuditLog(Path(sys.argv[1]), signing_key=key, checkpoint_interval_s=0.05)
    out = threading.Lock()
    print("ready", flush=True)
    def work():
        while True:
            eid = uuid.uuid4().hex
            rec = log.append(AuditEvent(principal="load", role="operator", action="rpc.Load",
                                        outcome="allowed", job_id=eid[:4],
                                        details={"id": eid, "pad": "x" * pad}))
            with out:
                sys.stdout.write(f"{rec.seq} {eid}\\n")
                sys.stdout.flush()
    for _ in range(threads):
        threading.Thread(target=work, daemon=True).start()
    threading.Event().wait()
""")


def _kill_points(
    n: int,
    tmp_path: Path,
    *,
    seed: int = 1234,
    pause: tuple[float, float] = (0.02, 0.4),
    wal_bytes: int = 0,
    threads: int = 8,
    pad: int = 0,
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    db = tmp_path / "audit.db"
    rng = random.Random(seed)
    acked: dict[str, int] = {}
    for _ in range(n):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(key_file)]
            + [str(v) for v in (wal_bytes, threads, pad)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(*pause))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by the kill was never an acknowledgement
                acked[parts[1]] = int(parts[0])
    log = AuditLog(db, signing_key=key, checkpoint_interval_s=0)
    try:
        result = log.verify()
        seen: dict[str, int] = {}
        for rec in log.query(limit=10**9):
            eid = rec.event.details["id"]
            assert eid not in seen, f"event {eid} recorded twice ({seen[eid]}, {rec.seq})"
            seen[eid] = rec.seq
        lost = {e: s for e, s in acked.items() if seen.get(e) != s}
        assert not lost, f"{len(lost)} acknowledged events lost or moved, e.g. {next(iter(lost))}"
        assert result.size == len(seen) >= len(acked) > 0
        if wal_bytes:  # the kills did land among checkpoints: records reached the database
            assert os.path.getsize(db) > 1 << 20
    finally:
        log.close()
    print(json.dumps({"kills": n, "acknowledged": len(acked), "records": len(seen)}))


def test_kill_9_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    _kill_points(20, tmp_path)


@pytest.mark.slow
def test_kill_9_at_many_more_points(tmp_path: Path) -> None:
    _kill_points(int(os.environ.get("SEALROOM_KILL_POINTS", "100")), tmp_path)


def test_kill_9_while_the_wal_is_folded_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    _kill_points(
        12, tmp_path, seed=4321, pause=(0.05, 0.5), wal_bytes=32 << 10, threads=16, pad=300
    )
