"""The site's base model store: Hugging Face-format directories registered by the operator.

A registered model is copied into the store (atomically: a half-copied model never appears),
hashed file by file, and its tensor layout recorded; jobs get it mounted read-only at
``/model/base``. Before each mount the store re-hashes the directory, so a model edited on
disk after registration is refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from policies.errors import AlreadyExists, IntegrityError, InvalidInput, NotFound
from policies.spec import NAME_RE
from trainers.weights import TensorLayout, tensor_layout

REQUIRED_FILES = ("config.json",)
INFO_FILE = ".sealroom-model.json"


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: Path
    sha256: str
    layout: TensorLayout


def directory_hash(path: Path) -> str:
    """SHA-256 over the sorted (relative path, file SHA-256) pairs of a directory's files."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != INFO_FILE):
        if f.is_symlink():
            raise InvalidInput(f"{f} is a symbolic link; a model directory holds real files")
        fh = hashlib.sha256()
        with f.open("rb") as fp:
            while chunk := fp.read(1 << 20):
                fh.update(chunk)
        h.update(f"{f.relative_to(path).as_posix()}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def register(self, name: str, source: Path) -> BaseModel:
        """Copy ``source`` into the store as ``name``. Raises InvalidInput, AlreadyExists."""
        if not NAME_RE.match(name):
            raise InvalidInput(f"model name {name!r}: use lowercase letters, digits, . _ -")
        if not source.is_dir():
            raise InvalidInput(f"{source} is not a directory")
        for required in REQUIRED_FILES:
            if not (source / required).is_file():
                raise InvalidInput(f"{source} has no {required}: not a Hugging Face model")
        dest = self.root / name
        if dest.exists():
            raise AlreadyExists(f"base model {name} is already registered")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copytree(source, tmp, symlinks=True)
            # The job's uid must read the model; safetensors writes files 0600.
            for p in [tmp, *tmp.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            layout = tensor_layout(tmp)
            digest = directory_hash(tmp)
            (tmp / INFO_FILE).write_text(json.dumps({"name": name, "sha256": digest}))
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return BaseModel(name=name, path=dest, sha256=digest, layout=layout)

    def get(self, name: str, *, verify: bool = True) -> BaseModel:
        """A registered model; with ``verify`` its files are re-hashed against registration."""
        path = self.root / name
        info_file = path / INFO_FILE
        if not NAME_RE.match(name) or not info_file.is_file():
            raise NotFound(f"no base model {name!r} in this site")
        info = json.loads(info_file.read_text())
        if verify:
            actual = directory_hash(path)
            if actual != info["sha256"]:
                raise IntegrityError(
                    f"base model {name} changed on disk since registration: "
                    f"expected {info['sha256']}, found {actual}"
                )
        return BaseModel(name=name, path=path, sha256=info["sha256"], layout=tensor_layout(path))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / INFO_FILE).is_file())
