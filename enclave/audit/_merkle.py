"""RFC 6962 / RFC 9162 Merkle tree maths, free of I/O.

Leaves are hashed ``SHA-256(0x00 || leaf)`` and interior nodes ``SHA-256(0x01 || left ||
right)`` (domain separation: a leaf can never pass for a node). The tree over ``n`` leaves
splits at the largest power of two smaller than ``n``. Proofs are generated from the list of
leaf hashes (the plain functions, a reference) or from a :class:`Tree`, which keeps every
complete subtree's hash as leaves arrive so that roots and proofs for any size cost O(log² n)
hashes instead of O(n); :func:`levels` and :func:`prefix_root` serve a verifier that hashes a
chunk of leaves at a time. Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2
(consistency) and raises :class:`ProofError` saying what did not match — it never returns a
bool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from policies.errors import AuditLogError

EMPTY_ROOT = hashlib.sha256(b"").digest()
_DIGEST = type(hashlib.sha256()).digest
_CUTS: dict[int, list[slice]] = {}


class ProofError(AuditLogError):
    """An inclusion or consistency proof does not prove what it claims."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf *hashes* (iterative: hashes each node once)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    # Combine left to right; an odd node at the end is carried up unchanged, which is the
    # RFC's split at the largest power of two.
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree over ``leaves`` (RFC 9162 PATH)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ProofError(f"leaf index {index} is outside a tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root(leaves[:k])]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1, ``leaves`` being the first n leaf hashes."""
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ProofError(f"no consistency proof from size {old_size} to size {n}")
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root(leaves[:k])]


class Tree:
    """The leaf hashes of a growing log and the hash of every complete, aligned subtree.

    ``levels[h]`` holds, 32 bytes each, the roots of the subtrees of ``2**h`` leaves that start
    at a multiple of ``2**h``; an append adds amortised one node hash. Any range the RFC's
    recursion visits starts at such a boundary, so its root folds O(log n) stored nodes.
    Appends come from one thread; readers may run alongside and see the tree at ``len(tree)``
    (published after the nodes it needs).
    """

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaves)

    def __len__(self) -> int:
        return self._size

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append leaf hashes (32 bytes each); the new parents are hashed level by level."""
        data = b"".join(leaves)
        if len(data) != 32 * len(leaves) or any(len(lh) != 32 for lh in leaves):
            raise ProofError("a leaf hash is not 32 bytes")
        levels = self._levels
        levels[0] += data
        sha256 = hashlib.sha256
        h = 0
        while True:
            row = levels[h]
            want = len(row) // 64  # complete pairs at this level = nodes the next should have
            if h + 1 == len(levels):
                if want == 0:
                    break
                levels.append(bytearray())
            up = levels[h + 1]
            have = len(up) // 32
            if have == want:
                break
            up += b"".join(
                [sha256(b"\x01" + row[64 * i : 64 * i + 64]).digest() for i in range(have, want)]
            )
            h += 1
        self._size = len(levels[0]) // 32

    def truncate(self, size: int) -> None:
        """Drop every leaf from ``size`` on (undoing an :meth:`extend` that was not kept): a
        node at level ``h`` stays when the ``2**h`` leaves under it all do."""
        self._check(size)
        self._size = size
        for h, row in enumerate(self._levels):
            del row[32 * (size >> h) :]

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise ProofError(f"leaf index {index} is outside a tree of size {self._size}")
        return bytes(self._levels[0][32 * index : 32 * index + 32])

    def _check(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise ProofError(f"size {size}: the tree has {self._size} leaves")

    def _range(self, start: int, end: int) -> bytes:
        """MTH of leaves[start:end]; ``start`` is a multiple of the largest power of two
        not above ``end - start`` (true of every range the RFC recursion visits)."""
        if start == end:
            return EMPTY_ROOT
        nodes = []
        s, n = start, end - start
        while n:
            h = n.bit_length() - 1
            i = s >> h
            nodes.append(bytes(self._levels[h][32 * i : 32 * i + 32]))
            s, n = s + (1 << h), n - (1 << h)
        r = nodes[-1]
        for c in reversed(nodes[:-1]):
            r = node_hash(c, r)
        return r

    def root(self, size: int | None = None) -> bytes:
        n = self._size if size is None else size
        self._check(n)
        return self._range(0, n)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check(size)
        if not 0 <= index < size:
            raise ProofError(f"leaf index {index} is outside a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
        return path[::-1]

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        self._check(size)
        if not 0 < old_size <= size:
            raise ProofError(f"no consistency proof from size {old_size} to size {size}")
        path: list[bytes] = []
        lo, hi, m, complete = 0, size, old_size, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            path.append(self._range(lo, hi))
        return path[::-1]


def levels(hashes: bytes) -> list[bytes]:
    """Every complete, aligned subtree's hash over ``hashes`` (leaf hashes, 32 bytes each,
    one after another), level by level: bytes ``32*i .. 32*i+31`` of ``levels(x)[h]`` are the
    root of leaves ``i*2**h .. (i+1)*2**h - 1``."""
    out = [hashes]
    while len(out[-1]) >= 64:
        # The next level's inputs, 0x01 || left || right, as the rows of one matrix.
        m = len(out[-1]) // 64
        pairs = np.empty((m, 65), np.uint8)
        pairs[:, 0] = 1
        pairs[:, 1:] = np.frombuffer(out[-1], np.uint8, count=64 * m).reshape(m, 64)
        out.append(digests(rows(pairs.tobytes(), 65)))
    return out


def digests(inputs: Iterable[bytes]) -> bytes:
    """SHA-256 of each input, the digests one after another: a loop that runs in C."""
    return b"".join(map(_DIGEST, map(hashlib.sha256, inputs)))


def rows(data: bytes, width: int) -> Iterator[bytes]:
    """``data`` cut into pieces of ``width`` bytes (the slices are made once, and kept)."""
    n = len(data) // width
    cuts = _CUTS.get(width, [])
    if len(cuts) < n:  # a new list, whole before it is seen: threads may share them
        cuts = [slice(i, i + width) for i in range(0, width << n.bit_length(), width)]
        _CUTS[width] = cuts
    return map(data.__getitem__, cuts[:n])


def prefix_root(lv: list[bytes], size: int) -> bytes:
    """MTH of the first ``size`` leaves, from :func:`levels` (O(log n) hashes)."""
    if size == 0:
        return EMPTY_ROOT
    nodes = []
    s = 0
    while s < size:
        h = (size - s).bit_length() - 1
        i = s >> h
        nodes.append(lv[h][32 * i : 32 * i + 32])
        s += 1 << h
    r = nodes[-1]
    for c in reversed(nodes[:-1]):
        r = node_hash(c, r)
    return r


def verify_inclusion(
    *, index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) is at ``index`` in the tree of ``size`` with
    ``expected_root``. Raises :class:`ProofError`."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    if r != expected_root:
        raise ProofError(
            f"inclusion proof for leaf {index} of {size} gives root {r.hex()[:16]}…, "
            f"expected {expected_root.hex()[:16]}…"
        )


def verify_consistency(
    *, old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (new_size, new_root) extends (old_size, old_root). Raises
    :class:`ProofError`."""
    if old_size < 0 or new_size < old_size:
        raise ProofError(f"size {new_size} cannot extend size {old_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the proof
        path.insert(0, old_root)
    if not path:
        raise ProofError("the consistency proof is empty")
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the trees need")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the trees need")
    if fr != old_root:
        raise ProofError(f"the proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise ProofError(f"the proof does not lead to the new root (size {new_size})")
