"""Helpers for the release-gate and provenance tests: tiny models, hand-made safetensors files,
job output directories and a throwaway CA. Nothing here is a stand-in for the code under test."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from policies.release import CheckName, ReleaseRules

METRICS = frozenset({"loss", "eval_loss", "accuracy", "epsilon"})


def rules(**overrides: Any) -> ReleaseRules:
    base: dict[str, Any] = {
        "version": "test-policy:1",
        "checks": frozenset({CheckName.ARTIFACTS, CheckName.WEIGHTS, CheckName.METRICS}),
        "allowed_metrics": METRICS,
    }
    base.update(overrides)
    return ReleaseRules(**base)


def tiny_llama(directory: Path, *, vocab: int = 96, seed: int = 0, positions: int = 128) -> Any:
    """A 2-layer, 64-wide Llama with random weights, saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


def save_weights(model: Any, path: Path) -> None:
    """Save ``model``'s weights the way a job would (``save_pretrained``), into ``path``."""
    tmp = path.parent / (path.name + ".tmpdir")
    model.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp / "model.safetensors", path)
    shutil.rmtree(tmp)


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, data section) of a safetensors file, read the plain way."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(
    path: Path, header: dict[str, Any], data: bytes, *, length: int | None = None
) -> None:
    """Write a safetensors file from a header dict and data; ``length`` overrides the prefix."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Any = None) -> None:
    """A well-formed safetensors file written by hand (contiguous, sorted)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    data = b""
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    write_raw(path, header, data)


def job_output(root: Path, weights_src: Path, metrics: dict[str, Any] | str | None = None) -> Path:
    """An /output directory: weights/model.safetensors (copied) and metrics.json."""
    out = root / "output"
    (out / "weights").mkdir(parents=True)
    shutil.copyfile(weights_src, out / "weights" / "model.safetensors")
    if metrics is not None:
        text = metrics if isinstance(metrics, str) else json.dumps(metrics)
        (out / "metrics.json").write_text(text)
    return out


def nbytes(shape: list[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize


# --- a throwaway deployment CA ---------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(name: str = "Test CA") -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(days=30))
        .not_valid_after(_now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def make_site_cert(
    ca_pem: bytes,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    site: str = "site-a",
    role: str = "site",
    key: ed25519.Ed25519PrivateKey | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[bytes, ed25519.Ed25519PrivateKey]:
    """A leaf certificate with an Ed25519 key, subject CN=site, OU=role, issued by the CA."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, site),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
        .not_valid_after(not_after or _now() + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
