"""Provenance of a federated release: the global model of a federated job, signed by the
gateway that aggregated it and countersigned by every site that took part, verifiable offline
with the deployment CA's certificate alone.

A federated release directory holds::

    weights/WEIGHTS  the model, named as the trainer's release names it
                    (adapter_model.safetensors for a LoRA adapter, model.safetensors for a
                    whole model)
    weights/CONFIG  its config where the trainer releases one (adapter_config.json, a
                    classifier's config.json; a full fine-tune's is the base model's)
    metrics.json
    manifest.json   canonical JSON: the job, its spec and approval binding, every round's
                    number, which file is the weights, every file's SHA-256 and size, and
                    each site's countersignature
    manifest.sig    the gateway's ECDSA signature (base64) over CONTEXT + manifest.json
    gateway.pem     the gateway's certificate (role operator, issued by the deployment CA)

Each site countersigns, with its Ed25519 release-signing key, the final model's hash as it saw
it, with its datasets' versions, the rounds it trained and the ε those cost it
(:func:`countersign_message`), after the memorization probe of that model passed on its data.
So a gateway cannot ship a model no site saw, drop a site from the record, or change a site's ε.
:func:`verify_federated_release` raises :class:`SignatureError` or :class:`IntegrityError`
naming what does not hold.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave import signatures
from enclave.provenance.verify import hash_file, list_release
from policies.errors import IntegrityError, InvalidInput, SealroomError
from policies.identity import Role

SCHEMA = "sealroom.federated-release/v1"
CONTEXT = b"sealroom.federated-release.v1\x00"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
GATEWAY_CERT = "gateway.pem"
GATEWAY_NAME = "gateway"
METRICS = "metrics.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Countersign:
    """One site's countersignature of the final model."""

    site: str
    datasets: Mapping[str, int]
    rounds: int
    epsilon: float | None  # None: no DP the site set (no ε bound)
    cert_pem: str
    signature: str

    def to_obj(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "datasets": dict(sorted(self.datasets.items())),
            "rounds": self.rounds,
            "epsilon": self.epsilon,
            "cert_pem": self.cert_pem,
            "signature": self.signature,
        }


def countersign_message(
    *,
    job_id: str,
    model_sha256: str,
    site: str,
    datasets: Mapping[str, int],
    rounds: int,
    epsilon: float | None,
) -> bytes:
    """What a site signs of a federated release."""
    body = {
        "job_id": job_id,
        "model_sha256": model_sha256,
        "site": site,
        "datasets": dict(sorted(datasets.items())),
        "rounds": rounds,
        "epsilon": epsilon,
    }
    return CONTEXT + b"site\x00" + _canonical(body)


def write_federated_release(
    dest: Path,
    *,
    job_id: str,
    spec_sha256: str,
    approval_binding: str,
    weights: tuple[str, Path],
    config: tuple[str, bytes] | None,
    metrics: Mapping[str, float],
    rounds: list[Mapping[str, Any]],
    sites: list[Countersign],
    gateway_cert_pem: bytes,
    gateway_key_pem: bytes,
    ca_cert_pem: bytes,
) -> str:
    """Write and sign the release into ``dest`` (which must not exist), then verify it as the
    team will; returns the manifest's SHA-256. Raises as :func:`verify_federated_release` does
    (a countersignature not over these weights, by another site), leaving nothing at ``dest``."""
    written = {f"weights/{weights[0]}": weights[1].read_bytes(), METRICS: _canonical(dict(metrics))}
    if config is not None:
        written[f"weights/{config[0]}"] = config[1]
    if len(written) != 2 + (config is not None) or any(
        "/" in n for n, _ in [weights, *([config] if config else [])]
    ):
        raise InvalidInput("the release's weights and config need two plain, different names")
    dest.mkdir(parents=True)
    (dest / "weights").mkdir()
    for rel, data in written.items():
        (dest / rel).write_bytes(data)
    files = {rel: hash_file(dest / rel) for rel in written}
    manifest = {
        "schema": SCHEMA,
        "job_id": job_id,
        "spec_sha256": spec_sha256,
        "approval_binding": approval_binding,
        "rounds": [dict(r) for r in rounds],
        "weights": f"weights/{weights[0]}",
        "files": {rel: {"sha256": h, "size": n} for rel, (h, n) in sorted(files.items())},
        "sites": [s.to_obj() for s in sorted(sites, key=lambda s: s.site)],
    }
    body = _canonical(manifest)
    (dest / MANIFEST).write_bytes(body)
    (dest / SIGNATURE).write_text(signatures.sign(gateway_key_pem, CONTEXT + body))
    (dest / GATEWAY_CERT).write_bytes(gateway_cert_pem)
    try:
        verify_federated_release(dest, ca_cert_pem=ca_cert_pem)
    except SealroomError:
        shutil.rmtree(dest)
        raise
    return hashlib.sha256(body).hexdigest()


