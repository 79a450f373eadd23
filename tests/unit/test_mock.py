"""Mock datasets keep the data's shape and none of its content."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gateway.mock import check_mock_shape, generate_mock
from policies.errors import InvalidInput

SECRET = "Patient 4711 was diagnosed with a rare condition on the third of May"


def _real(tmp: Path) -> Path:
    src = tmp / "real"
    (src / "notes").mkdir(parents=True)
    (src / "notes" / "a.txt").write_text((SECRET + ". ") * 20)
    rows = [
        {
            "text": f"{SECRET} #{i}",
            "label": ["pos", "neg", "neutral"][i % 3],
            "score": i / 10,
            "n": i,
            "ok": i % 2 == 0,
        }
        for i in range(30)
    ]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (src / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "age"])
        for i in range(12):
            w.writerow([f"{SECRET} {i}", "yes" if i % 2 else "no", 30 + i])
    return src


def test_a_mock_has_the_same_files_and_structure_and_none_of_the_text(tmp_path: Path) -> None:
    src = _real(tmp_path)
    paths = generate_mock(src, tmp_path / "mock", seed=1)
    assert paths == ["notes/a.txt", "table.csv", "train.jsonl"]
    mock = tmp_path / "mock"
    for p in paths:
        text = (mock / p).read_text()
        assert "Patient" not in text and "4711" not in text and "diagnosed" not in text
    real_len = len((src / "notes" / "a.txt").read_bytes())
    assert abs(len((mock / "notes" / "a.txt").read_bytes()) - real_len) <= 1
    rows = [json.loads(line) for line in (mock / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    assert all(set(r) == {"text", "label", "score", "n", "ok"} for r in rows)
    assert all(isinstance(r["n"], int) and 0 <= r["n"] <= 29 for r in rows)
    assert all(isinstance(r["ok"], bool) and isinstance(r["score"], float) for r in rows)
    assert {r["label"] for r in rows} <= {"label-0", "label-1", "label-2"}
    table = list(csv.reader((mock / "table.csv").read_text().splitlines()))
    assert table[0] == ["text", "label", "age"] and len(table) == 13
    assert {r[1] for r in table[1:]} <= {"label-0", "label-1"}
    assert all(30 <= int(r[2]) <= 41 for r in table[1:])


def test_the_same_seed_gives_the_same_mock(tmp_path: Path) -> None:
    src = _real(tmp_path)
    generate_mock(src, tmp_path / "m1", seed=3)
    generate_mock(src, tmp_path / "m2", seed=3)
    for p in ("notes/a.txt", "table.csv", "train.jsonl"):
        assert (tmp_path / "m1" / p).read_bytes() == (tmp_path / "m2" / p).read_bytes()


def test_a_mock_that_adds_or_omits_a_file_is_refused_by_name() -> None:
    check_mock_shape(["a.txt", "b.txt"], ["b.txt", "a.txt"])
    with pytest.raises(InvalidInput, match=r"not in the dataset, e\.g\. 'c\.txt'"):
        check_mock_shape(["a.txt", "c.txt"], ["a.txt"])
    with pytest.raises(InvalidInput, match=r"missing, e\.g\. 'b\.txt'"):
        check_mock_shape(["a.txt"], ["a.txt", "b.txt"])


def test_links_and_existing_destinations_are_refused(tmp_path: Path) -> None:
    src = _real(tmp_path)
    (src / "link.txt").symlink_to(src / "notes" / "a.txt")
    with pytest.raises(InvalidInput, match="not a regular file"):
        generate_mock(src, tmp_path / "mock")
    assert not (tmp_path / "mock").exists()
    (src / "link.txt").unlink()
    (tmp_path / "exists").mkdir()
    with pytest.raises(InvalidInput, match="already exists"):
        generate_mock(src, tmp_path / "exists")
