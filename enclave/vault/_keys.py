"""Site keys and the wrapping of per-version data keys, with crash-safe rotation on disk.

Each dataset version has a random 256-bit data key. It is stored only wrapped: AES-256-GCM under
the site key, with associated data binding it to the dataset name, the version number and the
SHA-256 of the version's manifest. Unwrapping therefore also authenticates the manifest (file
list, sizes, hashes, blob ids): an edited manifest or a key file moved to another version does
not unwrap.

A version's ``key.json`` holds one wrap per site key id. Rotation (see :class:`KeyRing`) writes
the new site key to ``<site key>.next`` first, adds a wrap under it to every ``key.json``, then
renames ``.next`` over the site key (the commit point) and finally drops the old wraps. Every
write is a write-to-temp, fsync, rename, fsync-directory (:mod:`enclave.secretfile`); at every
instant each ``key.json`` holds a wrap under a key that a freshly opened vault loads, so a crash
anywhere leaves every dataset readable, and running the rotation again finishes it.

Key files are created mode 0600 and refused, fail closed, when they are readable or writable by
anyone but the agent's user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.secretfile import read_secret, write_secret
from policies.errors import IntegrityError, SiteError

SITE_KEY_FORMAT = "sealroom-site-key-v1"
DEK_FORMAT = "sealroom-vault-dek-v1"
_WRAP_DOMAIN = b"sealroom-vault-dek-v1\0"
KEY_BYTES = 32


@dataclass(frozen=True)
class SiteKey:
    """A site key and its id (random, public: it only says which key wrapped what)."""

    key_id: str
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SiteKey(key_id={self.key_id!r})"


def new_site_key() -> SiteKey:
    return SiteKey(key_id=secrets.token_hex(8), key=AESGCM.generate_key(bit_length=256))


def save_site_key(path: Path, key: SiteKey) -> None:
    body = {
        "format": SITE_KEY_FORMAT,
        "key_id": key.key_id,
        "key": base64.b64encode(key.key).decode("ascii"),
    }
    write_secret(path, json.dumps(body, sort_keys=True).encode("utf-8"))


def load_site_key(path: Path) -> SiteKey:
    raw = read_secret(path)
    try:
        body = json.loads(raw)
        if body.get("format") != SITE_KEY_FORMAT:
            raise ValueError(f"format is {body.get('format')!r}")
        key = base64.b64decode(body["key"], validate=True)
        key_id = body["key_id"]
        if not isinstance(key_id, str) or len(key) != KEY_BYTES:
            raise ValueError("bad key id or key length")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise SiteError(f"site key file {path} is malformed: {e}") from e
    return SiteKey(key_id=key_id, key=key)


def _wrap_aad(name: str, version: int, manifest: bytes) -> bytes:
    return (
        _WRAP_DOMAIN
        + name.encode("utf-8")
        + b"\0"
        + str(version).encode("ascii")
        + b"\0"
        + hashlib.sha256(manifest).digest()
    )


def wrap(site: SiteKey, dek: bytes, *, name: str, version: int, manifest: bytes) -> dict[str, str]:
    nonce = os.urandom(12)
    ct = AESGCM(site.key).encrypt(nonce, dek, _wrap_aad(name, version, manifest))
    return {
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "wrapped": base64.b64encode(ct).decode("ascii"),
    }


class KeyRing:
    """The site keys this vault can use: the current one and, during a rotation, the next one."""

    def __init__(self, site_key_path: Path) -> None:
        self.path = site_key_path
        self.next_path = site_key_path.with_name(site_key_path.name + ".next")
        self.reload()

    def reload(self) -> None:
        self.current = load_site_key(self.path)
        self.pending: SiteKey | None = (
            load_site_key(self.next_path) if self.next_path.exists() else None
        )

    @property
    def keys(self) -> dict[str, SiteKey]:
        keys = {self.current.key_id: self.current}
        if self.pending is not None:
            keys[self.pending.key_id] = self.pending
        return keys

    @staticmethod
    def create(site_key_path: Path) -> None:
        save_site_key(site_key_path, new_site_key())

    # -- data key files -----------------------------------------------------------------------

    def new_key_file(self, dek: bytes, *, name: str, version: int, manifest: bytes) -> bytes:
        """The content of a new ``key.json`` wrapping ``dek`` under every loaded site key."""
        wraps = {
            kid: wrap(k, dek, name=name, version=version, manifest=manifest)
            for kid, k in self.keys.items()
        }
        return _dump_key_file(wraps)

    def unwrap(self, key_file: Path, *, name: str, version: int, manifest: bytes) -> bytes:
        """The data key of ``name@vN``; raises :class:`IntegrityError` when no wrap opens."""
        wraps = _read_key_file(key_file, ref=f"{name}@v{version}")
        aad = _wrap_aad(name, version, manifest)
        usable = [kid for kid in wraps if kid in self.keys]
        if not usable:
            raise IntegrityError(
                f"dataset {name}@v{version}: its data key is wrapped under site key(s) "
                f"{sorted(wraps)} but this site holds {sorted(self.keys)}"
            )
        for kid in usable:
            w = wraps[kid]
            try:
                dek = AESGCM(self.keys[kid].key).decrypt(w["nonce"], w["wrapped"], aad)
            except InvalidTag:
                continue
            if len(dek) == KEY_BYTES:
                return dek
        raise IntegrityError(
            f"dataset {name}@v{version}: the data key does not unwrap; the manifest or the key "
            "file was altered or moved"
        )

    def add_wrap(
        self, key_file: Path, new: SiteKey, *, name: str, version: int, manifest: bytes
    ) -> None:
        """Add a wrap under ``new`` to ``key_file`` (no-op when present), atomically."""
        wraps = _read_key_file(key_file, ref=f"{name}@v{version}")
        if new.key_id in wraps:
            return
        dek = self.unwrap(key_file, name=name, version=version, manifest=manifest)
        out = {kid: _encode_wrap(w) for kid, w in wraps.items()}
        out[new.key_id] = wrap(new, dek, name=name, version=version, manifest=manifest)
        write_secret(key_file, _dump_key_file(out))

    def keep_only(self, key_file: Path, key_id: str, *, ref: str) -> None:
        """Drop every wrap but the one under ``key_id``, atomically (no-op when already so)."""
        wraps = _read_key_file(key_file, ref=ref)
        if key_id not in wraps:
            raise IntegrityError(f"dataset {ref}: no wrap under site key {key_id} to keep")
        if set(wraps) == {key_id}:
            return
        write_secret(key_file, _dump_key_file({key_id: _encode_wrap(wraps[key_id])}))


def _encode_wrap(w: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in w.items()}


def _dump_key_file(wraps: dict[str, dict[str, str]]) -> bytes:
    return json.dumps({"format": DEK_FORMAT, "wraps": wraps}, sort_keys=True).encode("utf-8")


def _read_key_file(path: Path, *, ref: str) -> dict[str, dict[str, bytes]]:
    try:
        raw = read_secret(path)
    except FileNotFoundError as e:
        raise IntegrityError(f"dataset {ref}: its key file is missing") from e
    try:
        body = json.loads(raw)
        if body.get("format") != DEK_FORMAT:
            raise ValueError(f"format is {body.get('format')!r}")
        out: dict[str, dict[str, bytes]] = {}
        for kid, w in body["wraps"].items():
            out[str(kid)] = {
                "nonce": base64.b64decode(w["nonce"], validate=True),
                "wrapped": base64.b64decode(w["wrapped"], validate=True),
            }
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise IntegrityError(f"dataset {ref}: key file is malformed: {e}") from e
    return out
