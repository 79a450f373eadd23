"""Properties of the log (hypothesis): growth keeps old proofs valid; any changed byte fails."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.audit import AuditEvent, AuditLog, verify_consistency, verify_export, verify_inclusion
from enclave.audit import _merkle as m
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
    verify_inclusion(
        index=index, size=old, leaf=hashes[index], proof=old_proof, expected_root=old_root
    )
    verify_consistency(
        old_size=old,
        new_size=len(hashes),
        old_root=old_root,
        new_root=m.root(hashes),
        proof=m.consistency_proof(old, hashes),
    )
    verify_inclusion(
        index=index,
        size=len(hashes),
        leaf=hashes[index],
        proof=m.inclusion_proof(index, hashes),
        expected_root=m.root(hashes),
    )


_EXPORTS: dict[int, bytes] = {}


def _export(n: int = 12) -> bytes:
    """An export of ``n`` records (made once for each ``n``)."""
    if n not in _EXPORTS:
        with tempfile.TemporaryDirectory() as tmp:
            log = AuditLog(Path(tmp) / "a.db", signing_key=KEY, checkpoint_interval_s=0)
            for i in range(n):
                log.append(
                    AuditEvent(
                        principal=f"p{i}",
                        role="data-owner",
                        action="data.read",
                        outcome="ok",
                        dataset="books@v1",
                        file=f"f{i}.txt",
                        details={"n": i, "ok": True},
                    )
                )
                if i == n // 2:
                    log.checkpoint()
            log.export(Path(tmp) / "x.jsonl")
            log.close()
            _EXPORTS[n] = (Path(tmp) / "x.jsonl").read_bytes()
    return _EXPORTS[n]


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


_TEXT = st.text(max_size=12)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | _TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        AuditEvent,
        principal=_TEXT.filter(bool),
        role=_TEXT.filter(bool),
        action=_TEXT.filter(bool),
        outcome=_TEXT.filter(bool),
        job_id=st.none() | _TEXT,
        dataset=st.none() | _TEXT,
        file=st.none() | _TEXT,
        details=st.dictionaries(_TEXT, _JSON, max_size=4),
    ),
    st.integers(0, 2**40),
)
def test_the_leaf_is_the_canonical_json_of_the_record(event: AuditEvent, seq: int) -> None:
    from enclave.audit._model import decode_leaf, encode_leaf

    time = "2026-01-02T03:04:05.000006Z"
    leaf = encode_leaf(seq, time, event)
    obj = {
        "seq": seq,
        "time": time,
        "details": dict(event.details),
        "principal": event.principal,
        "role": event.role,
        "action": event.action,
        "outcome": event.outcome,
        "job_id": event.job_id,
        "dataset": event.dataset,
        "file": event.file,
    }
    assert leaf == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert decode_leaf(leaf) == (seq, time, event)


def _outcome(path: Path, *, fast: bool) -> tuple[str, int | None]:
    from unittest import mock

    from enclave.audit import _verify

    with (
        contextlib.nullcontext()
        if fast
        else mock.patch.object(_verify._Checker, "_fast", return_value=False)
    ):
        try:
            r = verify_export(path, public_key=KEY.public_key())
        except AuditLogError as e:
            return type(e).__name__, getattr(e, "seq", None)
        except UnicodeDecodeError:
            return "UnicodeDecodeError", None
    return "ok", r.size


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_the_batch_path_and_the_parser_agree_on_every_damaged_export(
    data: st.DataObject,
) -> None:
    _damage_and_compare(data, _export(), range(len(_export().splitlines())))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_they_agree_where_the_seq_gains_a_digit(data: st.DataObject) -> None:
    # Records 95..105 of 110: the batch path cuts the batch where seqs go from 2 digits to 3.
    _damage_and_compare(data, _export(110), range(95, 106))


def _damage_and_compare(data: st.DataObject, export: bytes, where: range) -> None:
    lines = export.splitlines(keepends=True)
    how = data.draw(st.sampled_from(["byte", "drop", "swap", "dup"]), label="damage")
    i = data.draw(st.sampled_from(where), label="line")
    if how == "byte":
        raw = bytearray(lines[i])
        pos = data.draw(st.integers(0, len(raw) - 1), label="position")
        raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="to")
        lines[i] = bytes(raw)
    elif how == "drop":
        del lines[i]
    elif how == "swap":
        j = data.draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i), label="other")
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines.insert(i, lines[i])
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.jsonl"
        p.write_bytes(b"".join(lines))
        fast = _outcome(p, fast=True)
        assert fast == _outcome(p, fast=False)
        assert fast[0] != "ok", "a damaged export passed"


def test_an_undamaged_export_takes_the_batch_path() -> None:
    from unittest import mock

    from enclave.audit import _verify

    taken: list[bool] = []
    real = _verify._Checker._fast

    def spy(self: _verify._Checker, batch: list[bytes]) -> bool:
        taken.append(real(self, batch))
        return taken[-1]

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(_verify._Checker, "_fast", spy):
        p = Path(tmp) / "x.jsonl"
        p.write_bytes(_export())
        assert _outcome(p, fast=True) == ("ok", 12)
        p.write_bytes(_export(110))  # seqs of 1, 2 and 3 digits: one batch cut in three
        assert _outcome(p, fast=True) == ("ok", 110)
    assert taken == [True, True]
