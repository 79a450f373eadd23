"""The verifier's batch path: a batch of export record lines checked all at once.

A record line in exactly the form :func:`enclave.audit._verify.record_line` writes has a known
frame, its seq included, and its leaf is the span inside the frame; that span is what gets
hashed and compared with the stored hashes (and then, by the one pass, with the signed roots),
so a line that frames it differently cannot pass. The loops over lines run in C (``map`` over
hashlib, numpy over the frames), so that verifying runs at about half the speed of the hashing
alone. This module only says yes or no: :func:`check_batch` returns None for anything off, and
the caller checks that batch again a line at a time through the reference path in ``_verify``,
which names the first record at fault. A property test holds the two together (they agree on
every damaged export).
"""

from __future__ import annotations

import binascii
import functools
from binascii import hexlify, unhexlify
from collections.abc import Callable, Iterator
from operator import itemgetter

import numpy as np
from numpy.typing import NDArray

from enclave.audit import _merkle

# A record line as write_export writes it: {"chain":"<hex>","leaf":<leaf>,"leaf_hash":"<hex>",
# "seq":N} and a newline.
_P1, _P2 = b'{"chain":"', b'","leaf":'


def check_batch(chain: bytes, n: int, batch: list[bytes]) -> tuple[bytes, bytes] | None:
    """Records ``n..n+len(batch)-1``, following chain hash ``chain``, if every line is exactly
    what ``record_line`` writes, each leaf matches its stored leaf hash and each stored chain
    hash is the link from the one before: their leaf hashes and their stored chain hashes,
    each 32 bytes, one after another. Else None."""
    lhs = stored_chain = b""
    for lo, hi in _same_width(n, n + len(batch)):
        part = _framed(batch[lo - n : hi - n], lo, hi)
        if part is None:
            return None
        lhs += part[0]
        stored_chain += part[1]
    # Each link H(0x01 || chain[i-1] || leaf_hash[i]) from the stored chain hashes, all
    # built as the rows of one matrix; equal to the stored ones, they are the chain.
    k = len(batch)
    links = np.empty((k, 65), np.uint8)
    links[:, 0] = 1
    links[0, 1:33] = np.frombuffer(chain, np.uint8)
    links[1:, 1:33] = np.frombuffer(stored_chain, np.uint8).reshape(k, 32)[:-1]
    links[:, 33:] = np.frombuffer(lhs, np.uint8).reshape(k, 32)
    if _merkle.digests(_merkle.rows(links.tobytes(), 65)) != stored_chain:
        return None
    return lhs, stored_chain


def _framed(lines: list[bytes], lo: int, hi: int) -> tuple[bytes, bytes] | None:
    """Records ``lo..hi-1`` (their seqs all of one width), if every line is exactly what
    :func:`record_line` writes and each leaf matches its stored leaf hash: their leaf hashes
    and their stored chain hashes, each 32 bytes, one after another. Else None.

    Every line starts with 83 bytes of one shape (``{"chain":"<64 hex>","leaf":``) and, the
    seq's width being fixed, ends with ``133 + 2*width`` bytes of one shape: the leaf's own
    seq and time, its end, the leaf hash and the line's seq. Those ends of all the lines are
    checked at once as the rows of two byte matrices; a line too short for either makes a
    matrix of the wrong size."""
    k, d = len(lines), len(str(lo))
    w = 133 + 2 * d
    if min(map(len, lines)) <= w + 83:  # the two ends would meet or overlap
        return None
    try:
        head = np.frombuffer(b"".join(map(_at(0, 83), lines)), np.uint8).reshape(k, 83)
        tail = np.frombuffer(b"".join(map(_at(-w, None), lines)), np.uint8).reshape(k, w)
    except ValueError:
        return None
    head_fixed, head_mask, tail_fixed, tail_mask = _shapes(d)
    # The fixed bytes, each end in one pass: a byte that differs where the mask is set.
    if ((head ^ head_fixed) & head_mask).any() or ((tail ^ tail_fixed) & tail_mask).any():
        return None
    seqs = _digits(lo, hi, d)
    if not (
        np.array_equal(tail[:, 7 : 7 + d], seqs)  # the leaf's seq
        and np.array_equal(tail[:, 131 + d : 131 + 2 * d], seqs)  # the line's
    ):
        return None
    chain_x = head[:, 10:74].tobytes()
    try:
        chains = unhexlify(chain_x)
    except binascii.Error:
        return None
    if hexlify(chains) != chain_x:  # hex, but not in lower case
        return None
    leaves = map(b"\x00".__add__, map(_at(83, -88 - d), lines))
    lhs = _merkle.digests(leaves)
    if hexlify(lhs) != tail[:, 59 + d : 123 + d].tobytes():
        return None  # a leaf or its hash changed, or the hash is not lower-case hex
    return lhs, chains


@functools.lru_cache(maxsize=16)
def _shapes(d: int) -> tuple[NDArray[np.uint8], ...]:
    """The fixed bytes of a record line's first 83 and last ``133 + 2*d`` bytes, and masks
    that are 0xff where a byte is fixed (``?`` marks hex, digits and the time, checked
    otherwise): head, head mask, tail, tail mask."""
    head = _P1 + b"?" * 64 + _P2
    tail = (b',"seq":' + b"?" * d + b',"time":"' + b"?" * 27 + b'"},"leaf_hash":"' + b"?" * 64) + (
        b'","seq":' + b"?" * d + b"}\n"
    )
    out = []
    for shape in (head, tail):
        row = np.frombuffer(shape, np.uint8)
        out += [row, np.where(row == ord("?"), 0, 0xFF).astype(np.uint8)]
    return tuple(out)


def _digits(lo: int, hi: int, d: int) -> NDArray[np.uint8]:
    """The numbers ``lo..hi-1``, all ``d`` digits long, as rows of ASCII digits."""
    n = np.arange(lo, hi, dtype=np.int64)
    out = np.empty((hi - lo, d), np.uint8)
    for j in range(d - 1, -1, -1):
        out[:, j] = n % 10 + 48
        n //= 10
    return out


def _same_width(start: int, end: int) -> Iterator[tuple[int, int]]:
    """``start..end`` cut where the numbers gain a digit."""
    while start < end:
        cut = min(end, 10 ** len(str(start)))
        yield start, cut
        start = cut


@functools.lru_cache(maxsize=64)
def _at(start: int, stop: int | None) -> Callable[[bytes], bytes]:
    return itemgetter(slice(start, stop))
