"""Labelled examples for the ``classification`` trainer, and what its release is.

Torch-free, and used on both sides: the trainer reads its examples with
:func:`read_examples`; the site, which must know the release's layout before it reads the
job's output, applies the same :func:`labelled_file` filter and :func:`read_examples` to the
dataset's plaintext when the labels are not fixed by the hyperparameters, and gets the
layout and the ``config.json`` it writes into the release from :func:`released_layout` and
:func:`release_config`. The trainer builds its model from that same config.

Files: ``*.jsonl`` (one ``{"text": ..., "label": ...}`` object a line; blank lines skipped)
and ``*.csv`` (a header row with ``text`` and ``label`` columns). A label is a string or an
integer (stored as its decimal text). Discovered labels are sorted, numerically when every
label is an integer, else by code point. Error messages name the file and line, never a
text or a label: labels are data, and so the release names discovered classes ``LABEL_<i>``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from trainers.errors import ConfigError, DataError
from trainers.hparams import MAX_LABELS, PREFIX, ClassificationHyperparameters
from trainers.lora import read_config, require_family
from trainers.weights import TensorLayout, tensor_layout

SUFFIXES = (".jsonl", ".csv")
MAX_TEXT_CHARS = 1_000_000
_INTEGER = re.compile(r"-?[0-9]{1,18}")

Example = tuple[str, str]
"""(text, label)."""


def labelled_file(relpath: str) -> bool:
    """Whether a dataset file (path relative to the dataset) holds labelled examples: the
    right suffix and no hidden component."""
    parts = PurePosixPath(relpath).parts
    return bool(parts) and not any(p.startswith(".") for p in parts) and relpath.endswith(SUFFIXES)


def find_labelled_files(dirs: Sequence[Path]) -> list[tuple[str, Path]]:
    """Every labelled file under ``dirs`` as (path relative to its dataset, path), in a stable
    order; links to directories are not followed. Raises :class:`DataError` when there are
    none."""
    found: list[tuple[str, Path]] = []
    for top in dirs:
        for here, subdirs, names in os.walk(top, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for n in sorted(names):
                path = Path(here) / n
                relpath = path.relative_to(top).as_posix()
                if labelled_file(relpath):
                    found.append((relpath, path))
    if not found:
        listed = ", ".join(d.name for d in dirs) or "(none)"
        raise DataError(f"no {'/'.join(SUFFIXES)} files in the datasets: {listed}")
    return found


def _label(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: label must be a string or an integer")
    text = str(value)
    if not text or len(text) > 256:
        raise DataError(f"{where}: label is empty or longer than 256 characters")
    return text


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: text must be a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: text is longer than {MAX_TEXT_CHARS} characters")
    return value


def parse_file(name: str, data: bytes) -> list[Example]:
    """The examples of one file. Raises :class:`DataError` naming ``name`` and the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from e
    examples: list[Example] = []
    if name.endswith(".jsonl"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{name} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where}: not a JSON object") from None
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise DataError(f"{where}: expected an object with 'text' and 'label'")
            examples.append((_text(obj["text"], where), _label(obj["label"], where)))
    elif name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{name}: the header must have 'text' and 'label' columns")
        try:
            for row in reader:
                where = f"{name} line {reader.line_num}"
                examples.append((_text(row["text"], where), _label(row["label"], where)))
        except csv.Error as e:
            raise DataError(f"{name} line {reader.line_num}: malformed CSV") from e
    else:
        raise DataError(f"{name}: not a {'/'.join(SUFFIXES)} file")
    return examples


def read_examples(files: Iterable[tuple[str, bytes]]) -> list[Example]:
    """Every example of ``files`` (name, content), in the order given."""
    out: list[Example] = []
    for name, data in files:
        out.extend(parse_file(name, data))
    return out


def discover_labels(examples: Iterable[Example]) -> tuple[str, ...]:
    """The distinct labels, sorted: numerically if all are integers, else by code point."""
    labels = {label for _, label in examples}
    if labels and all(_INTEGER.fullmatch(x) for x in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def resolve_labels(
    hp: ClassificationHyperparameters, examples: Sequence[Example]
) -> tuple[str, ...]:
    """The classes in index order: ``hp.labels`` when given (every example's label must be one
    of them), else :func:`discover_labels`. Raises :class:`DataError` for fewer than two
    classes or labels outside the given ones (counted, never shown)."""
    if not examples:
        raise DataError("the datasets hold no labelled examples")
    given = hp.label_names
    if given is not None:
        known = set(given)
        outside = sum(1 for _, label in examples if label not in known)
        if outside:
            raise DataError(f"{outside} example(s) have a label that {PREFIX}.labels does not list")
        return given
    labels = discover_labels(examples)
    if not 2 <= len(labels) <= MAX_LABELS:
        raise DataError(f"the data has {len(labels)} distinct labels; 2 to {MAX_LABELS} needed")
    return labels


def release_label_names(hp: ClassificationHyperparameters, num_labels: int) -> tuple[str, ...]:
    """The class names the release carries: the team's own, or ``LABEL_<i>``."""
    given = hp.label_names
    if given is not None:
        return given
    return tuple(f"LABEL_{i}" for i in range(num_labels))


# --- the release ------------------------------------------------------------------------------

BACKBONE = "model"
HEAD = "score.weight"
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
}


def _pad_id(config: dict[str, Any]) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ConfigError("model", "the base model declares neither a pad nor an end-of-text token")


def released_layout(model_dir: Path, num_labels: int) -> TensorLayout:
    """The tensors the trainer writes: the base model's backbone (its ``model.*`` tensors, in
    their base dtypes; the language-model head is dropped) and the new head ``score.weight``
    (``[num_labels, hidden_size]``, in the embedding's dtype). Raises :class:`ConfigError`."""
    config = read_config(model_dir)
    require_family(config, trainer="classification")
    hidden = config.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ConfigError("model", "the base model's config.json has no hidden_size")
    base = tensor_layout(model_dir)
    backbone = {n: spec for n, spec in base.items() if n.startswith(f"{BACKBONE}.")}
    embed = backbone.get(f"{BACKBONE}.embed_tokens.weight")
    if embed is None:
        raise ConfigError("model", f"the base model stores no {BACKBONE}.embed_tokens.weight")
    return {**backbone, HEAD: (embed[0], (num_labels, hidden))}


def release_config(model_dir: Path, label_names: Sequence[str]) -> dict[str, Any]:
    """The ``config.json`` of the release: the base model's config as a sequence classifier
    over ``label_names``. The trainer trains under exactly this config."""
    config = read_config(model_dir)
    model_type = require_family(config, trainer="classification")
    out = dict(config)
    out.pop("_name_or_path", None)
    out.update(
        {
            "architectures": [ARCHITECTURES[model_type]],
            "id2label": {str(i): name for i, name in enumerate(label_names)},
            "label2id": {name: i for i, name in enumerate(label_names)},
            "problem_type": "single_label_classification",
            "pad_token_id": _pad_id(config),
        }
    )
    return out


def release_config_bytes(model_dir: Path, label_names: Sequence[str]) -> bytes:
    """:func:`release_config` as the canonical bytes the site writes into the release."""
    text = json.dumps(release_config(model_dir, label_names), sort_keys=True, indent=2)
    return (text + "\n").encode("utf-8")
