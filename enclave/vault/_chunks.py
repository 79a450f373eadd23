"""The encrypted file format of the vault: AES-256-GCM in fixed-size chunks.

A blob (one dataset file at rest) is::

    header   = b"SRVBLOB1" || chunk_size (u32, big-endian)                       12 bytes
    chunk_i  = nonce_i (12 random bytes) || AES-256-GCM(key, nonce_i, plaintext_i, aad_i)
    aad_i    = b"sealroom-chunk-v1\\0" || file_id (16 bytes) || i (u64 BE) || final (1 byte)

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the last holds the rest
(zero bytes for an empty file, so an empty file still has one authenticated chunk). The file id
is random per file and recorded in the (authenticated) manifest with the file's size, so the blob
length is known in advance: binding (file id, index, final flag) into each chunk's tag means a
chunk cannot be moved to another position or file, and the stream cannot be cut short or
extended, without a tag failing. Keys are per dataset version, so chunks of other datasets or
versions fail too. Nonces are random: one key encrypts one version once, far below the 2^32
messages a random 96-bit nonce allows.

Decryption is written for throughput: the ciphertext is memory-mapped (no read copy) and each
chunk is decrypted with ``AESGCM.decrypt_into`` straight into the caller's buffer (for staging,
a shared memory map of the tmpfs file), from several threads at once where the caller wants.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"SRVBLOB1"
HEADER = struct.Struct(">8sI")
HEADER_SIZE = HEADER.size
NONCE_SIZE = 12
TAG_SIZE = 16
FILE_ID_SIZE = 16
_AAD_PREFIX = b"sealroom-chunk-v1\0"
_AAD_TAIL = struct.Struct(">QB")

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20


class ChunkError(Exception):
    """A chunk failed to authenticate or the blob's shape is wrong (mapped by the caller to
    :class:`~policies.errors.IntegrityError` with the dataset and file named)."""

    def __init__(self, message: str, *, chunk: int | None) -> None:
        super().__init__(message)
        self.chunk = chunk


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a plaintext of ``size`` bytes takes (at least one)."""
    return max(1, -(-size // chunk_size))


def blob_size(size: int, chunk_size: int) -> int:
    """The exact length of the blob of a ``size``-byte plaintext."""
    return HEADER_SIZE + chunk_count(size, chunk_size) * (NONCE_SIZE + TAG_SIZE) + size


def chunk_aad(file_id: bytes, index: int, final: bool) -> bytes:
    return _AAD_PREFIX + file_id + _AAD_TAIL.pack(index, 1 if final else 0)


class ChunkWriter:
    """Encrypts a stream written to it in pieces of any size into ``out`` as a blob.

    It holds back one chunk so that it knows which chunk is the final one; call
    :meth:`finish` once at the end.
    """

    def __init__(self, aead: AESGCM, file_id: bytes, chunk_size: int, out: BinaryIO) -> None:
        self._aead = aead
        self._file_id = file_id
        self._chunk_size = chunk_size
        self._out = out
        self._pending = bytearray()
        self._index = 0
        out.write(HEADER.pack(MAGIC, chunk_size))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        cs = self._chunk_size
        # Strictly more than a chunk pending: the first chunk is known not to be the last.
        if len(self._pending) > cs:
            view = memoryview(self._pending)
            start = 0
            while len(self._pending) - start > cs:
                self._emit(view[start : start + cs], final=False)
                start += cs
            view.release()
            del self._pending[:start]

    def finish(self) -> None:
        self._emit(memoryview(self._pending), final=True)
        self._pending = bytearray()

    def _emit(self, plaintext: memoryview, *, final: bool) -> None:
        nonce = os.urandom(NONCE_SIZE)
        aad = chunk_aad(self._file_id, self._index, final)
        self._out.write(nonce)
        self._out.write(self._aead.encrypt(nonce, plaintext, aad))
        self._index += 1


class BlobReader:
    """A blob mapped read-only, its length and header checked against the manifest.

    Use as a context manager. :meth:`decrypt_range` may be called from several threads at once
    on disjoint chunk ranges (``AESGCM`` releases the GIL while it works).
    """

    def __init__(self, fd: int, *, file_id: bytes, size: int, chunk_size: int) -> None:
        expected = blob_size(size, chunk_size)
        actual = os.fstat(fd).st_size
        if actual != expected:
            raise ChunkError(
                f"blob is {actual} bytes, expected {expected} (truncated or extended)", chunk=None
            )
        self.file_id = file_id
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunk_count(size, chunk_size)
        self._mm = mmap.mmap(fd, expected, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)
        magic, cs = HEADER.unpack_from(self._view, 0)
        if magic != MAGIC or cs != chunk_size:
            self.close()
            raise ChunkError("blob header does not match the manifest", chunk=None)

    def close(self) -> None:
        self._view.release()
        self._mm.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunk_len(self, i: int) -> int:
        return self.chunk_size if i < self.chunks - 1 else self.size - i * self.chunk_size

    def decrypt_range(
        self, aead: AESGCM, start: int, stop: int, dest: memoryview, *, base: int = 0
    ) -> None:
        """Decrypt chunks ``start..stop-1`` into ``dest``, which holds the file from offset
        ``base`` on (``base=0``: ``dest`` is the whole file)."""
        cs = self.chunk_size
        blob = self._view
        for i in range(start, stop):
            offset = i * cs - base
            plen = self.chunk_len(i)
            pos = HEADER_SIZE + i * (NONCE_SIZE + TAG_SIZE + cs)
            with (
                blob[pos : pos + NONCE_SIZE] as nonce,
                blob[pos + NONCE_SIZE : pos + NONCE_SIZE + plen + TAG_SIZE] as data,
                dest[offset : offset + plen] as target,
            ):
                aad = chunk_aad(self.file_id, i, i == self.chunks - 1)
                try:
                    aead.decrypt_into(nonce, data, aad, target)
                except InvalidTag:
                    raise ChunkError("chunk does not authenticate", chunk=i) from None

    def decrypt_each(self, aead: AESGCM, sink: Callable[[int, memoryview], None]) -> None:
        """Decrypt chunk by chunk into one reused buffer, handing each to ``sink(offset, view)``
        (valid only during the call); nothing is handed on from a chunk that failed."""
        with memoryview(bytearray(min(self.size, self.chunk_size))) as view:
            for i in range(self.chunks):
                self.decrypt_range(aead, i, i + 1, view, base=i * self.chunk_size)
                with view[: self.chunk_len(i)] as out:
                    sink(i * self.chunk_size, out)
