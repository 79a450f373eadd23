"""Where a run reads and writes: the container paths of :mod:`trainers.contract`, movable as a
whole under one root so that the harness runs bare on a host (tests, benchmarks) exactly as it
runs in the container.

Torch-free. :class:`Paths` is the mount layout; :class:`RunContext` is what one trainer run gets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from trainers import contract
from trainers.contract import DPParameters
from trainers.errors import ConfigError, DataError

ROOT_ENV = "SEALROOM_ROOT"
"""When set, every contract path is taken under this directory instead of ``/``."""

TEXT_SUFFIXES = (".txt",)

_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _under(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


@dataclass(frozen=True)
class Paths:
    """The mount points a run uses."""

    data: Path
    model: Path
    output: Path
    tmp: Path

    @classmethod
    def under(cls, root: Path) -> Paths:
        """The contract's layout with ``root`` in place of ``/``."""
        return cls(
            data=_under(root, contract.DATA_DIR),
            model=_under(root, contract.MODEL_DIR),
            output=_under(root, contract.OUTPUT_DIR),
            tmp=root / "tmp",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Paths:
        root = environ.get(ROOT_ENV)
        return cls.under(Path(root)) if root else cls.under(Path("/"))

    @property
    def start_weights(self) -> Path:
        """Where a federated round's starting weights are mounted."""
        return self.model.parent / contract.START_WEIGHTS.relative_to(contract.MODEL_DIR.parent)

    @property
    def weights_dir(self) -> Path:
        return self.output / contract.WEIGHTS_DIR.relative_to(contract.OUTPUT_DIR)

    @property
    def metrics_file(self) -> Path:
        return self.output / contract.METRICS_FILE.relative_to(contract.OUTPUT_DIR)

    @property
    def progress_file(self) -> Path:
        return self.output / contract.PROGRESS_FILE.relative_to(contract.OUTPUT_DIR)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / contract.CHECKPOINT_DIR.relative_to(contract.OUTPUT_DIR)

    def dataset(self, name: str, *, index: int) -> Path:
        """The mounted directory of dataset ``name``. Raises :class:`ConfigError` naming
        ``datasets[index]`` for a name that is not one plain path component or is not mounted."""
        where = f"datasets[{index}]"
        if not _DATASET_NAME.fullmatch(name) or name in {".", ".."}:
            raise ConfigError(where, f"{name!r} is not a valid dataset name")
        path = self.data / name
        if not path.is_dir():
            raise ConfigError(where, f"dataset {name!r} is not mounted")
        return path


@dataclass(frozen=True)
class RunContext:
    """What one trainer run reads and writes. ``checkpoint_dir`` (never released) holds the
    built-in trainers' resume checkpoint; None where a run has nowhere to keep one."""

    job_id: str
    dataset_dirs: tuple[Path, ...]
    model_dir: Path
    weights_file: Path
    progress_file: Path
    scratch_dir: Path
    checkpoint_dir: Path | None = None
    dp: DPParameters | None = None
    """The site's DP-SGD parameters for this run (see :class:`trainers.contract.JobConfig`)."""
    start_weights: Path | None = None
    """A federated round's starting weights (:data:`trainers.contract.START_WEIGHTS`)."""
    proximal_mu: float | None = None
    """FedProx: each step pulls the trained tensors back towards ``start_weights``."""


def find_text_files(dirs: Sequence[Path]) -> list[Path]:
    """Every ``*.txt`` file under ``dirs``, in a stable order (dataset order, then path order).

    Hidden files and directories are skipped and symlinked directories are not followed.
    Raises :class:`DataError` when there are none.
    """
    found: list[Path] = []
    for top in dirs:
        for here, subdirs, names in os.walk(top, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            found.extend(
                Path(here) / n
                for n in sorted(names)
                if not n.startswith(".") and n.endswith(TEXT_SUFFIXES)
            )
    if not found:
        listed = ", ".join(d.name for d in dirs) or "(none)"
        raise DataError(f"no {'/'.join(TEXT_SUFFIXES)} files in the datasets: {listed}")
    return found
