"""Attacks on the gate through the weights files: smuggling data in the header (metadata, tensor
names), malformed headers that try to trip a parser, structure that differs from the base
model, non-finite values, and a payload hidden in the low-order mantissa bits of fp32 weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from enclave.gate import RELEASED_WEIGHTS, layout_from_files, run_gate
from policies.release import CheckName, CheckOutcome, OutputLimits
from tests.unit._release_support import read_raw, rules, write_raw, write_tensors

SECRET = b"patient 4711; dob 1970-01-01; diagnosis: HIV+"


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(32, 16, generator=g),
        "layer.0.weight": torch.randn(16, 16, generator=g),
        "norm.weight": torch.ones(16),
    }


@pytest.fixture
def base(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "base.safetensors"
    write_tensors(path, tensors)
    return path


def _out(tmp_path: Path) -> Path:
    return tmp_path / "output" / "weights" / "model.safetensors"


def _gate(tmp_path: Path, base: Path, **rule_overrides: Any):
    return run_gate(
        tmp_path / "output",
        rules=rules(**rule_overrides),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "release",
    )


def _weights_refusal(result) -> str:
    assert not result.passed
    weights = next(c for c in result.checks if c.name is CheckName.WEIGHTS)
    assert weights.outcome is CheckOutcome.REFUSED
    text = " ".join(weights.reasons)
    assert SECRET.decode() not in text
    return text


# --- smuggling in the header -------------------------------------------------------------------


def test_secret_in_metadata_is_stripped_from_the_release(
    tmp_path: Path, base: Path, tensors
) -> None:
    write_tensors(_out(tmp_path), tensors, metadata={"format": "pt", "notes": SECRET.decode()})
    assert SECRET in _out(tmp_path).read_bytes()
    result = _gate(tmp_path, base)
    result.require_passed()
    released = (tmp_path / "release" / RELEASED_WEIGHTS).read_bytes()
    assert SECRET not in released
    header, _ = read_raw(tmp_path / "release" / RELEASED_WEIGHTS)
    assert "__metadata__" not in header


def test_malformed_metadata_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    write_tensors(_out(tmp_path), tensors, metadata={"x": [1, 2, 3]})
    assert "__metadata__ is not a map of strings" in _weights_refusal(_gate(tmp_path, base))


def test_secret_as_a_tensor_name_is_refused_and_not_echoed(
    tmp_path: Path, base: Path, tensors
) -> None:
    write_tensors(_out(tmp_path), {**tensors, SECRET.decode(): torch.zeros(1)})
    text = _weights_refusal(_gate(tmp_path, base))
    assert "1 tensor(s) not in the base model's layout (names withheld" in text


def test_renamed_tensor_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    renamed = dict(tensors)
    renamed[SECRET.decode()] = renamed.pop("norm.weight")
    write_tensors(_out(tmp_path), renamed)
    text = _weights_refusal(_gate(tmp_path, base))
    assert "tensor 'norm.weight' of the base model is missing" in text


def test_extra_tensor_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    # An extra tensor is extra capacity: it could hold the data verbatim.
    write_tensors(_out(tmp_path), {**tensors, "extra.weight": torch.randn(64, 64)})
    assert "1 tensor(s) not in the base model's layout" in _weights_refusal(_gate(tmp_path, base))


def test_missing_tensor_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    write_tensors(_out(tmp_path), {k: v for k, v in tensors.items() if k != "layer.0.weight"})
    assert "tensor 'layer.0.weight' of the base model is missing" in _weights_refusal(
        _gate(tmp_path, base)
    )


def test_wrong_shape_is_refused_naming_the_expected_shape(
    tmp_path: Path, base: Path, tensors
) -> None:
    write_tensors(_out(tmp_path), {**tensors, "embed.weight": torch.randn(33, 16)})
    text = _weights_refusal(_gate(tmp_path, base))
    assert "tensor 'embed.weight': shape differs from the base model's [32, 16]" in text
    assert "33" not in text


def test_wrong_dtype_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    write_tensors(_out(tmp_path), {**tensors, "norm.weight": torch.ones(16, dtype=torch.float16)})
    text = _weights_refusal(_gate(tmp_path, base))
    assert "tensor 'norm.weight': dtype F16 differs from the base model's F32" in text


# --- malformed headers -------------------------------------------------------------------------


def _raw(tmp_path: Path, header: dict[str, Any], data: bytes, length: int | None = None) -> None:
    write_raw(_out(tmp_path), header, data, length=length)


def _small_base(tmp_path: Path) -> Path:
    path = tmp_path / "small.safetensors"
    write_tensors(path, {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)})
    return path


def test_header_length_past_end_of_file_is_refused(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    blob = base.read_bytes()
    _out(tmp_path).parent.mkdir(parents=True)
    _out(tmp_path).write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    assert "header length points past the end of the file" in _weights_refusal(
        _gate(tmp_path, base)
    )


def test_a_100_mb_header_claim_is_refused_before_reading(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    blob = base.read_bytes()
    _out(tmp_path).parent.mkdir(parents=True)
    # A file large enough that the claim does not point past its end: only the cap stops it.
    with open(_out(tmp_path), "wb") as f:
        f.write(struct.pack("<Q", 100 * 1024 * 1024) + blob[8:])
        f.truncate(100 * 1024 * 1024 + 64)
    text = _weights_refusal(_gate(tmp_path, base))
    assert f"header length exceeds the cap of {OutputLimits().max_header_bytes} bytes" in text


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    _raw(tmp_path, {"a": entry, "b": entry}, bytes(16) + bytes(16))
    # Two tensors share bytes 0..16; 16 trailing bytes would belong to nobody.
    assert "data overlaps another tensor's" in _weights_refusal(_gate(tmp_path, base))


def test_gap_between_tensors_is_refused(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    header = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [24, 40]},
    }
    _raw(tmp_path, header, bytes(16) + SECRET[:8] + bytes(16))
    assert "a gap precedes its data" in _weights_refusal(_gate(tmp_path, base))


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    header = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]},
    }
    _raw(tmp_path, header, bytes(32) + SECRET)
    assert "bytes after the last tensor's data" in _weights_refusal(_gate(tmp_path, base))


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}, "byte length does not match"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4096]}, "outside the data section"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}, "outside the data section"),
        ({"dtype": "Q99", "shape": [2, 2], "data_offsets": [0, 16]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "not a list of non-neg"),
        ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, "not a list of non-neg"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "not a pair of integers"),
        ({"dtype": "F32", "shape": [2, 2]}, "exactly dtype, shape, data_offsets"),
        ({"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}, "rank exceeds"),
    ],
)
def test_malformed_entries_are_refused(tmp_path: Path, entry: dict[str, Any], reason: str) -> None:
    base = _small_base(tmp_path)
    good = {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}
    if entry.get("data_offsets") == [0, 4]:
        good = {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}
    _raw(tmp_path, {"a": entry, "b": good}, bytes(32))
    text = _weights_refusal(_gate(tmp_path, base))
    assert reason in text
    assert "'a'" in text  # 'a' is a base-layout name: the reason may and does name it


def test_duplicate_keys_in_header_are_refused(tmp_path: Path) -> None:
    base = _small_base(tmp_path)
    entry = '{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'
    text = f'{{"a":{entry},"b":{entry},"b":{entry.replace("0,16", "16,32")}}}'.encode()
    text += b" " * (-len(text) % 8)
    _out(tmp_path).parent.mkdir(parents=True)
    _out(tmp_path).write_bytes(struct.pack("<Q", len(text)) + text + bytes(32))
    assert "not strict JSON (or repeats a key)" in _weights_refusal(_gate(tmp_path, base))


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\x01\x00", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 8) + b"[1,2,3] " + bytes(8), "does not start with a JSON object"),
        (struct.pack("<Q", 8) + b'{"a":1}x', "not strict JSON"),
        (struct.pack("<Q", 8) + b'{"a":NaN', "not strict JSON"),
        (struct.pack("<Q", 4) + b"{\xff\xfe}", "not strict JSON"),
    ],
)
def test_garbage_headers_are_refused(tmp_path: Path, blob: bytes, reason: str) -> None:
    base = _small_base(tmp_path)
    _out(tmp_path).parent.mkdir(parents=True)
    _out(tmp_path).write_bytes(blob)
    assert reason in _weights_refusal(_gate(tmp_path, base))


def test_same_tensor_in_two_shards_is_refused(tmp_path: Path, base: Path, tensors) -> None:
    write_tensors(_out(tmp_path), tensors)
    write_tensors(_out(tmp_path).with_name("second.safetensors"), {"norm.weight": torch.ones(16)})
    assert "'norm.weight' appears in more than one weights file" in _weights_refusal(
        _gate(tmp_path, base)
    )


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, base: Path, tensors, bad: float) -> None:
    # NaN carries 22 free mantissa bits; some narrowing paths keep part of them.
    poisoned = {**tensors, "norm.weight": tensors["norm.weight"].clone()}
    poisoned["norm.weight"][3] = bad
    write_tensors(_out(tmp_path), poisoned)
    assert "tensor 'norm.weight': holds non-finite values" in _weights_refusal(
        _gate(tmp_path, base)
    )


def test_values_that_overflow_the_release_dtype_are_refused(
    tmp_path: Path, base: Path, tensors
) -> None:
    big = {**tensors, "norm.weight": torch.full((16,), 1e6)}
    write_tensors(_out(tmp_path), big)
    text = _weights_refusal(_gate(tmp_path, base, release_dtype="F16"))
    assert "values overflow the release dtype F16" in text


def test_integer_tensors_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "int-base.safetensors"
    header = {"ids": {"dtype": "I64", "shape": [4], "data_offsets": [0, 32]}}
    write_raw(base, header, bytes(32))
    write_raw(_out(tmp_path), header, SECRET[:32])
    assert "tensor 'ids': dtype I64 is not a float dtype" in _weights_refusal(_gate(tmp_path, base))


# --- a payload in the low-order mantissa bits ----------------------------------------------


MAGIC = b"EXFIL1"


def _embed(values: torch.Tensor, payload: bytes) -> torch.Tensor:
    """Hide ``payload`` one byte per fp32 value, in the lowest 8 mantissa bits. The weights
    change by at most 2^-15 relative: invisible to accuracy, and to a structure check."""
    framed = MAGIC + struct.pack("<H", len(payload)) + payload
    flat = values.flatten().clone()
    assert flat.numel() >= len(framed)
    bits = flat.view(torch.int32)
    for i, byte in enumerate(framed):
        bits[i] = (int(bits[i]) & ~0xFF) | byte
    return flat.view(values.shape)


def _decode_fp32_low_bytes(words: list[int]) -> bytes | None:
    """The attacker's decoder: read the low byte of each 32-bit word, look for the frame."""
    low = bytes(w & 0xFF for w in words)
    if not low.startswith(MAGIC):
        return None
    (n,) = struct.unpack("<H", low[len(MAGIC) : len(MAGIC) + 2])
    return low[len(MAGIC) + 2 : len(MAGIC) + 2 + n]


