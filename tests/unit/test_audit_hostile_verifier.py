"""A hostile verifier's inputs, in the spirit of transparency-dev/merkle's negative vectors.

Every forged, bit-flipped, truncated, reordered or spliced proof and every edited, removed,
inserted, moved or re-hashed record is rejected with a named error; where a record is at fault
the error names its sequence number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import (
    AuditEvent,
    AuditLog,
    CheckpointError,
    ProofError,
    RecordError,
    verify_consistency,
    verify_export,
    verify_inclusion,
)
from enclave.audit import _merkle as m
from enclave.audit._log import _merkle as lm  # the same module the log uses

KEY = ed25519.Ed25519PrivateKey.generate()
PUB = KEY.public_key()
N = 23


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        principal=f"p{i % 3}",
        role="model-team",
        action="rpc.GetJob",
        outcome="allowed",
        job_id=f"job-{i}",
        details={"i": i},
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("audit")
    log = AuditLog(tmp / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(10):
        log.append(_event(i))
    log.checkpoint()
    for i in range(10, N):
        log.append(_event(i))
    log.export(tmp / "x.jsonl")
    log.close()
    return (tmp / "x.jsonl").read_text().splitlines()


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _records(lines: list[str]) -> list[dict]:
    return [json.loads(x) for x in lines if '"checkpoint"' not in x]


def _checkpoints(lines: list[str]) -> list[str]:
    return [x for x in lines if '"checkpoint"' in x]


def test_the_untouched_export_verifies(export: list[str], tmp_path: Path) -> None:
    r = verify_export(_write(tmp_path, export), public_key=PUB)
    assert r.size == N


def _dump(recs: list[dict], cps: list[str]) -> list[str]:
    return [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in recs] + cps


@pytest.mark.parametrize("victim", [0, 7, N - 1])
def test_an_edited_record_is_named(export: list[str], tmp_path: Path, victim: int) -> None:
    recs = _records(export)
    recs[victim]["leaf"]["principal"] = "someone-else"
    with pytest.raises(RecordError, match=f"record {victim}: its content") as e:
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)
    assert e.value.seq == victim


def test_an_edit_with_a_recomputed_leaf_hash_breaks_the_chain(
    export: list[str], tmp_path: Path
) -> None:
    recs = _records(export)
    recs[5]["leaf"]["outcome"] = "denied"
    leaf = json.dumps(recs[5]["leaf"], sort_keys=True, separators=(",", ":")).encode()
    recs[5]["leaf_hash"] = m.leaf_hash(leaf).hex()
    with pytest.raises(RecordError, match="record 5: the hash chain breaks") as e:
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)
    assert e.value.seq == 5


def test_a_rewritten_tail_with_a_recomputed_chain_fails_the_signed_checkpoints(
    export: list[str], tmp_path: Path
) -> None:
    recs = _records(export)
    recs[3]["leaf"]["outcome"] = "denied"
    chain = bytes(32)
    for r in recs:
        leaf = json.dumps(r["leaf"], sort_keys=True, separators=(",", ":")).encode()
        r["leaf_hash"] = m.leaf_hash(leaf).hex()
        chain = m.node_hash(chain, bytes.fromhex(r["leaf_hash"]))
        r["chain"] = chain.hex()
    with pytest.raises(RecordError, match=r"records 0\.\.9 do not match the signed checkpoint"):
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)


def test_a_removed_record_is_named(export: list[str], tmp_path: Path) -> None:
    recs = _records(export)
    del recs[4]
    with pytest.raises(RecordError, match=r"record 4: .*missing") as e:
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)
    assert e.value.seq == 4


def test_reordered_records_are_named(export: list[str], tmp_path: Path) -> None:
    recs = _records(export)
    recs[8], recs[9] = recs[9], recs[8]
    with pytest.raises(RecordError, match="record 8") as e:
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)
    assert e.value.seq == 8


def test_a_moved_record_renumbered_is_caught_by_its_leaf(export: list[str], tmp_path: Path) -> None:
    recs = _records(export)
    recs[8], recs[9] = recs[9], recs[8]
    recs[8]["seq"], recs[9]["seq"] = 8, 9
    with pytest.raises(RecordError, match="record 8: its leaf says it is record 9"):
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)


def test_an_inserted_record_is_named(export: list[str], tmp_path: Path) -> None:
    recs = _records(export)
    forged = json.loads(json.dumps(recs[6]))
    recs.insert(7, forged)
    with pytest.raises(RecordError, match="record 7"):
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)


def test_a_truncated_log_is_caught_by_its_checkpoint(export: list[str], tmp_path: Path) -> None:
    recs = _records(export)[:-3]
    with pytest.raises(CheckpointError, match="vouches for 23 records but only 20"):
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)


def test_a_log_spliced_from_another_log_fails(export: list[str], tmp_path: Path) -> None:
    other = AuditLog(tmp_path / "o.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(N):
        other.append(_event(i + 100))
    other.export(tmp_path / "o.jsonl")
    other.close()
    theirs = _records((tmp_path / "o.jsonl").read_text().splitlines())
    ours = _records(export)
    spliced = ours[:12] + theirs[12:]
    with pytest.raises(RecordError, match="record 12"):
        verify_export(_write(tmp_path, _dump(spliced, _checkpoints(export))), public_key=PUB)


def test_a_checkpoint_signed_with_another_key_is_refused(export: list[str], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not the gateway key"):
        verify_export(
            _write(tmp_path, export), public_key=ed25519.Ed25519PrivateKey.generate().public_key()
        )


def test_a_log_with_no_checkpoint_is_refused(export: list[str], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no signed checkpoint"):
        verify_export(
            _write(tmp_path, [x for x in export if '"checkpoint"' not in x]), public_key=PUB
        )


# -- proofs ---------------------------------------------------------------------------------

LEAVES = [lm.leaf_hash(f"leaf {i}".encode()) for i in range(N)]
ROOT = m.root(LEAVES)


def _flip(b: bytes, bit: int = 0) -> bytes:
    return bytes([b[0] ^ (1 << bit)]) + b[1:]


def test_an_honest_inclusion_proof_verifies() -> None:
    verify_inclusion(
        index=9, size=N, leaf=LEAVES[9], proof=m.inclusion_proof(9, LEAVES), expected_root=ROOT
    )


@pytest.mark.parametrize(
    "case",
    [
        "flip-node",
        "flip-leaf",
        "wrong-index",
        "index-too-big",
        "truncated",
        "extended",
        "reversed",
        "wrong-size",
        "wrong-root",
        "empty",
    ],
)
def test_forged_inclusion_proofs_are_rejected(case: str) -> None:
    proof = m.inclusion_proof(9, LEAVES)
    kw = {"index": 9, "size": N, "leaf": LEAVES[9], "proof": proof, "expected_root": ROOT}
    match case:
        case "flip-node":
            kw["proof"] = [proof[0], _flip(proof[1]), *proof[2:]]
        case "flip-leaf":
            kw["leaf"] = _flip(LEAVES[9], 7)
        case "wrong-index":
            kw["index"] = 8
        case "index-too-big":
            kw["index"] = N
        case "truncated":
            kw["proof"] = proof[:-1]
        case "extended":
            kw["proof"] = [*proof, proof[-1]]
        case "reversed":
            kw["proof"] = proof[::-1]
        case "wrong-size":
            kw["size"] = 2 * N  # a deeper tree needs a longer path
        case "wrong-root":
            kw["expected_root"] = _flip(ROOT)
        case "empty":
            kw["proof"] = []
    with pytest.raises(ProofError):
        verify_inclusion(**kw)


@pytest.mark.parametrize(
    "case",
    [
        "flip",
        "truncated",
        "extended",
        "unrelated",
        "swapped",
        "wrong-old-root",
        "shrinking",
        "equal-nonempty",
    ],
)
def test_forged_consistency_proofs_are_rejected(case: str) -> None:
    old = 7
    proof = m.consistency_proof(old, LEAVES)
    kw = {
        "old_size": old,
        "new_size": N,
        "old_root": m.root(LEAVES[:old]),
        "new_root": ROOT,
        "proof": proof,
    }
    match case:
        case "flip":
            kw["proof"] = [_flip(proof[0]), *proof[1:]]
        case "truncated":
            kw["proof"] = proof[:-1]
        case "extended":
            kw["proof"] = [*proof, proof[0]]
        case "unrelated":  # a proof between two trees that share nothing with ours
            other = [lm.leaf_hash(f"other {i}".encode()) for i in range(N)]
            kw["old_root"], kw["new_root"] = m.root(other[:old]), m.root(other)
        case "swapped":
            kw["proof"] = proof[::-1]
        case "wrong-old-root":
            kw["old_root"] = m.root(LEAVES[: old - 1])
        case "shrinking":
            kw["old_size"], kw["new_size"] = N, old
        case "equal-nonempty":
            kw["old_size"], kw["new_size"], kw["old_root"] = N, N, ROOT
    with pytest.raises(ProofError):
        verify_consistency(**kw)


# -- the export's frame, its checkpoints and their proofs ------------------------------------


def _rehash_from(recs: list[dict], start: int) -> None:
    """Recompute leaf hashes and the chain from ``start`` on, as a careful forger would."""
    chain = bytes.fromhex(recs[start - 1]["chain"]) if start else bytes(32)
    for r in recs[start:]:
        leaf = json.dumps(r["leaf"], sort_keys=True, separators=(",", ":")).encode()
        r["leaf_hash"] = m.leaf_hash(leaf).hex()
        chain = m.node_hash(chain, bytes.fromhex(r["leaf_hash"]))
        r["chain"] = chain.hex()


def test_a_record_appended_after_the_last_checkpoint_is_named(
    export: list[str], tmp_path: Path
) -> None:
    recs = _records(export)
    forged = json.loads(json.dumps(recs[-1]))
    forged["seq"] = forged["leaf"]["seq"] = N
    forged["leaf"]["principal"] = "nobody-saw-this"
    recs.append(forged)
    _rehash_from(recs, N)
    with pytest.raises(RecordError, match=f"record {N}: no signed checkpoint covers it") as e:
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)
    assert e.value.seq == N


def test_a_record_framed_to_show_another_leaf_is_refused(export: list[str], tmp_path: Path) -> None:
    # JSON keeps the last of two equal keys: a verifier that hashed the first "leaf" and a
    # reader that shows the second would disagree about what was verified.
    lines = list(export)
    evil = dict(_records(export)[4]["leaf"], principal="mallory")
    lines[4] = (
        lines[4][:-1] + ',"leaf":' + json.dumps(evil, sort_keys=True, separators=(",", ":")) + "}"
    )
    with pytest.raises(RecordError, match="record 4"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


@pytest.mark.parametrize("field", ["leaf_hash", "chain"])
def test_a_hash_in_another_spelling_is_refused(
    export: list[str], tmp_path: Path, field: str
) -> None:
    recs = _records(export)
    recs[3][field] = recs[3][field].upper()  # the same bytes, another text
    with pytest.raises(RecordError, match="record 3: line 4 is not a well-formed record"):
        verify_export(_write(tmp_path, _dump(recs, _checkpoints(export))), public_key=PUB)


def test_a_signature_in_another_base64_spelling_is_refused(
    export: list[str], tmp_path: Path
) -> None:
    cps = [json.loads(x) for x in _checkpoints(export)]
    sig = cps[0]["checkpoint"]["signature"]
    # The last character before "==" carries 4 unused bits: flip one, same 64 bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    c = sig[-3]
    cps[0]["checkpoint"]["signature"] = sig[:-3] + alphabet[alphabet.index(c) ^ 1] + "=="
    lines = _dump(
        _records(export), [json.dumps(c, sort_keys=True, separators=(",", ":")) for c in cps]
    )
    with pytest.raises(CheckpointError, match="not canonical base64"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


def test_checkpoints_out_of_order_are_refused(export: list[str], tmp_path: Path) -> None:
    cps = _checkpoints(export)
    with pytest.raises(CheckpointError, match="checkpoints must grow"):
        verify_export(_write(tmp_path, _dump(_records(export), cps[::-1])), public_key=PUB)


@pytest.mark.parametrize("where", ["among the records", "after the checkpoints"])
def test_records_and_checkpoints_interleaved_are_refused(
    export: list[str], tmp_path: Path, where: str
) -> None:
    # Every record and checkpoint intact, in order within its kind: only the layout lies.
    recs, cps = _dump(_records(export), []), _checkpoints(export)
    lines = (
        recs[:-1] + cps[:1] + recs[-1:] + cps[1:]
        if where == "among the records"
        else recs[:-1] + cps + recs[-1:]
    )
    with pytest.raises(RecordError, match=f"record {N - 1}: .*an export lists every record first"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


def test_a_forged_consistency_proof_between_checkpoints_is_refused(
    export: list[str], tmp_path: Path
) -> None:
    cps = [json.loads(x) for x in _checkpoints(export)]
    assert cps[1]["extends"]["size"] == 10 and cps[1]["extends"]["proof"]
    proof = cps[1]["extends"]["proof"]
    proof[0] = _flip(bytes.fromhex(proof[0])).hex()
    lines = _dump(
        _records(export), [json.dumps(c, sort_keys=True, separators=(",", ":")) for c in cps]
    )
    with pytest.raises(ProofError, match="checkpoint at size 23 does not provably extend"):
        verify_export(_write(tmp_path, lines), public_key=PUB)
    cps[1]["extends"]["size"] = 9
    lines = _dump(
        _records(export), [json.dumps(c, sort_keys=True, separators=(",", ":")) for c in cps]
    )
    with pytest.raises(CheckpointError, match="proves it extends size 9"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


def test_an_earlier_checkpoint_of_another_log_is_not_extended(
    export: list[str], tmp_path: Path
) -> None:
    from enclave.audit import SignedCheckpoint

    other = AuditLog(tmp_path / "o.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(5):
        other.append(_event(i + 500))
    theirs = other.checkpoint()
    other.close()
    path = _write(tmp_path, export)
    with pytest.raises(ProofError, match="does not extend the earlier checkpoint"):
        verify_export(path, public_key=PUB, previous=theirs)
    bigger = SignedCheckpoint(N + 1, theirs.root, theirs.time, b"")
    bigger = SignedCheckpoint(N + 1, theirs.root, theirs.time, KEY.sign(bigger.note()))
    with pytest.raises(ProofError, match="cannot extend it"):
        verify_export(path, public_key=PUB, previous=bigger)
    unsigned = SignedCheckpoint(5, theirs.root, theirs.time, b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not the gateway key"):
        verify_export(path, public_key=PUB, previous=unsigned)
    ours = SignedCheckpoint.from_dict(json.loads(_checkpoints(export)[0])["checkpoint"])
    assert verify_export(path, public_key=PUB, previous=ours).size == N
