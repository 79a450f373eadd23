"""The primitives of secure aggregation, each from a maintained library: X25519 key agreement
and HKDF-SHA256 (``cryptography``), AES-256-GCM for the shares one site sends another through
the gateway, AES-256-CTR as the mask generator, and Shamir sharing over GF(2^128)
(pycryptodome's ``Crypto.Protocol.SecretSharing``). Nothing here is a new construction; what is
ours is how they are keyed and bound to a round.

Splitting a 32-byte secret into two 16-byte Shamir chunks follows Flower's
``flwr.common.secure_aggregation.crypto.shamir`` (Apache-2.0, Flower Labs GmbH), without its
padding: every secret shared here is exactly 32 bytes, so a wrong combination is caught by the
caller's commitment check instead of by unpadding.
"""

from __future__ import annotations

import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from policies.errors import IntegrityError

SECRET_BYTES = 32
_RAW = serialization.Encoding.Raw


def new_secret() -> bytes:
    """32 bytes from the operating system's CSPRNG (a self-mask seed)."""
    return os.urandom(SECRET_BYTES)


def new_private_key() -> bytes:
    """A fresh X25519 private key, as its 32 raw bytes (the form that is Shamir-shared)."""
    return X25519PrivateKey.generate().private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key(private: bytes) -> bytes:
    """The 32 raw bytes of the X25519 public key of ``private``."""
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(_RAW, serialization.PublicFormat.Raw)
    )


def agree(private: bytes, peer_public: bytes, *, context: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: X25519, then HKDF-SHA256 bound to the round
    (``context``) and to what the key is for (``purpose``), so no key serves two jobs."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as e:  # a low-order point gives an all-zero secret; refuse it
        raise IntegrityError(f"secure aggregation: a public key is unusable ({e})") from e
    return HKDF(hashes.SHA256(), 32, salt=context, info=purpose).derive(shared)


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """AES-256-GCM under a fresh 96-bit nonce, the nonce in front."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, *, aad: bytes, what: str) -> bytes:
    """Open what :func:`seal` made; raise :class:`IntegrityError` naming ``what`` when it was
    altered, addressed to someone else, or sealed under another key."""
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError) as e:
        raise IntegrityError(f"secure aggregation: {what} does not open") from e


def mask(seed: bytes, count: int) -> np.ndarray:
    """``count`` uniform 64-bit words: the AES-256-CTR keystream of ``seed`` (all 256 bits of it
    key the cipher, unlike a 32-bit generator seed)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").copy()


def split(secret: bytes, *, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret, one per holder numbered 1..``holders``: any
    ``threshold`` of them give the secret back, fewer give nothing about it. Each share is the
    holder's number (one byte) and its share of each 16-byte half."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("only 32-byte secrets are shared")
    if not 1 <= threshold <= holders <= 255:
        raise ValueError(f"bad sharing: {threshold} of {holders}")
    halves = [Shamir.split(threshold, holders, secret[i : i + 16]) for i in (0, 16)]
    return [bytes([i + 1]) + halves[0][i][1] + halves[1][i][1] for i in range(holders)]


def combine(shares: list[bytes]) -> bytes:
    """The secret of ``shares`` (at least the threshold, from distinct holders). Too few give a
    wrong secret, not an error: the caller checks it against a commitment."""
    if any(len(s) != 1 + SECRET_BYTES for s in shares) or len({s[0] for s in shares}) != len(
        shares
    ):
        raise IntegrityError("secure aggregation: malformed or repeated shares")
    return b"".join(Shamir.combine([(s[0], s[1 + i : 17 + i]) for s in shares]) for i in (0, 16))