def _decode_file(path: Path) -> bytes | None:
    """Run the decoder over every tensor of a safetensors file, widening 16-bit floats to fp32
    first (the attacker's best guess at where the bits went)."""
    header, data = read_raw(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = bytearray(data[begin:end])
        if entry["dtype"] == "F32":
            words = torch.frombuffer(raw, dtype=torch.int32).tolist()
        else:
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[entry["dtype"]]
            widened = torch.frombuffer(raw, dtype=dtype).float()
            words = widened.view(torch.int32).tolist()
            # ... and also the raw 16-bit words, in case the payload survived in them.
            halves = torch.frombuffer(raw, dtype=torch.int16).tolist()
            found = _decode_fp32_low_bytes(halves)
            if found is not None:
                return found
        found = _decode_fp32_low_bytes(words)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("release_dtype", ["BF16", "F16"])
def test_payload_in_low_mantissa_bits_does_not_survive_the_gate(
    tmp_path: Path, base: Path, tensors, release_dtype: str
) -> None:
    carrier = dict(tensors)
    carrier["embed.weight"] = _embed(tensors["embed.weight"], SECRET)
    # The weights are numerically the same model ...
    assert torch.allclose(carrier["embed.weight"], tensors["embed.weight"], rtol=1e-4)
    write_tensors(_out(tmp_path), carrier)
    # ... and the decoder reads the secret straight out of the job's file.
    assert _decode_file(_out(tmp_path)) == SECRET

    result = _gate(tmp_path, base, release_dtype=release_dtype)
    result.require_passed()  # structurally nothing is wrong: the gate must defuse, not detect
    released = tmp_path / "release" / RELEASED_WEIGHTS
    assert _decode_file(released) is None
    assert SECRET not in released.read_bytes()
    # The release is still the job's model, to the release precision: the dtype's mantissa
    # less the bits the gate scrubs: two roundings, half an ulp each, within one ulp of what
    # is left, relative.
    kept_bits = {"BF16": 7, "F16": 10}[release_dtype] - rules().scrub_bits
    got = load_file(released)["embed.weight"].float()
    assert torch.allclose(got, tensors["embed.weight"], rtol=2.0**-kept_bits, atol=1e-3)
    header, _ = read_raw(released)
    assert json.dumps(header).count(release_dtype) == len(header)


# --- a payload in the bits that survive the narrowing ------------------------------------------


SCRUB_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def _embed_in_release_bits(
    values: torch.Tensor, payload: bytes, dtype: torch.dtype, stored: torch.dtype
) -> torch.Tensor:
    """The smarter attacker knows the release dtype: it rounds the weights to it and hides two
    payload bits in the lowest two mantissa bits of each 16-bit word, so narrowing is exact
    and keeps them. Stored as ``stored`` (the base model's dtype)."""
    framed = MAGIC + struct.pack("<H", len(payload)) + payload
    pairs = [(byte >> s) & 3 for byte in framed for s in (0, 2, 4, 6)]
    words = values.flatten().to(dtype).clone().view(torch.int16)
    assert words.numel() >= len(pairs)
    for i, two in enumerate(pairs):
        words[i] = (int(words[i]) & ~3) | two
    return words.view(dtype).to(stored).view(values.shape)


def _decode_release_bits(path: Path, dtype: torch.dtype) -> bytes | None:
    """Its decoder: each tensor narrowed to the release dtype, two bits a word, framed."""
    for t in load_file(str(path)).values():
        words = t.to(dtype).flatten().view(torch.int16).tolist()
        pairs = [w & 3 for w in words]
        data = bytes(
            sum(pairs[i + k] << (2 * k) for k in range(4)) for i in range(0, len(pairs) - 3, 4)
        )
        if data.startswith(MAGIC):
            (n,) = struct.unpack("<H", data[len(MAGIC) : len(MAGIC) + 2])
            return data[len(MAGIC) + 2 : len(MAGIC) + 2 + n]
    return None


@pytest.mark.parametrize("release_dtype", ["BF16", "F16"])
@pytest.mark.parametrize("base_dtype", ["F32", "release"])
def test_payload_in_bits_that_survive_narrowing_is_scrubbed(
    tmp_path: Path, tensors, release_dtype: str, base_dtype: str
) -> None:
    dtype = SCRUB_DTYPES[release_dtype]
    stored = torch.float32 if base_dtype == "F32" else dtype  # a base model already 16-bit
    model = {n: t.to(stored) for n, t in tensors.items()}
    base = tmp_path / "base.safetensors"
    write_tensors(base, model)
    carrier = dict(model)
    carrier["embed.weight"] = _embed_in_release_bits(model["embed.weight"], SECRET, dtype, stored)
    write_tensors(_out(tmp_path), carrier)
    assert _decode_release_bits(_out(tmp_path), dtype) == SECRET

    # Control: re-quantisation alone keeps this payload (narrowing is exact here) ...
    kept = run_gate(
        tmp_path / "output",
        rules=rules(release_dtype=release_dtype, scrub_bits=0),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "kept",
    )
    kept.require_passed()
    assert _decode_release_bits(tmp_path / "kept" / RELEASED_WEIGHTS, dtype) == SECRET

    # ... and the default scrub takes it away, leaving the model to within its precision.
    result = _gate(tmp_path, base, release_dtype=release_dtype)
    result.require_passed()
    released = tmp_path / "release" / RELEASED_WEIGHTS
    assert _decode_release_bits(released, dtype) is None
    got = load_file(str(released))
    for name, want in tensors.items():
        words = got[name].view(torch.int16)
        assert not bool((words & 3).any()), f"{name}: low bits left"
        assert torch.allclose(got[name].float(), want, rtol=2**-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_scrub_rounds_to_nearest_and_keeps_signs(dtype: torch.dtype, bits: int) -> None:
    from enclave.gate._safetensors import scrub

    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(4096, generator=g) * 3).to(dtype)
    y = scrub(x, bits)
    assert y.dtype == dtype
    assert not bool((y.view(torch.int16) & ((1 << bits) - 1)).any())
    assert bool((torch.sign(y) == torch.sign(x)).all())
    # Round to nearest: no representable value at the coarser precision is closer than y.
    step = 1 << bits
    words = x.view(torch.int16).to(torch.int32) & 0x7FFF
    down = (words // step) * step
    candidates = torch.stack([down, down + step]).clamp(
        max=0x7BFF if dtype == torch.float16 else 0x7F7F
    )
    mags = candidates.to(torch.int16).view(dtype).float()
    best = (mags - x.float().abs()).abs().min(dim=0).values
    assert torch.equal((y.float().abs() - x.float().abs()).abs(), best)
