"""The gateway's bundle store: each job's code bundle kept once under ``bundles/``, named by its
SHA-256, from submission until the site runs it. A bundle is written under a temporary name and
renamed into place, so a reader never sees a partial one.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in blocks (a bundle or a release can be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BundleStore:
    """Bundles by content under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.tar.gz"

    def put(self, src: Path, *, sha256: str, tag: str, move: bool) -> None:
        """Keep ``src`` (whose hash is ``sha256``) unless the same bundle is already kept;
        ``move`` takes the file itself (the servicer's own spool), else it is copied. ``tag``
        makes the temporary name unique to the caller (the job's id)."""
        dest = self.path(sha256)
        if dest.exists():
            return
        tmp = dest.with_suffix(f".{tag}.tmp")
        if move:
            src.replace(tmp)
        else:
            shutil.copyfile(src, tmp)
        tmp.replace(dest)
