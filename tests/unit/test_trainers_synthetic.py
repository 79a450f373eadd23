"""The generated corpora are deterministic, varied and never overwrite a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers import synthetic


def test_same_seed_same_text_other_seed_other_text() -> None:
    a = synthetic.corpus(documents=3, seed=7)
    assert a == synthetic.corpus(documents=3, seed=7)
    assert a != synthetic.corpus(documents=3, seed=8)
    assert len(set(a)) == 3, "documents within a corpus differ"


def test_document_i_does_not_depend_on_the_count() -> None:
    assert synthetic.corpus(documents=2, seed=3) == synthetic.corpus(documents=5, seed=3)[:2]


def test_documents_look_like_book_text() -> None:
    text = synthetic.document(seed=1, chapters=3, paragraphs=2, sentences=4)
    assert text.startswith("Chapter 1\n\n")
    assert "Chapter 3" in text
    assert text.endswith("\n")
    paragraphs = [p for p in text.split("\n\n") if not p.startswith("Chapter")]
    assert len(paragraphs) == 6
    assert all(p[0].isupper() or p[0] == '"' for p in paragraphs)


def test_write_corpus_writes_files_in_order(tmp_path: Path) -> None:
    paths = synthetic.write_corpus(tmp_path / "books", documents=3, seed=2)
    assert [p.name for p in paths] == ["book-0000.txt", "book-0001.txt", "book-0002.txt"]
    texts = [p.read_text(encoding="utf-8") for p in paths]
    assert texts == synthetic.corpus(documents=3, seed=2)


def test_write_corpus_refuses_to_overwrite(tmp_path: Path) -> None:
    synthetic.write_corpus(tmp_path, documents=1, seed=0)
    before = (tmp_path / "book-0000.txt").read_bytes()
    with pytest.raises(FileExistsError):
        synthetic.write_corpus(tmp_path, documents=1, seed=1)
    assert (tmp_path / "book-0000.txt").read_bytes() == before


@pytest.mark.parametrize("kwargs", [{"documents": 0}, {"documents": 1, "sentences": 0}])
def test_empty_shapes_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        synthetic.corpus(seed=0, **kwargs)