def is_federated(directory: Path) -> bool:
    """Whether ``directory`` holds a federated release (by its manifest's schema)."""
    try:
        return bool(json.loads((directory / MANIFEST).read_bytes()).get("schema") == SCHEMA)
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class VerifiedFederated:
    job_id: str
    sites: tuple[str, ...]
    rounds: int
    manifest: Mapping[str, Any]


def verify_federated_release(directory: Path, *, ca_cert_pem: bytes) -> VerifiedFederated:
    """Verify a federated release offline: the gateway's signature, every file, and every
    site's countersignature of the model the files hold."""
    raw = (directory / MANIFEST).read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError("the manifest is too large")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"the manifest is not JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise IntegrityError(f"the manifest is not a {SCHEMA} manifest")
    if _canonical(manifest) != raw:
        raise IntegrityError("the manifest is not in its canonical form")
    signatures.verify(
        cert_pem=(directory / GATEWAY_CERT).read_text(),
        signature=(directory / SIGNATURE).read_text(),
        message=CONTEXT + raw,
        ca_cert_pem=ca_cert_pem,
        name=GATEWAY_NAME,
        role=Role.OPERATOR,
        what="the federated release's manifest",
    )
    files = manifest.get("files")
    weights = manifest.get("weights")
    if not isinstance(files, dict) or not isinstance(weights, str) or weights not in files:
        raise IntegrityError("the manifest lists no weights")
    present = list_release(directory) - {MANIFEST, SIGNATURE, GATEWAY_CERT}
    if present != set(files):
        raise IntegrityError(
            f"files differ from the manifest: missing {sorted(set(files) - present)}, "
            f"extra {sorted(present - set(files))}"
        )
    for rel, want in files.items():
        got = hash_file(directory / rel)
        if [want.get("sha256"), want.get("size")] != list(got):
            raise IntegrityError(f"{rel}: sha256/size {got} != manifest {want}")
    verify_federated_release_sites(
        manifest, model_sha256=files[weights]["sha256"], ca_cert_pem=ca_cert_pem
    )
    return VerifiedFederated(
        job_id=str(manifest.get("job_id")),
        sites=tuple(s["site"] for s in manifest["sites"]),
        rounds=len(manifest.get("rounds", [])),
        manifest=manifest,
    )


def verify_federated_release_sites(
    manifest: Mapping[str, Any], *, model_sha256: str, ca_cert_pem: bytes
) -> None:
    """Every site's countersignature is over ``model_sha256`` and its own record, by a site
    certificate of the CA named for that site."""
    sites = manifest.get("sites")
    if not isinstance(sites, list) or len(sites) < 2:
        raise IntegrityError("a federated release is countersigned by two sites or more")
    for s in sites:
        if not isinstance(s, dict):
            raise IntegrityError("a site's countersignature is malformed")
        try:
            rounds = int(s.get("rounds", -1))
        except (TypeError, ValueError) as e:
            raise IntegrityError(f"the countersignature of {s.get('site')} is malformed") from e
        message = countersign_message(
            job_id=str(manifest.get("job_id")),
            model_sha256=model_sha256,
            site=str(s.get("site")),
            datasets=s.get("datasets") or {},
            rounds=rounds,
            epsilon=s.get("epsilon"),
        )
        signatures.verify(
            cert_pem=str(s.get("cert_pem", "")),
            signature=str(s.get("signature", "")),
            message=message,
            ca_cert_pem=ca_cert_pem,
            name=str(s.get("site")),
            role=Role.SITE,
            what=f"the countersignature of site {s.get('site')}",
        )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


__all__ = [
    "SCHEMA",
    "Countersign",
    "VerifiedFederated",
    "countersign_message",
    "is_federated",
    "verify_federated_release",
    "write_federated_release",
]
