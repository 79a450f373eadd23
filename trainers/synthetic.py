"""Deterministic, generated "book-like" English text for demos, tests and mock datasets.

Nothing is downloaded: sentences come from small word lists and templates, driven by a seeded
:class:`random.Random`, so the same ``seed`` gives byte-identical text on every machine and
Python version (``Random.choice`` and ``randint`` are stable across versions since 3.2).
"""

from __future__ import annotations

import random
from pathlib import Path

_NAMES = (
    "Ada", "Tomas", "Mirela", "Hugo", "Ines", "Oskar", "Lena", "Marek", "Sofia", "Yusuf",
    "Clara", "Bruno", "Nadia", "Felix", "Ilse", "Jonas",
)  # fmt: skip
_ROLES = (
    "the miller", "the old captain", "the baker's daughter", "the village clerk",
    "the ferryman", "the young doctor", "the widow", "the schoolmaster", "the stranger",
)  # fmt: skip
_PLACES = (
    "the harbour", "the mill", "the north road", "the market square", "the chapel",
    "the orchard", "the lighthouse", "the station", "the river bank", "the inn",
)  # fmt: skip
_TIMES = (
    "at dawn", "before supper", "late that evening", "in the spring", "on market day",
    "after the storm", "in the first week of winter", "at noon",
)  # fmt: skip
_VERBS = (
    "walked to", "looked across", "waited near", "returned to", "hurried past", "remembered",
    "spoke of", "wrote about", "painted", "left",
)  # fmt: skip
_OBJECTS = (
    "a letter", "the brass key", "an old map", "a basket of apples", "the lantern",
    "a folded note", "the ledger", "a silver coin", "the wooden box", "a bundle of papers",
)  # fmt: skip
_FEELINGS = (
    "quietly", "with some care", "without a word", "as if in a dream", "slowly", "gladly",
    "with a heavy heart", "at once",
)  # fmt: skip
_WEATHER = (
    "The wind came in from the sea.", "Rain fell on the slate roofs.",
    "The fog lay thick over the fields.", "The sky was clear and cold.",
    "A pale sun hung above the hills.", "Snow had begun to settle on the roads.",
)  # fmt: skip
_SAYINGS = (
    "We must be patient", "Nobody will believe it", "It is later than you think",
    "The river always finds its way", "Keep the lamp burning", "Tomorrow we shall see",
)  # fmt: skip


def _person(rng: random.Random) -> str:
    return rng.choice(_NAMES) if rng.random() < 0.6 else rng.choice(_ROLES)


def _sentence(rng: random.Random) -> str:
    kind = rng.randint(0, 5)
    if kind == 0:
        return rng.choice(_WEATHER)
    if kind == 1:
        who, other = _person(rng), _person(rng)
        return f'"{rng.choice(_SAYINGS)}," said {who} to {other}.'
    if kind == 2:
        return f"{_person(rng)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
    if kind == 3:
        return (
            f"{_person(rng)} carried {rng.choice(_OBJECTS)} to {rng.choice(_PLACES)} "
            f"{rng.choice(_FEELINGS)}."
        )
    if kind == 4:
        return f"{rng.choice(_TIMES).capitalize()}, {_person(rng)} found {rng.choice(_OBJECTS)}."
    return f"Nobody at {rng.choice(_PLACES)} knew where {_person(rng)} had gone."


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:] if sentence and sentence[0].islower() else sentence


def document(*, seed: int, chapters: int = 2, paragraphs: int = 4, sentences: int = 5) -> str:
    """One book-like document: chapters of paragraphs of sentences, ending in a newline."""
    if min(chapters, paragraphs, sentences) < 1:
        raise ValueError("chapters, paragraphs and sentences must each be at least 1")
    rng = random.Random(seed)
    parts: list[str] = []
    for chapter in range(1, chapters + 1):
        parts.append(f"Chapter {chapter}")
        for _ in range(paragraphs):
            parts.append(" ".join(_capitalise(_sentence(rng)) for _ in range(sentences)))
    return "\n\n".join(parts) + "\n"


def corpus(*, documents: int, seed: int, **shape: int) -> list[str]:
    """``documents`` generated documents; ``shape`` is passed to :func:`document`."""
    if documents < 1:
        raise ValueError("documents must be at least 1")
    # Derive each document's seed so that document i is the same whatever the count.
    return [document(seed=seed * 1_000_003 + i, **shape) for i in range(documents)]


def write_corpus(dest: Path, *, documents: int, seed: int, **shape: int) -> list[Path]:
    """Write ``documents`` generated ``book-NNNN.txt`` files under ``dest`` (created if
    missing) and return their paths in order. Refuses to overwrite an existing file."""
    dest.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, text in enumerate(corpus(documents=documents, seed=seed, **shape)):
        path = dest / f"book-{i:04d}.txt"
        with path.open("x", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)
    return paths


LABELS = ("errand", "speech", "weather")
"""The classes of :func:`labelled_examples`: what kind of sentence a text is."""


def labelled_examples(*, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (text, label) pairs: a generated sentence and which of :data:`LABELS` it is
    (a remark on the weather, something said, or someone going somewhere). The classes are
    easy to tell apart, so a tiny classifier learns them in a few dozen steps."""
    if count < 1:
        raise ValueError("count must be at least 1")
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        if label == "weather":
            text = rng.choice(_WEATHER)
        elif label == "speech":
            text = f'"{rng.choice(_SAYINGS)}," said {_person(rng)}.'
        else:
            text = f"{_person(rng)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}."
        out.append((_capitalise(text), label))
    rng.shuffle(out)
    return out


def write_labelled(dest: Path, *, count: int, seed: int, form: str = "jsonl") -> Path:
    """Write :func:`labelled_examples` to ``dest/examples.<form>`` (``jsonl`` or ``csv``)."""
    import csv
    import json

    dest.mkdir(parents=True, exist_ok=True)
    examples = labelled_examples(count=count, seed=seed)
    path = dest / f"examples.{form}"
    with path.open("x", encoding="utf-8", newline="") as f:
        if form == "jsonl":
            for text, label in examples:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
        elif form == "csv":
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(examples)
        else:
            raise ValueError(f"form must be jsonl or csv, got {form!r}")
    return path
