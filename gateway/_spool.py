"""An upload spooled to disk sealed: AES-256-GCM under a key that lives only in this process.

A dataset arrives in chunks before the site's vault can encrypt it for good; spooling it in the
clear would put the owner's plaintext on the gateway's disk, where deleting the file later does
not erase it. :class:`SealedSpool` encrypts each 1 MiB block as it is written (nonce: the block's
index; associated data: the index and whether it is the last block, so blocks cannot be
reordered, dropped or cut off at the end) and hashes the plaintext on the way, so the caller gets
the upload's SHA-256 without reading it back. :meth:`SealedSpool.reader` streams the plaintext
back once for the vault. The key dies with the object: what stays on disk after a crash is
ciphertext nobody can open.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from policies.errors import InvalidInput, SealroomError

BLOCK = 1 << 20
_LEN = struct.Struct("<I")


def _aad(index: int, last: bool) -> bytes:
    return struct.pack("<Q?", index, last)


class SealedSpool:
    """Write plaintext in, read it back, nothing readable on disk. Not thread-safe. Use as a
    context manager: leaving it removes the file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f".spool-{os.urandom(8).hex()}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._pending = bytearray()
        self._blocks = 0
        self._hash = hashlib.sha256()
        self.size = 0
        self._sealed = False

    def __enter__(self) -> SealedSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        if self._sealed:
            raise SealroomError("the spool is sealed: nothing more can be written")
        self.size += len(data)
        self._hash.update(data)
        self._pending += data
        while len(self._pending) > BLOCK:  # keep a block back: the last one is marked as such
            self._put(bytes(self._pending[:BLOCK]), last=False)
            del self._pending[:BLOCK]

    def seal(self) -> str:
        """End the upload; returns the plaintext's SHA-256 (hex). Idempotent."""
        if not self._sealed:
            self._put(bytes(self._pending), last=True)
            self._pending.clear()
            os.fsync(self._fd)
            os.close(self._fd)
            self._sealed = True
        return self._hash.hexdigest()

    @property
    def sha256(self) -> str:
        return self.seal()

    def _put(self, block: bytes, *, last: bool) -> None:
        nonce = self._blocks.to_bytes(12, "little")
        sealed = self._aead.encrypt(nonce, block, _aad(self._blocks, last))
        os.write(self._fd, _LEN.pack(len(sealed)) + sealed)
        self._blocks += 1

    def reader(self) -> io.BufferedReader:
        """The plaintext as a stream. Raises :class:`InvalidInput` while reading if the file
        was changed on disk (a block fails its tag, is missing, or the end was cut off)."""
        self.seal()
        return io.BufferedReader(_Reader(self.path, self._aead, self._blocks), BLOCK)

    def close(self) -> None:
        if not self._sealed:
            os.close(self._fd)
            self._sealed = True
        self.path.unlink(missing_ok=True)


class _Reader(io.RawIOBase):
    def __init__(self, path: Path, aead: AESGCM, blocks: int) -> None:
        self._f = path.open("rb")
        self._aead = aead
        self._blocks = blocks
        self._index = 0
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf and self._index < self._blocks:
            self._buf = self._next()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _next(self) -> bytes:
        head = self._f.read(_LEN.size)
        sealed = self._f.read(_LEN.unpack(head)[0]) if len(head) == _LEN.size else b""
        i = self._index
        try:
            block = self._aead.decrypt(
                i.to_bytes(12, "little"), sealed, _aad(i, i == self._blocks - 1)
            )
        except InvalidTag as e:
            raise InvalidInput(f"the spooled upload was changed on disk (block {i})") from e
        self._index += 1
        return block

    def close(self) -> None:
        self._f.close()
        super().close()
