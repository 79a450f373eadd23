"""kill -9 of a process appending to the audit log while its WAL thread checkpoints.

As ``test_audit_crash``, with the WAL folded into the database every 32 KiB instead of every
4 MiB, so that kills land during checkpoints (the PASSIVE one beside the commits, the one with
the writer held off) and during the writer's restart of the WAL from its start: every
acknowledged event must be there at its sequence number, none twice, and the log must verify.
"""

from __future__ import annotations

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

from gateway.audit import AuditLog

CHILD = textwrap.dedent("""
    import sys, threading, uuid
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from gateway.audit import AuditEvent, AuditLog, _log
    _log.WAL_BYTES = 32 << 10
    key = serialization.load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    log = AuditLog(Path(sys.argv[1]), signing_key=key, checkpoint_interval_s=0.05)
    out = threading.Lock()
    print("ready", flush=True)
    def work():
        while True:
            eid = uuid.uuid4().hex
            rec = log.append(AuditEvent(principal="load", role="operator", action="rpc.Load",
                                        outcome="allowed", job_id=eid[:4],
                                        details={"id": eid, "pad": "x" * 300}))
            with out:
                sys.stdout.write(f"{rec.seq} {eid}\\n")
                sys.stdout.flush()
    for _ in range(16):
        threading.Thread(target=work, daemon=True).start()
    threading.Event().wait()
""")


def _kill_points(n: int, tmp_path: Path) -> None:
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
    rng = random.Random(4321)
    acked: dict[str, int] = {}
    for _ in range(n):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(key_file)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
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
        # The kills did land among checkpoints: records reached the database file itself.
        assert os.path.getsize(db) > 1 << 20
    finally:
        log.close()


def test_kill_9_while_the_wal_is_folded_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    _kill_points(12, tmp_path)


@pytest.mark.slow
def test_kill_9_while_the_wal_is_folded_at_many_more_points(tmp_path: Path) -> None:
    _kill_points(int(os.environ.get("SEALROOM_KILL_POINTS", "40")), tmp_path)
