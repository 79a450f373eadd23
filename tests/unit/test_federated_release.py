"""A federated release verifies offline with the CA certificate alone, and every way a gateway
(or anyone between it and the team) could bend it fails, naming what: the weights swapped after
the sites countersigned, a file added or missing, a site dropped from the record or its ε
changed, a countersignature by another site or another deployment, the gateway's signature by
anyone but the gateway, a manifest re-encoded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from enclave import signatures
from enclave.identity import IdentityFiles
from enclave.provenance.federated import (
    Countersign,
    countersign_message,
    verify_federated_release,
    write_federated_release,
)
from gateway.identity import CertificateAuthority
from policies.errors import IntegrityError, SealroomError, SignatureError
from policies.identity import Role

Made = tuple[Path, CertificateAuthority, dict[str, IdentityFiles]]


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, CertificateAuthority, dict[str, IdentityFiles]]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ids = {s: ca.site_signer(s, out_dir=tmp_path / "ids") for s in ("site-a", "site-b")}
    ids["gateway"] = ca.issue("gateway", role=Role.OPERATOR, out_dir=tmp_path / "ids")
    weights = tmp_path / "final.safetensors"
    save_file({"x.lora_A.weight": np.ones((2, 3), np.float32)}, str(weights))
    release = tmp_path / "release"
    _write(release, weights, ca, ids, _sign_all(ids, weights))
    return release, ca, ids


def _sign_all(
    ids: dict[str, IdentityFiles], weights: Path, *, epsilon: float | None = 2.5
) -> list[Countersign]:
    import hashlib

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = []
    for site, ds in (("site-a", "books-a"), ("site-b", "books-b")):
        msg = countersign_message(
            job_id="job-1",
            model_sha256=digest,
            site=site,
            datasets={ds: 1},
            rounds=3,
            epsilon=epsilon,
        )
        out.append(
            Countersign(
                site,
                {ds: 1},
                3,
                epsilon,
                ids[site].cert.read_text(),
                signatures.sign(ids[site].key.read_bytes(), msg),
            )
        )
    return out


def _write(
    dest: Path,
    weights: Path,
    ca: CertificateAuthority,
    ids: dict[str, IdentityFiles],
    sites: list[Countersign],
) -> str:
    cert, key, ca_pem = ids["gateway"].read()
    return write_federated_release(
        dest,
        job_id="job-1",
        spec_sha256="a" * 64,
        approval_binding="b" * 64,
        weights=("adapter_model.safetensors", weights),
        config=("adapter_config.json", b'{"r": 4}'),
        metrics={"train_loss": 1.5, "rounds": 3.0},
        rounds=[{"round": r} for r in range(3)],
        sites=sites,
        gateway_cert_pem=cert,
        gateway_key_pem=key,
        ca_cert_pem=ca_pem,
    )


def test_a_release_verifies_with_the_ca_alone(made: Made) -> None:
    release, ca, _ = made
    v = verify_federated_release(release, ca_cert_pem=ca.cert_pem)
    assert v.sites == ("site-a", "site-b") and v.rounds == 3
    assert [s["epsilon"] for s in v.manifest["sites"]] == [2.5, 2.5]


def test_weights_swapped_after_the_sites_countersigned_fail(made: Made, tmp_path: Path) -> None:
    release, ca, ids = made
    other = tmp_path / "other.safetensors"
    save_file({"x.lora_A.weight": np.zeros((2, 3), np.float32)}, str(other))
    # The gateway writes other weights under the sites' countersignatures of the first.
    with pytest.raises(SignatureError, match="countersignature of site site-a"):
        _write(tmp_path / "swapped", other, ca, ids, _sign_all(ids, tmp_path / "final.safetensors"))
    assert not (tmp_path / "swapped").exists()  # nothing left behind
    # Or swaps the file in a release already written.
    shutil.copy(other, release / "weights" / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors"):
        verify_federated_release(release, ca_cert_pem=ca.cert_pem)


@pytest.mark.parametrize("edit", ["drop a site", "change epsilon", "rename a site", "reencode"])
def test_a_manifest_bent_after_signing_fails(made: Made, edit: str) -> None:
    release, ca, _ = made
    manifest = json.loads((release / "manifest.json").read_bytes())
    if edit == "drop a site":
        manifest["sites"] = manifest["sites"][:1]
    elif edit == "change epsilon":
        manifest["sites"][0]["epsilon"] = 0.1
    elif edit == "rename a site":
        manifest["sites"][0]["site"] = "site-z"
    body = (
        json.dumps(manifest, indent=1)
        if edit == "reencode"
        else json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    ).encode()
    (release / "manifest.json").write_bytes(body)
    with pytest.raises((SignatureError, IntegrityError)):
        verify_federated_release(release, ca_cert_pem=ca.cert_pem)


def test_a_site_countersigning_for_another_or_from_another_deployment_fails(
    made,
    tmp_path: Path,
) -> None:
    _release, ca, ids = made
    weights = tmp_path / "final.safetensors"
    sites = _sign_all(ids, weights)
    # site-a's key signs site-b's entry.
    forged = [
        sites[0],
        Countersign("site-b", {"books-b": 1}, 3, 2.5, sites[0].cert_pem, sites[0].signature),
    ]
    with pytest.raises(SignatureError, match="signed by site-a"):
        _write(tmp_path / "r1", weights, ca, ids, forged)
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    ids2 = {**ids, "site-b": rogue.site_signer("site-b", out_dir=tmp_path / "rogue-ids")}
    with pytest.raises(SignatureError, match="not issued by the deployment CA"):
        _write(tmp_path / "r2", weights, ca, ids, _sign_all(ids2, weights))
    with pytest.raises(IntegrityError, match="two sites or more"):
        _write(tmp_path / "r3", weights, ca, ids, sites[:1])


def test_the_gateways_signature_by_anyone_else_fails(made: Made, tmp_path: Path) -> None:
    release, ca, _ids = made
    impostor = ca.issue("not-gateway", role=Role.OPERATOR, out_dir=tmp_path / "imp")
    (release / "gateway.pem").write_bytes(impostor.cert.read_bytes())
    (release / "manifest.sig").write_text(
        signatures.sign(
            impostor.key.read_bytes(),
            b"sealroom.federated-release.v1\x00" + (release / "manifest.json").read_bytes(),
        )
    )
    with pytest.raises(SignatureError, match="not-gateway"):
        verify_federated_release(release, ca_cert_pem=ca.cert_pem)


def test_a_file_added_to_the_release_fails(made: Made) -> None:
    release, ca, _ = made
    (release / "extra.txt").write_text("payload")
    with pytest.raises(IntegrityError, match="extra"):
        verify_federated_release(release, ca_cert_pem=ca.cert_pem)
    assert issubclass(IntegrityError, SealroomError)


def test_a_site_sending_another_model_than_it_signed_gets_nothing_released(
    made: Made, tmp_path: Path
) -> None:
    """A whole model's release is composed at the sites, each sending the copy it signed. The
    gateway releases the copy most sites sent; a lying minority is outvoted, and a lying
    majority's copy fails every honest countersignature: nothing is released."""
    from gateway._rounds import _most_sent

    _, ca, ids = made
    signed = tmp_path / "final.safetensors"
    other = tmp_path / "other.safetensors"
    save_file({"x.lora_A.weight": np.zeros((2, 3), np.float32)}, str(other))
    copies = {}
    for site, source in (("site-a", other), ("site-b", signed), ("site-c", signed)):
        copies[site] = tmp_path / f"{site}.safetensors"
        shutil.copy(source, copies[site])
    chosen = _most_sent([copies[s] for s in sorted(copies)])
    assert chosen.read_bytes() == signed.read_bytes()
    _write(tmp_path / "outvoted", chosen, ca, ids, _sign_all(ids, signed))
    shutil.copy(other, copies["site-b"])
    chosen = _most_sent([copies[s] for s in sorted(copies)])
    assert chosen.read_bytes() == other.read_bytes()
    with pytest.raises(SignatureError, match="countersignature of site site-a"):
        _write(tmp_path / "majority", chosen, ca, ids, _sign_all(ids, signed))
    assert not (tmp_path / "majority").exists()
