"""A defensive safetensors reader and a canonical writer, written here rather than borrowed.

The job's weights files are hostile. Before any library sees them, :func:`read_header` checks
the 8-byte little-endian header length against a cap and the file size, parses the JSON header
strictly (no duplicate keys, no NaN constants, valid UTF-8), and checks every tensor entry: a
known dtype, a shape of non-negative integers, offsets inside the data section whose length is
exactly ``prod(shape) * itemsize``, and tensors that tile the data section with no overlap and no
gap. Anything else raises :class:`WeightsRefused` with a reason that names a tensor only when
its name is a trusted (base-layout) name.

:func:`write_canonical` writes the release form: tensors sorted by name, contiguous, converted
to the release dtype (round to nearest even), a header with sorted keys, no whitespace, no
``__metadata__``, padded with spaces to 8 bytes. Two equal weight sets give identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from policies.release import DTYPE_SIZES, FLOAT_DTYPES, OutputLimits, TensorSpec

if sys.byteorder != "little":  # safetensors data is little-endian; torch reads native order
    raise ImportError("the release gate assumes a little-endian host")

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
CHUNK_ELEMENTS = 1 << 22
"""Elements converted at a time: bounds memory whatever the tensor's size."""


class WeightsRefused(Exception):
    """Internal: a weights file broke a rule. The gate turns it into a refusal reason."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    spec: TensorSpec
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked header: its tensors and where the data section starts in the file."""

    tensors: Mapping[str, TensorEntry]
    data_start: int
    file_size: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def strict_json(data: bytes, *, constants_as_floats: bool = False) -> Any:
    """Parse JSON refusing duplicate keys, invalid UTF-8 and, unless ``constants_as_floats``
    (then a later check refuses them by name), the NaN/Infinity tokens.

    Raises ValueError (including on excessive nesting) for anything not plain JSON.
    """
    constant = float if constants_as_floats else _no_constants
    try:
        text = data.decode("utf-8", errors="strict")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def _label(name: str, known: frozenset[str]) -> str:
    # Only trusted names (from the base layout) may appear in a reason; others are job text.
    return f"tensor {name!r}" if name in known else "a tensor (name withheld)"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(fd: int, *, known: frozenset[str], limits: OutputLimits) -> Header:
    """Read and check the header of the open safetensors file ``fd``.

    ``known`` are the names that may be echoed in reasons. Raises :class:`WeightsRefused`.
    """
    size = os.fstat(fd).st_size
    if size < 8:
        raise WeightsRefused("file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > limits.max_header_bytes:
        raise WeightsRefused(f"header length exceeds the cap of {limits.max_header_bytes} bytes")
    if n > size - 8:
        raise WeightsRefused("header length points past the end of the file")
    if n < 2:
        raise WeightsRefused("header is too short to be a JSON object")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise WeightsRefused("file ended inside the header")
    if raw[:1] != b"{":
        raise WeightsRefused("header does not start with a JSON object")
    try:
        parsed = strict_json(raw)
    except ValueError:
        raise WeightsRefused("header is not strict JSON (or repeats a key)") from None
    if not isinstance(parsed, dict):
        raise WeightsRefused("header is not a JSON object")
    meta = parsed.pop("__metadata__", None)
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise WeightsRefused("__metadata__ is not a map of strings")
    if len(parsed) > limits.max_tensors:
        raise WeightsRefused(f"more than {limits.max_tensors} tensors")
    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, entry in parsed.items():
        label = _label(name, known)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WeightsRefused(f"{label}: entry must hold exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise WeightsRefused(f"{label}: unknown dtype (value withheld)")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise WeightsRefused(f"{label}: shape is not a list of non-negative integers")
        if len(shape) > limits.max_rank:
            raise WeightsRefused(f"{label}: rank exceeds {limits.max_rank}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise WeightsRefused(f"{label}: data_offsets is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise WeightsRefused(f"{label}: data offsets fall outside the data section")
        spec = TensorSpec(dtype=dtype, shape=tuple(shape))
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise WeightsRefused(f"{label}: byte length does not match its shape and dtype")
        entries[name] = TensorEntry(name=name, spec=spec, begin=begin, end=end)
    # The tensors must tile the data section exactly: an overlap lets two tensors share bytes,
    # a gap is room for bytes no tensor accounts for.
    position = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < position:
            raise WeightsRefused(f"{_label(e.name, known)}: data overlaps another tensor's")
        if e.begin > position:
            raise WeightsRefused(f"{_label(e.name, known)}: a gap precedes its data")
        position = e.end
    if position != data_len:
        raise WeightsRefused("bytes after the last tensor's data")
    return Header(tensors=entries, data_start=8 + n, file_size=size)


@dataclass(frozen=True)
class SourceTensor:
    """Where one checked tensor's bytes lie: an open file, its header, its entry."""

    fd: int
    header: Header
    entry: TensorEntry


@dataclass(frozen=True)
class WrittenFile:
    sha256: str
    size: int


def canonical_header(specs: Mapping[str, TensorSpec], release_dtype: str) -> bytes:
    """The canonical header for ``specs`` converted to ``release_dtype`` (padded to 8 bytes)."""
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(specs):
        nbytes = math.prod(specs[name].shape) * DTYPE_SIZES[release_dtype]
        header[name] = {
            "dtype": release_dtype,
            "shape": list(specs[name].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return text + b" " * (-len(text) % 8)


def _chunks(src: SourceTensor) -> Iterable[bytes]:
    itemsize = DTYPE_SIZES[src.entry.spec.dtype]
    start = src.header.data_start + src.entry.begin
    stop = src.header.data_start + src.entry.end
    step = CHUNK_ELEMENTS * itemsize
    for at in range(start, stop, step):
        want = min(step, stop - at)
        data = os.pread(src.fd, want, at)
        if len(data) != want:
            raise WeightsRefused("file changed size while it was read")
        yield data


def scrub(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``values`` (16-bit floats) rounded to ``bits`` fewer mantissa bits, to nearest with ties
    to even, the freed bits zero. Narrowing to the release dtype only wipes what lies below it;
    a job that knows the release dtype can put a payload in the bits that survive, and this
    takes those away too. Works on the bit patterns: floats are sign and magnitude, and a carry
    out of the mantissa into the exponent is exactly the rounding up it should be."""
    if bits == 0:
        return values
    if values.element_size() != 2:
        raise WeightsRefused(f"cannot scrub {values.dtype}: the release dtypes are 16-bit")
    words = values.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, magnitude = words & 0x8000, words & 0x7FFF
    half = (1 << (bits - 1)) - 1
    magnitude = ((magnitude + half + ((magnitude >> bits) & 1)) >> bits) << bits
    merged = sign | magnitude
    merged = torch.where(merged >= 0x8000, merged - 0x10000, merged)  # back to int16's range
    return merged.to(torch.int16).view(values.dtype)


def write_canonical(
    out: BinaryIO,
    tensors: Mapping[str, SourceTensor],
    *,
    release_dtype: str,
    known: frozenset[str],
    scrub_bits: int = 0,
) -> WrittenFile:
    """Write ``tensors`` in canonical form, converted to ``release_dtype``, to ``out``, with the
    lowest ``scrub_bits`` mantissa bits of every value rounded away (:func:`scrub`).

    Refuses (:class:`WeightsRefused`) non-float tensors, non-finite values, and values that do
    not fit the release dtype. Returns the written file's SHA-256 and size.
    """
    target = TORCH_DTYPES[release_dtype]
    for name, src in tensors.items():
        if src.entry.spec.dtype not in FLOAT_DTYPES:
            raise WeightsRefused(
                f"{_label(name, known)}: dtype {src.entry.spec.dtype} is not a float dtype"
            )
    digest = hashlib.sha256()
    header = canonical_header({n: t.entry.spec for n, t in tensors.items()}, release_dtype)
    prefix = struct.pack("<Q", len(header)) + header
    out.write(prefix)
    digest.update(prefix)
    size = len(prefix)
    for name in sorted(tensors):
        src = tensors[name]
        source_dtype = TORCH_DTYPES[src.entry.spec.dtype]
        for chunk in _chunks(src):
            values = torch.frombuffer(bytearray(chunk), dtype=source_dtype)
            # NaN payloads survive narrowing on some paths; no weight is NaN or infinite anyway.
            if not bool(torch.isfinite(values).all()):
                raise WeightsRefused(f"{_label(name, known)}: holds non-finite values")
            converted = scrub(values.to(target), scrub_bits)
            if not bool(torch.isfinite(converted).all()):
                raise WeightsRefused(
                    f"{_label(name, known)}: values overflow the release dtype {release_dtype}"
                )
            # Through numpy: bytes(untyped_storage()) walks the storage element by element in
            # Python, which made the weights check most of the gate's time.
            data = converted.contiguous().view(torch.uint8).numpy().tobytes()
            out.write(data)
            digest.update(data)
            size += len(data)
    return WrittenFile(sha256=digest.hexdigest(), size=size)
