"""Signed provenance: a release signed by the site verifies offline with only the CA
certificate, and every tampering (artifact, manifest, signature, certificate, extra or missing
file) is refused with a named error that says what was expected and what was found."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.gate import RELEASED_METRICS, RELEASED_WEIGHTS, GateResult, layout_from_files, run_gate
from enclave.provenance import (
    MANIFEST,
    SIGNATURE,
    SIGNING_CONTEXT,
    SITE_CERT,
    AuditPosition,
    DatasetVersion,
    Manifest,
    ReleaseContext,
    SiteSigner,
    sign_release,
    verify_release,
)
from policies.errors import (
    IntegrityError,
    InvalidInput,
    ReleaseRefused,
    SignatureError,
    VerificationError,
)
from tests.unit._release_support import (
    job_output,
    key_pem,
    make_ca,
    make_site_cert,
    rules,
    write_tensors,
)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, object]:
    return make_ca()


@pytest.fixture(scope="module")
def signer(ca) -> SiteSigner:
    cert, key = make_site_cert(*ca, site="site-a")
    return SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))


def _context(**overrides: object) -> ReleaseContext:
    base: dict[str, object] = {
        "job_id": "job-42",
        "spec_sha256": "11" * 32,
        "bundle_sha256": None,
        "image_id": "sha256:" + "22" * 32,
        "datasets": {"clinical-notes": DatasetVersion(version=3, root_hash="33" * 32)},
        "policy_versions": {"clinical-notes": 2},
        "approval_binding": "44" * 32,
        "approvals": ("Dr Owner",),
        "audit": AuditPosition(seq=17, checkpoint_root="55" * 32),
    }
    base.update(overrides)
    return ReleaseContext(**base)  # type: ignore[arg-type]


def _gate(tmp_path: Path, name: str = "release") -> GateResult:
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    if not base.exists():
        write_tensors(base, {"w": torch.randn(8, 8), "b": torch.randn(8)})
    out = tmp_path / f"out-{name}"
    if not out.exists():
        job_output(out, base, {"loss": 1.25})
    result = run_gate(
        out / "output",
        rules=rules(),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / name,
    )
    result.require_passed()
    return result


@pytest.fixture
def release(tmp_path: Path, signer: SiteSigner) -> Path:
    gate = _gate(tmp_path)
    signed = sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    assert signed.directory == tmp_path / "release"
    return signed.directory


def test_a_signed_release_verifies_offline(release: Path, ca) -> None:
    verified = verify_release(release, ca_cert_pem=ca[0])
    m = verified.manifest
    assert verified.site == "site-a" == m.site
    assert m.context.job_id == "job-42" and m.context.audit.seq == 17
    assert m.context.datasets["clinical-notes"] == DatasetVersion(3, "33" * 32)
    assert {a.path for a in m.artifacts} == {RELEASED_WEIGHTS, RELEASED_METRICS}
    assert [k.name for k in m.gates[0].checks] == ["artifacts", "weights", "metrics"]
    assert all(k.passed for k in m.gates[0].checks)
    assert m.gates[0].rules_version == "test-policy:1"
    assert sorted(os.listdir(release)) == [
        MANIFEST,
        SIGNATURE,
        "metrics.json",
        SITE_CERT,
        "weights",
    ]
    # The manifest is canonical JSON: keys sorted, no whitespace; parse and re-encode agree.
    body = (release / MANIFEST).read_bytes()
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    assert Manifest.from_bytes(body).to_bytes() == body


# --- tampering with the content --------------------------------------------------------------


def test_tampered_artifact_is_refused(release: Path, ca) -> None:
    weights = release / RELEASED_WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(
        IntegrityError, match=rf"{RELEASED_WEIGHTS}: expected sha256 [0-9a-f]{{64}}, found"
    ):
        verify_release(release, ca_cert_pem=ca[0])


def test_truncated_artifact_is_refused_with_sizes(release: Path, ca) -> None:
    (release / RELEASED_METRICS).write_text('{"loss":1.3}')
    with pytest.raises(IntegrityError, match=r"metrics.json: expected size 13, found 12"):
        verify_release(release, ca_cert_pem=ca[0])


def test_tampered_manifest_is_refused(release: Path, ca) -> None:
    body = json.loads((release / MANIFEST).read_bytes())
    body["gates"][0]["checks"][1]["figures"]["tensors"] = 3
    (release / MANIFEST).write_bytes(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    with pytest.raises(SignatureError, match=r"does not verify over manifest\.json"):
        verify_release(release, ca_cert_pem=ca[0])


def test_extra_file_is_refused(release: Path, ca) -> None:
    (release / "weights" / "bonus.safetensors").write_bytes(b"data")
    with pytest.raises(
        IntegrityError, match=r"files not in the manifest: \['weights/bonus.safetensors'\]"
    ):
        verify_release(release, ca_cert_pem=ca[0])


def test_missing_artifact_is_refused(release: Path, ca) -> None:
    (release / RELEASED_METRICS).unlink()
    with pytest.raises(IntegrityError, match=r"metrics\.json: listed in the manifest and missing"):
        verify_release(release, ca_cert_pem=ca[0])


def test_missing_signature_is_refused(release: Path, ca) -> None:
    (release / SIGNATURE).unlink()
    with pytest.raises(IntegrityError, match="lacks"):
        verify_release(release, ca_cert_pem=ca[0])


def test_symlinked_artifact_is_refused(release: Path, ca, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    shutil.move(release / RELEASED_METRICS, target)
    os.symlink(target, release / RELEASED_METRICS)
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_release(release, ca_cert_pem=ca[0])


# --- tampering with who signed -----------------------------------------------------------------


def test_signature_by_another_key_is_refused(release: Path, ca) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    body = (release / MANIFEST).read_bytes()
    (release / SIGNATURE).write_bytes(other.sign(SIGNING_CONTEXT + body))
    with pytest.raises(SignatureError, match="with the key of site 'site-a'"):
        verify_release(release, ca_cert_pem=ca[0])


def test_resigned_with_a_self_made_cert_is_refused(release: Path, ca) -> None:
    # The attacker re-signs an edited manifest with a key and a certificate of their own CA.
    rogue_ca = make_ca("Test CA")  # same name, different key
    cert, key = make_site_cert(*rogue_ca, site="site-a")
    body = json.loads((release / MANIFEST).read_bytes())
    body["job_id"] = "job-43"
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    (release / MANIFEST).write_bytes(raw)
    (release / SIGNATURE).write_bytes(key.sign(SIGNING_CONTEXT + raw))
    (release / SITE_CERT).write_bytes(cert)
    with pytest.raises(
        SignatureError, match=r"not issued by the given CA.*signature does not verify"
    ):
        verify_release(release, ca_cert_pem=ca[0])


def test_release_from_another_deployment_is_refused(tmp_path: Path, ca) -> None:
    other_ca = make_ca("Another deployment")
    cert, key = make_site_cert(*other_ca, site="site-a")
    gate = _gate(tmp_path)
    signer = SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))
    sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    verify_release(tmp_path / "release", ca_cert_pem=other_ca[0])
    with pytest.raises(SignatureError, match="issuer 'CN=Another deployment', CA 'CN=Test CA'"):
        verify_release(tmp_path / "release", ca_cert_pem=ca[0])


def test_certificate_without_the_site_role_is_refused(tmp_path: Path, ca) -> None:
    # A model-team identity from the right CA must not be able to sign releases.
    cert, key = make_site_cert(*ca, site="alice", role="model-team")
    with pytest.raises(InvalidInput, match="expected OU 'site', found 'model-team'"):
        SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))
    # Forged directly into a release, verification refuses it as well.
    gate = _gate(tmp_path)
    good_cert, good_key = make_site_cert(*ca, site="site-a", key=key)
    signer = SiteSigner.from_pem(cert_pem=good_cert, key_pem=key_pem(good_key))
    sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    (tmp_path / "release" / SITE_CERT).write_bytes(cert)
    with pytest.raises(SignatureError, match="expected OU 'site', found 'model-team'"):
        verify_release(tmp_path / "release", ca_cert_pem=ca[0])


def test_certificate_not_valid_at_signing_time_is_refused(tmp_path: Path, ca) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = make_site_cert(
        *ca, not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=1)
    )
    signer = SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))
    gate = _gate(tmp_path)
    with pytest.raises(InvalidInput, match="was not valid at"):
        sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    # Backdating the manifest into the validity window still verifies only inside it, and a
    # manifest dated in the future is refused.
    sign_release(
        {"clinical-notes": gate}, context=_context(), signer=signer, now=now - dt.timedelta(days=2)
    )
    verify_release(tmp_path / "release", ca_cert_pem=ca[0])
    with pytest.raises(SignatureError, match="in the future"):
        verify_release(tmp_path / "release", ca_cert_pem=ca[0], now=now - dt.timedelta(days=4))


def test_manifest_naming_another_site_is_refused(tmp_path: Path, ca) -> None:
    cert, key = make_site_cert(*ca, site="site-b")
    gate = _gate(tmp_path)
    sign_release(
        {"clinical-notes": gate},
        context=_context(),
        signer=SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key)),
    )
    release = tmp_path / "release"
    body = json.loads((release / MANIFEST).read_bytes())
    body["site"] = "site-a"
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    (release / MANIFEST).write_bytes(raw)
    (release / SIGNATURE).write_bytes(key.sign(SIGNING_CONTEXT + raw))
    with pytest.raises(
        SignatureError, match="manifest names site 'site-a'; it was signed by site 'site-b'"
    ):
        verify_release(release, ca_cert_pem=ca[0])


def test_non_canonical_manifest_is_refused_even_if_signed(release: Path, ca, signer) -> None:
    raw = json.dumps(json.loads((release / MANIFEST).read_bytes()), indent=1).encode()
    (release / MANIFEST).write_bytes(raw)
    (release / SIGNATURE).write_bytes(signer.key.sign(SIGNING_CONTEXT + raw))
    with pytest.raises(IntegrityError, match="not in canonical form"):
        verify_release(release, ca_cert_pem=ca[0])


def test_signed_manifest_recording_a_refused_check_is_refused(release: Path, ca, signer) -> None:
    body = json.loads((release / MANIFEST).read_bytes())
    body["gates"][0]["checks"][2]["passed"] = False
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    (release / MANIFEST).write_bytes(raw)
    (release / SIGNATURE).write_bytes(signer.key.sign(SIGNING_CONTEXT + raw))
    with pytest.raises(IntegrityError, match=r"records refused \['metrics'\]"):
        verify_release(release, ca_cert_pem=ca[0])


def test_errors_are_verification_errors(release: Path) -> None:
    (release / SIGNATURE).write_bytes(b"\x00" * 10)
    with pytest.raises(VerificationError):
        verify_release(release, ca_cert_pem=make_ca()[0])


def test_a_leaf_certificate_is_not_accepted_as_the_ca(release: Path) -> None:
    with pytest.raises(InvalidInput, match="not a CA"):
        verify_release(release, ca_cert_pem=(release / SITE_CERT).read_bytes())


# --- signing is fail-closed ------------------------------------------------------------------


def test_signing_refuses_what_the_gate_refused_or_never_checked(tmp_path: Path, signer) -> None:
    base = tmp_path / "base.safetensors"
    write_tensors(base, {"w": torch.randn(4, 4)})
    job_output(tmp_path / "o", base, {"loss": float("inf")})
    refused = run_gate(
        tmp_path / "o" / "output",
        rules=rules(),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "r",
    )
    with pytest.raises(ReleaseRefused, match="metric 'loss' is not finite"):
        sign_release({"clinical-notes": refused}, context=_context(), signer=signer)
    with pytest.raises(ReleaseRefused, match="no gate results"):
        sign_release({}, context=_context(), signer=signer)


def test_signing_needs_a_gate_run_for_every_dataset(tmp_path: Path, signer) -> None:
    gate = _gate(tmp_path)
    two = {
        "clinical-notes": DatasetVersion(3, "33" * 32),
        "lab-results": DatasetVersion(1, "66" * 32),
    }
    with pytest.raises(InvalidInput, match="the job used datasets"):
        sign_release(
            {"clinical-notes": gate},
            context=_context(datasets=two, policy_versions={"clinical-notes": 2, "lab-results": 1}),
            signer=signer,
        )


def test_two_datasets_two_gate_runs_one_release(tmp_path: Path, signer, ca) -> None:
    a, b = _gate(tmp_path, "ra"), _gate(tmp_path, "rb")
    two = {
        "clinical-notes": DatasetVersion(3, "33" * 32),
        "lab-results": DatasetVersion(1, "66" * 32),
    }
    signed = sign_release(
        {"lab-results": b, "clinical-notes": a},
        context=_context(datasets=two, policy_versions={"clinical-notes": 2, "lab-results": 1}),
        signer=signer,
    )
    assert signed.directory == tmp_path / "ra"
    verified = verify_release(signed.directory, ca_cert_pem=ca[0])
    assert [g.dataset for g in verified.manifest.gates] == ["clinical-notes", "lab-results"]


def test_signing_refuses_a_directory_changed_after_the_gate(tmp_path: Path, signer) -> None:
    gate = _gate(tmp_path)
    (tmp_path / "release" / RELEASED_METRICS).write_text('{"loss":9}')
    with pytest.raises(IntegrityError, match="changed since the gate wrote it"):
        sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    (tmp_path / "release" / "extra").write_text("x")
    with pytest.raises(IntegrityError, match="expected files"):
        sign_release({"clinical-notes": gate}, context=_context(), signer=signer)


def test_signing_twice_and_bad_context_are_errors(tmp_path: Path, signer) -> None:
    gate = _gate(tmp_path)
    with pytest.raises(InvalidInput, match="spec_sha256"):
        sign_release({"clinical-notes": gate}, context=_context(spec_sha256="nope"), signer=signer)
    sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    with pytest.raises(IntegrityError):  # the signed files are now extra to the gate's list
        sign_release({"clinical-notes": gate}, context=_context(), signer=signer)


def test_signer_key_must_match_its_certificate(ca) -> None:
    cert, _ = make_site_cert(*ca)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(InvalidInput, match="not the key of the site certificate"):
        SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(other))
