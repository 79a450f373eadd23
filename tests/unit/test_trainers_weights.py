"""Safetensors layouts: the strict header reader (the release gate runs it on untrusted files),
the layout comparison, and exporting trained weights in the base model's exact layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.errors import WeightsError
from trainers.weights import export_like, read_header, tensor_layout, verify_layout


def _raw(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_layout_of_a_file_written_by_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)},
        str(path),
        metadata={"format": "pt"},
    )
    header = read_header(path)
    assert header.tensors == {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}
    assert header.metadata == {"format": "pt"}
    assert tensor_layout(path) == header.tensors
    assert tensor_layout(tmp_path / "w.safetensors") == header.tensors


def test_layout_of_a_directory_single_and_sharded(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    save_file({"x": torch.zeros(2)}, str(single / "model.safetensors"))
    assert tensor_layout(single) == {"x": ("F32", (2,))}

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"x": torch.zeros(2)}, str(sharded / "model-1.safetensors"))
    save_file({"y": torch.zeros(3, dtype=torch.int64)}, str(sharded / "model-2.safetensors"))
    index = {"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert tensor_layout(sharded) == {"x": ("F32", (2,)), "y": ("I64", (3,))}


def test_index_that_misplaces_a_tensor_is_refused(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2), "y": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors"}})
    )
    with pytest.raises(WeightsError, match="differ from what"):
        tensor_layout(tmp_path)


def test_index_pointing_outside_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}})
    )
    with pytest.raises(WeightsError, match="bad shard name"):
        tensor_layout(tmp_path)


def test_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="holds neither"):
        tensor_layout(tmp_path)


@pytest.mark.parametrize(
    ("header", "data", "words"),
    [
        # 8 zero bytes the tensors do not account for: a place to smuggle data.
        ({"a": _entry("F32", [2], 0, 8)}, b"\0" * 16, "belong to none"),
        ({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\0" * 12, "gap"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}, b"\0" * 8, "overlaps"),
        ({"a": _entry("F32", [3], 0, 8)}, b"\0" * 8, "expected 12"),
        ({"a": _entry("F32", [2], 0, 80)}, b"\0" * 8, "out of bounds"),
        ({"a": _entry("F32", [2], 8, 0)}, b"\0" * 8, "out of bounds"),
        ({"a": _entry("F128", [1], 0, 16)}, b"\0" * 16, "unknown dtype"),
        ({"a": _entry("F32", [-1], 0, 0)}, b"", "malformed shape"),
        ({"a": _entry("F32", [True], 0, 4)}, b"\0" * 4, "malformed shape"),
        ({"a": {**_entry("F32", [1], 0, 4), "extra": 1}}, b"\0" * 4, "malformed entry"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
        (b'{"a": ', b"", "not JSON"),
        (b"\xff\xfe", b"", "not JSON"),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            "duplicate key",
        ),
    ],
)
def test_malformed_headers_are_refused(
    tmp_path: Path, header: Any, data: bytes, words: str
) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(WeightsError, match=words):
        read_header(path)


def test_header_length_beyond_the_file_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(WeightsError, match="out of bounds"):
        read_header(path)


def test_short_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\1\0")
    with pytest.raises(WeightsError, match="too short"):
        read_header(path)


def test_verify_layout_names_each_difference() -> None:
    expected = {"a": ("F32", (2, 3)), "b": ("F32", (4,)), "c": ("F32", (1,))}
    verify_layout(expected=expected, actual=dict(expected))
    actual = {"a": ("BF16", (2, 3)), "b": ("F32", (4,)), "d": ("F32", (1,))}
    with pytest.raises(WeightsError) as info:
        verify_layout(expected=expected, actual=actual)
    message = str(info.value)
    assert "missing c" in message
    assert "unexpected d" in message
    assert "a: expected F32[2, 3], got BF16[2, 3]" in message
    assert "b:" not in message


def test_verify_layout_refuses_an_empty_expectation() -> None:
    with pytest.raises(WeightsError, match="empty"):
        verify_layout(expected={}, actual={})


def test_export_like_keeps_the_base_layout_dropping_tied_and_casting(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"embed": torch.zeros(5, 4, dtype=torch.bfloat16), "norm": torch.ones(4)},
        str(base / "model.safetensors"),
    )
    embed = torch.randn(5, 4)
    # lm_head shares the embedding's storage, as with tie_word_embeddings; the base file
    # does not store it, so neither may the export.
    state = {"embed": embed, "lm_head": embed, "norm": torch.full((4,), 2.0)}
    dest = tmp_path / "out" / "model.safetensors"
    written = export_like(state, base_dir=base, dest=dest)
    assert written == tensor_layout(base)
    loaded = load_file(str(dest))
    assert loaded["embed"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed"], embed.to(torch.bfloat16))
    assert torch.equal(loaded["norm"], torch.full((4,), 2.0))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors"]
    assert dest.stat().st_mode & 0o777 == 0o644


def test_export_like_refuses_a_missing_or_reshaped_tensor(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    dest = tmp_path / "out" / "model.safetensors"
    with pytest.raises(WeightsError, match="no tensor 'w'"):
        export_like({"v": torch.zeros(2, 2)}, base_dir=tmp_path, dest=dest)
    with pytest.raises(WeightsError, match=r"expected shape \[2, 2\], trained shape \[4\]"):
        export_like({"w": torch.zeros(4)}, base_dir=tmp_path, dest=dest)
    assert not dest.exists()
