"""Properties of the log (hypothesis): growth keeps old proofs valid; any changed byte fails."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import AuditEvent, AuditLog, verify_consistency, verify_export, verify_inclusion
from gateway.audit import _merkle as m
from policies.errors import AuditLogError

KEY = ed25519.Ed25519PrivateKey.generate()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=64), st.data())
def test_appends_keep_every_earlier_proof_valid(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [m.leaf_hash(x) for x in leaves]
    old = data.draw(st.integers(1, len(hashes)), label="old size")
    index = data.draw(st.integers(0, old - 1), label="index")
    old_proof = m.inclusion_proof(index, hashes[:old])
    old_root = m.root(hashes[:old])
    # The old proof still proves the leaf against the old root, after any number of appends,
    # and the new tree provably extends the old one.
    verify_inclusion(index=index, size=old, leaf=hashes[index], proof=old_proof,
                     expected_root=old_root)
    verify_consistency(old_size=old, new_size=len(hashes), old_root=old_root,
                       new_root=m.root(hashes), proof=m.consistency_proof(old, hashes))
    verify_inclusion(index=index, size=len(hashes), leaf=hashes[index],
                     proof=m.inclusion_proof(index, hashes), expected_root=m.root(hashes))


_EXPORT: list[bytes] = []


def _export() -> bytes:
    if not _EXPORT:
        with tempfile.TemporaryDirectory() as tmp:
            log = AuditLog(Path(tmp) / "a.db", signing_key=KEY, checkpoint_interval_s=0)
            for i in range(12):
                log.append(AuditEvent(principal=f"p{i}", role="data-owner", action="data.read",
                                      outcome="ok", dataset="books@v1", file=f"f{i}.txt",
                                      details={"n": i, "ok": True}))
            log.export(Path(tmp) / "x.jsonl")
            log.close()
            _EXPORT.append((Path(tmp) / "x.jsonl").read_bytes())
    return _EXPORT[0]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_changed_byte_fails_verification(data: st.DataObject) -> None:
    raw = bytearray(_export())
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
    raw[pos] = new
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.jsonl"
        p.write_bytes(bytes(raw))
        try:
            verify_export(p, public_key=KEY.public_key())
        except (AuditLogError, UnicodeDecodeError):
            return
        # A change that leaves the export valid must leave its meaning unchanged: JSON
        # whitespace or key order outside the signed leaves. Prove it is the same log.
        before = [json.loads(x) for x in _export().splitlines()]
        after = [json.loads(x) for x in bytes(raw).splitlines()]
        assert before == after, f"byte {pos} changed to {new} and the export still verifies"
