"""Safetensors layouts: read a weights file's structure without loading it, compare two, and
write trained weights in exactly the structure of the base model.

The release gate calls :func:`tensor_layout` on weights written by untrusted code, so the header
reader here is strict and torch-free: it refuses duplicate names, unknown dtypes, tensors whose
byte span disagrees with their shape, and any byte of the data buffer that no tensor accounts for
(gaps and trailing bytes could carry data out beside the weights). Only :func:`export_like`
needs torch, and imports it when called.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.errors import WeightsError

if TYPE_CHECKING:
    import torch

TensorLayout = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype such as ``"F32"``, shape)."""

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""A header larger than this is refused before it is read (safetensors itself caps at 100 MB)."""

DTYPE_SIZES: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, checked header of one safetensors file."""

    tensors: TensorLayout
    metadata: Mapping[str, str]
    data_bytes: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two parsers could disagree on which duplicate wins; refuse the ambiguity.
            raise WeightsError(f"duplicate key {key!r} in safetensors header")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at ``path``.

    Raises :class:`WeightsError` naming the file and the problem when the file is not a
    well-formed safetensors file whose tensors exactly tile its data buffer.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise WeightsError(f"{path.name}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise WeightsError(f"{path.name}: header length {header_len} is out of bounds")
            raw = f.read(header_len)
    except OSError as e:
        raise WeightsError(f"{path.name}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path.name}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name}: header is not a JSON object")

    data_bytes = size - 8 - header_len
    metadata_raw = header.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise WeightsError(f"{path.name}: __metadata__ must map strings to strings")

    tensors: TensorLayout = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{path.name}: tensor {name!r}: malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise WeightsError(f"{path.name}: tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise WeightsError(f"{path.name}: tensor {name!r}: malformed shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise WeightsError(f"{path.name}: tensor {name!r}: data offsets out of bounds")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise WeightsError(
                f"{path.name}: tensor {name!r}: {offsets[1] - offsets[0]} bytes for "
                f"{dtype}{shape}, expected {expected}"
            )
        tensors[name] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise WeightsError(f"{path.name}: tensor {name!r} {what}")
        position = end
    if position != data_bytes:
        raise WeightsError(
            f"{path.name}: {data_bytes - position} bytes after the last tensor belong to none"
        )
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata_raw), data_bytes=data_bytes)


def _index_shards(index_path: Path) -> dict[str, list[str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{index_path.name}: cannot read: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path.name}: no weight_map")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard.startswith("."):
            raise WeightsError(f"{index_path.name}: tensor {name!r}: bad shard name")
        shards.setdefault(shard, []).append(name)
    return shards


def tensor_layout(path: Path | str) -> TensorLayout:
    """The tensor layout of a safetensors file, or of a Hugging Face model directory.

    For a directory: its ``model.safetensors``, or the union of the shards its
    ``model.safetensors.index.json`` names (each tensor must be in the shard the index says,
    and no shard may hold tensors the index does not list). Raises :class:`WeightsError`.
    """
    path = Path(path)
    if path.is_file():
        return read_header(path).tensors
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    single = path / WEIGHTS_FILE
    if single.is_file():
        return read_header(single).tensors
    index = path / INDEX_FILE
    if not index.is_file():
        raise WeightsError(f"{path}: holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    layout: TensorLayout = {}
    for shard, names in sorted(_index_shards(index).items()):
        tensors = read_header(path / shard).tensors
        if set(tensors) != set(names):
            raise WeightsError(f"{shard}: tensors differ from what {INDEX_FILE} lists")
        layout.update(tensors)
    return layout


def _describe(entry: tuple[str, tuple[int, ...]]) -> str:
    return f"{entry[0]}{list(entry[1])}"


def verify_layout(
    *, expected: Mapping[str, tuple[str, tuple[int, ...]]], actual: TensorLayout
) -> None:
    """Raise :class:`WeightsError` unless ``actual`` has exactly ``expected``'s names, dtypes
    and shapes. The message lists up to five differences, expected vs actual."""
    if not expected:
        raise WeightsError("expected layout is empty; refusing to compare against nothing")
    problems: list[str] = []
    for name in sorted(set(expected) - set(actual)):
        problems.append(f"missing {name}")
    for name in sorted(set(actual) - set(expected)):
        problems.append(f"unexpected {name}")
    for name in sorted(set(expected) & set(actual)):
        if tuple(expected[name]) != actual[name]:
            problems.append(
                f"{name}: expected {_describe(expected[name])}, got {_describe(actual[name])}"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError("layout differs: " + "; ".join(problems[:5]) + more)


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "F32": torch.float32,
        "I64": torch.int64,
        "F64": torch.float64,
    }


def export_like(state: Mapping[str, torch.Tensor], *, base_dir: Path, dest: Path) -> TensorLayout:
    """Write ``state`` to ``dest`` holding exactly the tensors of the model in ``base_dir``.

    Tensors the base file does not store (a tied ``lm_head.weight``, buffers) are left out and
    each tensor is cast to the base dtype (see :func:`export_layout`).
    """
    return export_layout(state, expected=tensor_layout(base_dir), dest=dest)


def export_layout(
    state: Mapping[str, torch.Tensor], *, expected: TensorLayout, dest: Path
) -> TensorLayout:
    """Write the tensors of ``state`` that ``expected`` names to ``dest``, each cast to its
    expected dtype, and nothing else.

    The written file is read back and compared with ``expected``. Writes go to a hidden file
    first and are renamed into place. Raises :class:`WeightsError` when an expected tensor is
    missing from ``state`` or has another shape.
    """
    import torch
    from safetensors.torch import save_file

    dtypes = _torch_dtypes()
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape) in sorted(expected.items()):
        if name not in state:
            raise WeightsError(f"trained model has no tensor {name!r} that the release holds")
        if dtype not in dtypes:
            raise WeightsError(f"tensor {name!r} has dtype {dtype} that cannot be exported")
        tensor = state[name].detach()
        if tuple(tensor.shape) != shape:
            raise WeightsError(
                f"{name}: expected shape {list(shape)}, trained shape {list(tensor.shape)}"
            )
        # clone(): tied or viewed tensors share storage, which save_file refuses.
        out[name] = tensor.to(device="cpu", dtype=dtypes[dtype]).contiguous().clone()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    with torch.no_grad():
        save_file(out, str(partial), metadata={"format": "pt"})
    # safetensors creates the file 0600; the site agent reading it back may be another user.
    partial.chmod(0o644)
    os.replace(partial, dest)
    written = tensor_layout(dest)
    verify_layout(expected=expected, actual=written)
    return written
