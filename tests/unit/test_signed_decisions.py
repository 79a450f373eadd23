"""Decisions and policies are signed by their owner, and a gateway with the deployment CA takes
no unsigned or mis-signed one: it would only be refused at the site later, so it is refused
here first, naming the problem, and nothing of it is recorded (no approval, no policy version,
no audit record of a decision).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditLog
from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from enclave.signatures import sign
from gateway._spool import SealedSpool
from gateway.core import Gateway
from gateway.identity import CertificateAuthority
from gateway.store import Store
from policies.errors import InvalidInput, InvalidState, SignatureError
from policies.identity import Principal, Role
from policies.signing import approval_message, policy_message
from tests.integration._deployment import policy

OLIVIA = Principal("olivia", Role.DATA_OWNER, "library")
THEO = Principal("theo", Role.MODEL_TEAM, "model-team")
SPEC = """\
name: t
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}
"""


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def ids(ca: CertificateAuthority, tmp_path: Path) -> dict[str, IdentityFiles]:
    return {
        n: ca.issue(n, role=r, out_dir=tmp_path / "ids")
        for n, r in (("olivia", Role.DATA_OWNER), ("otto", Role.DATA_OWNER))
    }


@pytest.fixture
def gw(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Gateway]:
    home = tmp_path / "gw"
    home.mkdir()
    audit = AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate())
    g = Gateway(
        home=home,
        store=Store(home / "state.db"),
        audit=audit,
        site=FakeSite(tmp_path / "site"),
        ca_cert_pem=ca.cert_path.read_bytes(),
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with SealedSpool(home) as spool:
        spool.write(buf.getvalue())
        g.register_dataset(
            principal=OLIVIA, name="books", description="", archive=spool, archive_sha256=""
        )
    yield g
    g.stop()
    g.audit.close()


def _signed(ids: dict[str, IdentityFiles], who: str, message: bytes) -> dict[str, str]:
    return {
        "signature": sign(ids[who].key.read_bytes(), message),
        "signer_cert": ids[who].cert.read_text(),
    }


def test_policies_must_be_signed_by_their_owner(gw: Gateway, ids: dict[str, IdentityFiles]) -> None:
    text = policy("books")
    for signed, words in (
        ({}, "not signed"),
        (_signed(ids, "otto", policy_message("books", 1, text)), "not by olivia"),
        (
            _signed(ids, "olivia", policy_message("books", 1, text + "\n# changed")),
            "does not verify",
        ),
    ):
        with pytest.raises(SignatureError, match=words):
            gw.put_policy(principal=OLIVIA, dataset="books", text=text, version=1, **signed)
    assert gw.store.policies("books") == []
    # The version is signed: one the owner did not sign, none, or not the next one is refused.
    with pytest.raises(SignatureError, match="does not verify"):
        gw.put_policy(
            principal=OLIVIA,
            dataset="books",
            text=text,
            version=2,
            **_signed(ids, "olivia", policy_message("books", 1, text)),
        )
    with pytest.raises(InvalidInput, match="version"):
        gw.put_policy(
            principal=OLIVIA,
            dataset="books",
            text=text,
            **_signed(ids, "olivia", policy_message("books", 1, text)),
        )
    with pytest.raises(InvalidState, match="version 0"):
        gw.put_policy(
            principal=OLIVIA,
            dataset="books",
            text=text,
            version=2,
            **_signed(ids, "olivia", policy_message("books", 2, text)),
        )
    assert gw.store.policies("books") == []
    rec = gw.put_policy(
        principal=OLIVIA,
        dataset="books",
        text=text,
        version=1,
        **_signed(ids, "olivia", policy_message("books", 1, text)),
    )
    assert rec.signature and "BEGIN CERTIFICATE" in rec.signer_cert and rec.version == 1


def test_decisions_must_be_signed_by_the_owner_over_the_jobs_binding(
    gw: Gateway, ids: dict[str, IdentityFiles]
) -> None:
    text = policy("books")
    gw.put_policy(
        principal=OLIVIA,
        dataset="books",
        text=text,
        version=1,
        **_signed(ids, "olivia", policy_message("books", 1, text)),
    )
    job = gw.submit(principal=THEO, spec_text=SPEC, bundle=None, bundle_sha256="")
    other = gw.submit(principal=THEO, spec_text=SPEC, bundle=None, bundle_sha256="")
    for signed, words in (
        ({}, "not signed"),
        (_signed(ids, "otto", approval_message(job.binding, "approve")), "not by olivia"),
        (_signed(ids, "olivia", approval_message(other.binding, "approve")), "does not verify"),
        (_signed(ids, "olivia", approval_message(job.binding, "deny")), "does not verify"),
    ):
        with pytest.raises(SignatureError, match=words):
            gw.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="", **signed)
    assert gw.store.approvals(job.id) == []
    assert [r.event.action for r in gw.audit.query(action="job.approve")] == []
    done = gw.decide(
        principal=OLIVIA,
        job_id=job.id,
        approve=True,
        reason="",
        **_signed(ids, "olivia", approval_message(job.binding, "approve")),
    )
    (vote,) = gw.store.approvals(job.id)
    assert vote.signature and done.id == job.id
