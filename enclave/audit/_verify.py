"""Checking an audit log from first record to last, from an export or from its database.

The export is JSON lines, written by :func:`write_export`: every record in order, then every
checkpoint::

    {"chain":HEX,"leaf":{...},"leaf_hash":HEX,"seq":N}
    {"checkpoint":{"origin":...,"root":HEX,"signature":B64,"size":N,"time":...},
     "extends":{"proof":[HEX,...],"size":M}}

``extends`` is the RFC 9162 consistency proof from the checkpoint before it (size 0 for the
first), so the signed checkpoints alone show the log only ever grew. One pass over the records
recomputes each leaf hash, the hash chain ``chain[i] = H(0x01 || chain[i-1] || leaf_hash[i])``
and the Merkle root at every checkpoint's size (a chunk of leaves at a time, so memory stays
small), naming the first record at fault; then every checkpoint's signature and root, and that
one covers the last record. Records in the form :func:`record_line` writes are checked a batch
at a time with loops that run in C (:mod:`._verify_fast`), so that verifying runs close to the
speed of the hashing it must do; anything else, and any batch that path refuses, takes the
reference path here, a line at a time through the JSON parser (see :class:`_Checker`).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import _merkle, _verify_fast
from enclave.audit._merkle import ProofError
from enclave.audit._model import (
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    parse_hex32,
)
from enclave.audit._verify_fast import _P1
from policies.errors import AuditLogError, InvalidInput

GENESIS = b"\x00" * 32

# Leaves hashed into a subtree at a time, and export bytes read and checked at a time, while
# verifying. Both small, so that what a batch allocates is freed into memory the next batch
# reuses, in cache: batches of 4 MiB made the allocator hand whole arenas back and fault
# fresh pages in again for every batch (~10,000 page faults for 200,000 records, and each
# batch's buffers out of cache by the time they were read again).
_CHUNK = 1 << 12
_BATCH_BYTES = 1 << 18
_BATCH_LINES = 1024  # the same, for lines made from the database


@dataclass(frozen=True)
class ExportedCheckpoint:
    checkpoint: SignedCheckpoint
    extends_size: int
    extends_proof: tuple[bytes, ...]


def record_line(seq: int, leaf: bytes, leaf_hash: bytes, chain: bytes) -> bytes:
    """One record of an export: exactly ``json.dumps`` with sorted keys, compact."""
    return b'{"chain":"%s","leaf":%s,"leaf_hash":"%s","seq":%d}\n' % (
        chain.hex().encode(),
        leaf,
        leaf_hash.hex().encode(),
        seq,
    )


def checkpoint_line(cp: SignedCheckpoint, extends_size: int, proof: Sequence[bytes]) -> bytes:
    obj = {
        "checkpoint": cp.to_dict(),
        "extends": {"size": extends_size, "proof": [h.hex() for h in proof]},
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def write_export(
    path: Path,
    records: Iterable[tuple[int, bytes, bytes, bytes]],
    checkpoints: Iterable[tuple[SignedCheckpoint, int, Sequence[bytes]]],
) -> None:
    """Write an export to ``path`` whole or not at all (a temporary file, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as f:
            f.writelines(record_line(*r) for r in records)
            f.writelines(checkpoint_line(*c) for c in checkpoints)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- reading an export ----------------------------------------------------------------------


def _parse_checkpoint_line(obj: Any) -> ExportedCheckpoint:
    if not isinstance(obj, dict) or set(obj) != {"checkpoint", "extends"}:
        raise CheckpointError("a checkpoint line has the wrong fields")
    ext = obj["extends"]
    if (
        not isinstance(ext, dict)
        or set(ext) != {"size", "proof"}
        or type(ext["size"]) is not int
        or not isinstance(ext["proof"], list)
    ):
        raise CheckpointError("the checkpoint's consistency proof is malformed")
    try:
        proof = tuple(parse_hex32(h, "a proof hash") for h in ext["proof"])
    except InvalidInput as e:
        raise CheckpointError(str(e)) from e
    return ExportedCheckpoint(SignedCheckpoint.from_dict(obj["checkpoint"]), ext["size"], proof)


def _parse_record(obj: Any, n: int) -> tuple[int, bytes, bytes, bytes]:
    seq = obj.get("seq") if isinstance(obj, dict) else None
    if type(seq) is not int:
        raise AuditLogError(f"line {n} of the export is neither a record nor a checkpoint")
    try:
        if set(obj) != {"seq", "leaf", "leaf_hash", "chain"} or not isinstance(obj["leaf"], dict):
            raise InvalidInput(f"line {n} has the wrong fields")
        leaf = json.dumps(
            obj["leaf"], sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode()
        return (
            seq,
            leaf,
            parse_hex32(obj["leaf_hash"], "its leaf hash"),
            parse_hex32(obj["chain"], "its chain hash"),
        )
    except (InvalidInput, ValueError) as e:
        raise RecordError(f"line {n} is not a well-formed record ({e})", seq=seq) from e


def _trailing_checkpoints(f: IO[bytes]) -> list[ExportedCheckpoint]:
    """The checkpoint lines that close the export, read from its end: in an export that
    verifies they are all of its checkpoint lines (the record pass refuses any line after the
    first checkpoint line that is not one). Raises :class:`CheckpointError` for a malformed
    one, without its line number: :func:`verify_export` then asks :func:`_export_checkpoints`
    for the error, as it would have been found from the start."""
    try:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file
        return []
    out = []
    with data:
        end = len(data) - (data[-1:] == b"\n")
        while end > 0:
            start = data.rfind(b"\n", 0, end) + 1
            if data[start : start + 13] != b'{"checkpoint"':
                break
            try:
                obj = json.loads(data[start:end])
            except ValueError as e:
                raise CheckpointError("a checkpoint line is not JSON") from e
            out.append(_parse_checkpoint_line(obj))
            end = start - 1
    return out[::-1]


def _export_checkpoints(f: IO[bytes]) -> list[ExportedCheckpoint]:
    """The checkpoint lines, found without reading the records line by line (a checkpoint
    line in any other spelling is refused by the record pass)."""
    try:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file
        return []
    out = []
    with data:
        pos = 0 if data[:13] == b'{"checkpoint"' else data.find(b'\n{"checkpoint"')
        while pos != -1:
            start = pos + 1 if data[pos : pos + 1] == b"\n" else pos
            end = data.find(b"\n", start)
            raw = data[start:] if end == -1 else data[start:end]
            try:
                try:
                    obj = json.loads(raw)
                except ValueError as e:
                    raise CheckpointError("a checkpoint line is not JSON") from e
                out.append(_parse_checkpoint_line(obj))
            except CheckpointError as e:
                n = 1 + sum(
                    data[i : min(i + (1 << 24), start)].count(b"\n")
                    for i in range(0, start, 1 << 24)
                )
                raise CheckpointError(f"line {n}: {e}") from e
            pos = -1 if end == -1 else data.find(b'\n{"checkpoint"', end)
    return out


# -- the one pass ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """What one pass over the records found."""

    size: int
    root: bytes
    roots: dict[int, bytes]  # the Merkle root at each size asked for


class _Roots:
    """Merkle roots at chosen sizes from leaf hashes fed in order, a chunk at a time: each
    chunk of 2**16 leaves is hashed level by level and kept only as its root, on a frontier
    of complete subtrees. O(chunk) memory."""

    def __init__(self, sizes: Iterable[int]) -> None:
        self._wanted = sorted(set(sizes))
        self._next = 0
        self.roots: dict[int, bytes] = {}
        self._stack: list[bytes] = []  # roots of complete subtrees of whole chunks
        self._done = 0

    def feed(self, hashes: bytes) -> bytes:
        """Take the next chunk of leaf hashes, one after another (whole, or the last);
        returns the root so far."""
        lv = _merkle.levels(hashes)
        count = len(hashes) // 32
        end = self._done + count
        while self._next < len(self._wanted) and self._wanted[self._next] <= end:
            size = self._wanted[self._next]
            local = size - self._done
            self.roots[size] = _fold(
                [*self._stack, _merkle.prefix_root(lv, local)] if local else self._stack
            )
            self._next += 1
        root = _fold([*self._stack, _merkle.prefix_root(lv, count)] if count else self._stack)
        if count == _CHUNK:
            self._stack.append(lv[-1])
            c = end // _CHUNK
            while not c & 1:
                right = self._stack.pop()
                self._stack[-1] = _merkle.node_hash(self._stack[-1], right)
                c >>= 1
        self._done = end
        return root


def check_lines(lines: Iterable[bytes], *, sizes: Iterable[int]) -> Pass:
    """Check each record line of an export, in order: its place, its leaf's own seq, its leaf
    hash and its chain link; note the Merkle root at each of ``sizes``; skip checkpoint lines.
    Raises :class:`RecordError` naming the first bad record."""
    checker = _Checker(sizes)
    batch: list[bytes] = []
    for raw in lines:
        batch.append(raw)
        if len(batch) == _BATCH_LINES:
            checker.lines(batch)
            batch = []
    checker.lines(batch)
    return checker.finish()


class _Checker:
    """The state of one pass, fed lines a batch at a time.

    A batch of record lines in exactly the form :func:`record_line` writes, numbered from the
    record expected next, is first offered to the batch path (:mod:`._verify_fast`, the
    verifier's hot path, numpy over the line frames). If it says no, the batch is checked again
    a line at a time by :meth:`_line` through the JSON parser: the reference path, which names
    the first record at fault and is the one to read to know what verifying checks.
    """

    def __init__(self, sizes: Iterable[int]) -> None:
        self._roots = _Roots(sizes)
        self._hashes: list[bytes] = []  # leaf hashes not yet fed to the roots, in parts
        self._pending = 0  # how many they are
        self._chain = GENESIS
        self.n = 0
        self._lineno = 0
        self._checkpoints_from: int | None = None  # the line of the first checkpoint

    def lines(self, batch: list[bytes]) -> None:
        i = len(batch)
        while i and batch[i - 1][:10] != _P1:  # checkpoint lines close an export
            i -= 1
        if not (i and self._checkpoints_from is None and self._fast(batch[:i])):
            i = 0
        else:
            self._lineno += i
        for raw in batch[i:]:
            self._lineno += 1
            self._line(raw)

    def _fast(self, batch: list[bytes]) -> bool:
        """The batch path (:mod:`._verify_fast`): True once it has taken the whole batch."""
        part = _verify_fast.check_batch(self._chain, self.n, batch)
        if part is None:
            return False
        lhs, stored_chain = part
        self._chain = stored_chain[-32:]
        self.n += len(batch)
        self._add(lhs)
        return True

    def _line(self, raw: bytes) -> None:
        rec = _slow_line(raw, self._lineno)
        if rec is None:
            if self._checkpoints_from is None:
                self._checkpoints_from = self._lineno
            return
        seq, leaf, stored_lh, stored_chain = rec
        if self._checkpoints_from is not None:
            raise RecordError(
                f"it is on line {self._lineno}, after the checkpoint on line "
                f"{self._checkpoints_from}: an export lists every record first",
                seq=seq,
            )
        n = self.n
        if seq != n:
            what = "missing" if seq > n else "out of order or repeated"
            raise RecordError(
                f"found record {seq} where record {n} belongs: a record is {what}", seq=n
            )
        inner = _leaf_seq(leaf, n)
        if inner != n:
            raise RecordError(f"its leaf says it is record {inner} (moved)", seq=n)
        lh = _merkle.leaf_hash(leaf)
        if lh != stored_lh:
            raise RecordError("its content does not match its leaf hash (edited)", seq=n)
        chain = _merkle.node_hash(self._chain, lh)
        if chain != stored_chain:
            raise RecordError("the hash chain breaks here (edited, removed or inserted)", seq=n)
        self._chain = chain
        self.n += 1
        self._add(lh)

    def _add(self, lhs: bytes) -> None:
        self._hashes.append(lhs)
        self._pending += len(lhs) // 32
        if self._pending >= _CHUNK:
            data = b"".join(self._hashes)
            cut = 32 * (self._pending - self._pending % _CHUNK)
            for i in range(0, cut, 32 * _CHUNK):
                self._roots.feed(data[i : i + 32 * _CHUNK])
            self._hashes = [data[cut:]]
            self._pending -= cut // 32

    def finish(self) -> Pass:
        root = self._roots.feed(b"".join(self._hashes))
        self._hashes, self._pending = [], 0
        return Pass(size=self.n, root=root, roots=self._roots.roots)


def _slow_line(raw: bytes, lineno: int) -> tuple[int, bytes, bytes, bytes] | None:
    """A line not in the written form: parsed, or None for a checkpoint line."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise AuditLogError(f"line {lineno} of the export is not JSON") from e
    if isinstance(obj, dict) and "checkpoint" in obj:
        if not raw.startswith(b'{"checkpoint"'):
            raise CheckpointError(f"line {lineno}: a checkpoint line not in the form written")
        return None
    return _parse_record(obj, lineno)


def _fold(stack: list[bytes]) -> bytes:
    if not stack:
        return _merkle.EMPTY_ROOT
    r = stack[-1]
    for c in reversed(stack[:-1]):
        r = _merkle.node_hash(c, r)
    return r


def _leaf_seq(leaf: bytes, n: int) -> int:
    try:
        seq = json.loads(leaf)["seq"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"its leaf is not an event ({e})", seq=n) from e
    if type(seq) is not int:
        raise RecordError("its leaf's seq is not a number", seq=n)
    return seq


def check_checkpoints(
    p: Pass,
    checkpoints: Sequence[SignedCheckpoint],
    public_key: ed25519.Ed25519PublicKey,
    *,
    tail_allowed: bool,
    earlier: Sequence[SignedCheckpoint] = (),
) -> VerifyResult:
    """Each checkpoint is the gateway's, in increasing size, and vouches for the records as
    they are; nothing follows the last unless ``tail_allowed``; the log extends each of
    ``earlier`` (checkpoints seen before, signed by the same key).
    """
    if not checkpoints:
        raise CheckpointError("the log holds no signed checkpoint: nothing vouches for it")
    before = 0
    for i, cp in enumerate(checkpoints):
        if i and cp.size <= checkpoints[i - 1].size:
            raise CheckpointError(
                f"checkpoint at size {cp.size} follows one at size "
                f"{checkpoints[i - 1].size}: checkpoints must grow"
            )
        cp.verify(public_key)
        if cp.size > p.size:
            raise CheckpointError(
                f"a checkpoint vouches for {cp.size} records but only {p.size} are here: "
                "records were removed from the end"
            )
        if p.roots[cp.size] != cp.root:
            raise RecordError(
                f"records {before}..{cp.size - 1} do not match the signed checkpoint at size "
                f"{cp.size} (rewritten)",
                seq=before,
            )
        before = cp.size
    last = checkpoints[-1]
    if p.size > last.size and not tail_allowed:
        raise RecordError(
            f"no signed checkpoint covers it or the {p.size - last.size - 1} "
            "records after it (appended after the export was signed)",
            seq=last.size,
        )
    for previous in earlier:
        previous.verify(public_key)
        if previous.size > last.size:
            raise ProofError(
                f"the earlier checkpoint vouches for {previous.size} records; "
                f"this log's latest only for {last.size}: it cannot extend it"
            )
        if p.roots[previous.size] != previous.root:
            raise ProofError(
                f"this log does not extend the earlier checkpoint: its first {previous.size} "
                f"records have root {p.roots[previous.size].hex()[:16]}…, the checkpoint says "
                f"{previous.root.hex()[:16]}… (history rewritten)"
            )
    return VerifyResult(size=p.size, root=p.root, checkpoint=last, unvouched=p.size - last.size)


def verify_export(
    path: Path,
    *,
    public_key: ed25519.Ed25519PublicKey,
    previous: SignedCheckpoint | None = None,
    extends: Sequence[SignedCheckpoint] = (),
) -> VerifyResult:
    """Verify an export offline with the log's public key alone: every record, the chain,
    every checkpoint's signature and root, the consistency proofs between them, that a signed
    checkpoint covers the last record, and with ``previous`` (a checkpoint seen earlier) and
    each of ``extends`` that this log extends it. Raises :class:`AuditLogError`: a
    :class:`RecordError` naming the first bad record, a :class:`CheckpointError`, or a
    :class:`ProofError`."""
    earlier = [*extends, *([previous] if previous is not None else [])]
    try:
        with path.open("rb") as f:
            try:  # the checkpoints read from the end; the whole file is searched on an error
                exported = _trailing_checkpoints(f)
                sizes = {e.checkpoint.size for e in exported} | {c.size for c in earlier}
                checker = _Checker(sizes)
                while batch := f.readlines(_BATCH_BYTES):
                    checker.lines(batch)
                p = checker.finish()
            except Exception:
                # A malformed checkpoint line anywhere is the error to name, as it has been
                # since verifying first read every checkpoint line (an export that verifies
                # has them all at its end).
                f.seek(0)
                _export_checkpoints(f)
                raise
    except OSError as e:
        raise AuditLogError(f"cannot read the export {path}: {e}") from e
    result = check_checkpoints(
        p, [x.checkpoint for x in exported], public_key, tail_allowed=False, earlier=earlier
    )
    before = SignedCheckpoint(0, _merkle.EMPTY_ROOT, "", b"")
    for x in exported:
        cp = x.checkpoint
        if x.extends_size != before.size:
            raise CheckpointError(
                f"checkpoint at size {cp.size} proves it extends size "
                f"{x.extends_size}, but the checkpoint before it is at "
                f"size {before.size}"
            )
        try:
            _merkle.verify_consistency(
                old_size=before.size,
                new_size=cp.size,
                old_root=before.root,
                new_root=cp.root,
                proof=x.extends_proof,
            )
        except ProofError as err:
            raise ProofError(
                f"checkpoint at size {cp.size} does not provably extend the one "
                f"at size {before.size}: {err}"
            ) from err
        before = cp
    return result
