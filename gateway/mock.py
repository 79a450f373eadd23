"""Mock datasets: a generated sample with the shape of the real data and none of its content.

A data owner publishes a mock so that model teams can run their job end to end before they
submit, without approval and without seeing the data. :func:`generate_mock` writes one from the
real directory on the owner's side: the same relative paths, and per file the same structure —
text of about the same length made of generated sentences, JSON lines with the same keys and
value types, CSV with the same header and column kinds — with every string replaced. Numbers
and booleans are drawn again from the column's observed range; labels (a string column with
few distinct values) are replaced by stand-ins ``label-0``, ``label-1``... so the class count
survives. :func:`check_mock_shape` is what the gateway checks on publication: the mock's file
paths are exactly the dataset version's (a mock may not add or omit a file).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from policies.errors import InvalidInput
from trainers.synthetic import document

MAX_LABELS = 64


def generate_mock(src: Path, dest: Path, *, seed: int = 0) -> list[str]:
    """Write a mock of the directory ``src`` into ``dest`` (created); return its relative paths.

    Raises :class:`InvalidInput` when ``src`` is not a directory, holds a link, or ``dest``
    exists."""
    if not src.is_dir():
        raise InvalidInput(f"{src} is not a directory")
    if dest.exists():
        raise InvalidInput(f"{dest} already exists: a mock is written into a new directory")
    files = sorted(p for p in src.rglob("*") if not p.is_dir())
    for p in files:
        if p.is_symlink() or not p.is_file():
            raise InvalidInput(f"{p} is not a regular file")
    rng = random.Random(seed)
    out: list[str] = []
    for p in files:
        rel = p.relative_to(src).as_posix()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = p.read_bytes()
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            target.write_text(_mock_jsonl(data.decode("utf-8"), rng))
        elif suffix == ".csv":
            target.write_text(_mock_csv(data.decode("utf-8"), rng))
        else:
            target.write_text(_text_like(len(data), rng))
        out.append(rel)
    return out


def check_mock_shape(mock_paths: Iterable[str], dataset_paths: Iterable[str]) -> None:
    """Raise :class:`InvalidInput` naming what differs unless the paths are the same sets."""
    mock, real = set(mock_paths), set(dataset_paths)
    if mock == real:
        return
    extra, missing = sorted(mock - real), sorted(real - mock)
    parts = []
    if extra:
        parts.append(f"{len(extra)} file(s) not in the dataset, e.g. {extra[0]!r}")
    if missing:
        parts.append(f"{len(missing)} dataset file(s) missing, e.g. {missing[0]!r}")
    raise InvalidInput("the mock does not have the dataset's shape: " + "; ".join(parts))


def _text_like(size: int, rng: random.Random) -> str:
    out = ""
    while len(out) < size:
        out += document(seed=rng.randrange(1 << 30), chapters=1) + "\n"
    return out[: max(size, 1)]


class _Column:
    """What was seen in one field: its kinds, numeric range and distinct strings."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.lo = float("inf")
        self.hi = float("-inf")
        self.strings: dict[str, int] = {}
        self.length = 0

    def see(self, v: Any) -> None:
        if isinstance(v, bool):
            self.kinds.add("bool")
        elif isinstance(v, int | float):
            self.kinds.add("int" if isinstance(v, int) else "float")
            self.lo, self.hi = min(self.lo, v), max(self.hi, v)
        elif isinstance(v, str):
            self.kinds.add("str")
            self.length = max(self.length, len(v))
            if len(self.strings) <= MAX_LABELS:
                self.strings.setdefault(v, len(self.strings))
        else:
            self.kinds.add("other")

    def labels(self) -> bool:
        return self.kinds == {"str"} and 0 < len(self.strings) <= min(MAX_LABELS, 16)

    def draw(self, v: Any, rng: random.Random) -> Any:
        if isinstance(v, bool):
            return rng.random() < 0.5
        if isinstance(v, int):
            return rng.randint(int(self.lo), int(self.hi))
        if isinstance(v, float):
            return round(rng.uniform(self.lo, self.hi), 6)
        if isinstance(v, str):
            if self.labels():
                return f"label-{rng.randrange(len(self.strings))}"
            return _text_like(max(8, len(v)), rng).replace("\n", " ")[: max(8, len(v))]
        return None


def _mock_jsonl(text: str, rng: random.Random) -> str:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise InvalidInput("a JSON lines file must hold one object per line")
    cols: dict[str, _Column] = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault(k, _Column()).see(v)
    lines = [json.dumps({k: cols[k].draw(v, rng) for k, v in r.items()}) for r in rows]
    return "\n".join(lines) + ("\n" if lines else "")


def _cell(v: str) -> Any:
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _mock_csv(text: str, rng: random.Random) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return ""
    header, body = rows[0], [[_cell(c) for c in r] for r in rows[1:]]
    cols = [_Column() for _ in header]
    for r in body:
        for c, v in zip(cols, r, strict=False):
            c.see(v)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in body:
        w.writerow([c.draw(v, rng) for c, v in zip(cols, r, strict=False)])
    return buf.getvalue()
