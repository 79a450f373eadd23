"""The site's own secrets and the job logs sealed with one of them.

:func:`site_secret` keeps a 256-bit key in a file only the agent reads, created once on first
use (agents racing for it get the same key): the log key and the instance id come from it.
A job's stdout and stderr can carry data, so they are kept sealed like the vault's files
(AES-GCM under the site's log key, the job id as associated data): :func:`seal_logs` writes them
once, :func:`open_logs` reads them back for the owners.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.secretfile import ensure_secret
from policies.errors import SiteError

LOG_FILE = "logs.sealed"


def site_secret(path: Path) -> bytes:
    """A 256-bit key kept in a file only the agent reads (created on first use, once: racing
    agents get the same key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ensure_secret(path, lambda: AESGCM.generate_key(bit_length=256))
    if len(key) != 32:
        raise SiteError(f"{path} is not a 256-bit key")
    return key


def seal_logs(key: bytes, job_id: str, run_dir: Path, data: bytes) -> None:
    """Write the run's logs, sealed, into ``run_dir`` (once: never overwritten)."""
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, data, job_id.encode())
    fd = os.open(run_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(sealed)


def open_logs(key: bytes, job_id: str, run_dir: Path) -> bytes:
    """The run's logs kept in ``run_dir`` (empty when it kept none)."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return b""
    blob = path.read_bytes()
    return AESGCM(key).decrypt(blob[:12], blob[12:], job_id.encode())
