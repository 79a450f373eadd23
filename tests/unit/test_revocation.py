"""Certificates the gateway must refuse, for every role: revoked, expired or not yet valid,
issued by another CA, and a site's certificate speaking for a lease another site holds.

The real gateway server (``gateway.server.build``, its interceptor and both services) over mTLS
on ``localhost:0``, with a fake local site. A revoked certificate is refused by the gateway
itself (the CA's revocation list, re-read when it changes) and each refusal is audited with its
reason, under the name the certificate carries. A certificate outside its validity or from
another CA never completes the TLS handshake (gRPC's TLS verifies the chain and the dates):
the caller gets UNAVAILABLE and, no call having been made, the log holds nothing of it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sealroom.v1 import gateway_pb2 as gpb
from sealroom.v1 import gateway_pb2_grpc as gpb_grpc
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave.contract import SiteReport
from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from enclave.link import channel
from enclave.linkwire import report_message
from gateway.identity import CertificateAuthority, principal_from_certificate
from policies.errors import InvalidInput, NotFound
from policies.identity import Role
from policies.lifecycle import JobState
from tests.unit.test_site_link import _order


class Deployment:
    def __init__(self, home: Path, running: Any, ca: CertificateAuthority) -> None:
        self.home = home
        self.running = running
        self.ca = ca
        self.address = f"localhost:{running.port}"
        self.ids: dict[str, IdentityFiles] = {}

    def issue(self, name: str, role: Role, **kw: Any) -> IdentityFiles:
        self.ids[name] = self.ca.issue(name, role=role, out_dir=self.home / "identities", **kw)
        return self.ids[name]

    def records(self, action: str, principal: str) -> list[Any]:
        return list(self.running.gateway.audit.query(action=action, principal=principal))


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    from gateway.server import build

    home = tmp_path / "home"
    ca = CertificateAuthority.init(home / "ca")
    running = build(home, site=FakeSite(tmp_path / "site"), address="localhost:0")
    d = Deployment(home, running, ca)
    for name, role in (
        ("theo", Role.MODEL_TEAM),
        ("olivia", Role.DATA_OWNER),
        ("carol", Role.COMPLIANCE),
        ("otto", Role.OPERATOR),
        ("hospital", Role.SITE),
        ("clinic", Role.SITE),
    ):
        d.issue(name, role)
    d.ca.site_signer("hospital", out_dir=home / "identities")
    try:
        yield d
    finally:
        running.stop(grace=0)


def _call(d: Deployment, identity: IdentityFiles) -> Callable[[], object]:
    """One cheap call its role may make: WhoAmI for a person, Hello for a site."""
    ch = channel(d.address, identity)
    if _role_of(identity) is Role.SITE:
        stub = pb_grpc.SiteLinkStub(ch)
        return lambda: stub.Hello(pb.HelloRequest(version="test"), timeout=10)
    gstub = gpb_grpc.GatewayStub(ch)
    return lambda: gstub.WhoAmI(gpb.WhoAmIRequest(), timeout=10)


def _role_of(identity: IdentityFiles) -> Role:
    return principal_from_certificate(identity.cert.read_bytes()).role


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def _sealroom(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from gateway.cli import main; main()", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- revoked ------------------------------------------------------------------------------------


def test_a_revoked_certificate_is_refused_on_every_call_of_every_role_with_the_reason_audited(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    calls = {name: _call(d, ids) for name, ids in d.ids.items()}
    for call in calls.values():  # all of them are let in first
        call()
    revoked = ("theo", "olivia", "carol", "otto", "hospital")
    for name in revoked:
        done = _sealroom(d.home, "ca", "revoke", name, "--json")
        assert done.returncode == 0, done.stderr
        # A site's release signer goes with its TLS identity.
        assert len(json.loads(done.stdout)["revoked"]) == (2 if name == "hospital" else 1)
    # The running gateway reads the list again when it changes: no restart.
    for name in revoked:
        err = _refused(calls[name])
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED, name
        assert f"certificate of {name}" in (err.details() or "") and "revoked" in (
            err.details() or ""
        )
    calls["clinic"]()  # a certificate not on the list still gets in
    for name in revoked:
        action = "rpc.SiteLink.Hello" if name == "hospital" else "rpc.WhoAmI"
        (denied,) = [r for r in d.records(action, name) if r.event.outcome == "denied"]
        assert "revoked" in denied.event.details["reason"], name
    # Revoking again changes nothing; a name the CA never issued is refused and writes nothing.
    again = _sealroom(d.home, "ca", "revoke", "theo", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["revoked"] == []
    before = d.ca.crl_path.read_bytes()
    unknown = _sealroom(d.home, "ca", "revoke", "nobody")
    assert unknown.returncode != 0 and "nobody" in unknown.stderr
    assert d.ca.crl_path.read_bytes() == before


def test_a_gateway_started_again_still_refuses_what_was_revoked(tmp_path: Path) -> None:
    from gateway.server import build

    home = tmp_path / "home"
    ca = CertificateAuthority.init(home / "ca")
    theo = ca.issue("theo", role=Role.MODEL_TEAM, out_dir=home / "identities")
    ca.revoke("theo")
    running = build(home, site=FakeSite(tmp_path / "site"), address="localhost:0")
    try:
        d = Deployment(home, running, ca)
        assert _refused(_call(d, theo)).code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=0)


def test_a_revocation_list_that_does_not_verify_refuses_everyone_and_stops_a_start(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Signed by another CA's key, or not a CRL at all: fail closed, never 'nothing revoked'."""
    from gateway.server import build

    d = deployment
    olivia = _call(d, d.ids["olivia"])
    olivia()
    other = CertificateAuthority.init(tmp_path / "other-ca", name="Sealroom deployment CA")
    other.issue("olivia", role=Role.DATA_OWNER, out_dir=tmp_path / "other-ids")
    other.revoke("olivia")  # a list the deployment CA never signed (same subject name)
    for bad in (other.crl_path.read_bytes(), b"not a revocation list"):
        d.ca.crl_path.write_bytes(bad)
        err = _refused(olivia)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "revocation list cannot be used" in (err.details() or "")
        with pytest.raises(InvalidInput):
            build(d.home, site=FakeSite(tmp_path / "site2"), address="localhost:0")
    d.ca.crl_path.unlink()  # no list: nothing revoked
    olivia()


def test_revoking_a_name_the_ca_never_issued_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(NotFound, match="nobody"):
        ca.revoke("nobody")
    assert not ca.crl_path.exists()


# -- outside its validity, or from another CA: the handshake refuses it --------------------------


def test_a_certificate_outside_its_validity_or_from_another_ca_never_gets_a_call_through(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    now = dt.datetime.now(dt.UTC)
    expired = (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    not_yet = (now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    foreign = CertificateAuthority.init(tmp_path / "foreign-ca")
    out = tmp_path / "refused"
    refused = {
        "expired site": d.ca.issue("s-expired", role=Role.SITE, out_dir=out, validity=expired),
        "expired user": d.ca.issue(
            "u-expired", role=Role.MODEL_TEAM, out_dir=out, validity=expired
        ),
        "future site": d.ca.issue("s-future", role=Role.SITE, out_dir=out, validity=not_yet),
        "foreign site": foreign.issue("hospital", role=Role.SITE, out_dir=out / "f"),
        "foreign user": foreign.issue("olivia", role=Role.DATA_OWNER, out_dir=out / "f"),
    }
    for foreign_ids in ("foreign site", "foreign user"):
        # Presented with the deployment's CA as the server's root, as an attacker would.
        files = refused[foreign_ids]
        refused[foreign_ids] = IdentityFiles(cert=files.cert, key=files.key, ca_cert=d.ca.cert_path)
    for what, ids in refused.items():
        err = _refused(_call(d, ids))
        assert err.code() is grpc.StatusCode.UNAVAILABLE, what
    # The same deployment's valid certificates still get in; nothing of the refused ones was
    # recorded, because no call was ever made (the foreign ones carry the names of real
    # principals: only the real olivia's one call is on record).
    _call(d, d.ids["olivia"])()
    on_record = [r.event.principal for r in d.running.gateway.audit.query(limit=10**6)]
    assert not {"s-expired", "u-expired", "s-future", "hospital"} & set(on_record)
    assert on_record.count("olivia") == 1


# -- a site speaks only for its own leases ------------------------------------------------------


def test_a_site_certificate_naming_another_site_is_refused_on_every_lease_call(
    deployment: Deployment,
) -> None:
    d = deployment
    links = d.running.links
    reports: list[SiteReport] = []
    t = threading.Thread(
        target=links.run, args=("hospital", _order("job-h"), reports.append), daemon=True
    )
    t.start()
    hospital = pb_grpc.SiteLinkStub(channel(d.address, d.ids["hospital"]))
    deadline = time.monotonic() + 10
    lease = hospital.PullWork(pb.PullWorkRequest(wait_s=5), timeout=20)
    while not lease.HasField("lease"):
        assert time.monotonic() < deadline, "the lease was never granted"
        lease = hospital.PullWork(pb.PullWorkRequest(wait_s=1), timeout=20)
    assert lease.lease.job_id == "job-h"
    clinic = pb_grpc.SiteLinkStub(channel(d.address, d.ids["clinic"]))
    forged = report_message(SiteReport("job-h", state=JobState.RELEASED))
    for name, call in (
        ("Report", lambda: clinic.Report(pb.ReportRequest(seq=0, report=forged), timeout=10)),
        (
            "FetchBundle",
            lambda: list(clinic.FetchBundle(pb.FetchBundleRequest(job_id="job-h"), timeout=10)),
        ),
        (
            "PushRelease",
            lambda: clinic.PushRelease(iter([pb.SiteReleaseChunk(job_id="job-h")]), timeout=10),
        ),
    ):
        err = _refused(call)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, name
        assert "site clinic holds no lease on job 'job-h'" in (err.details() or ""), name
        (rec,) = d.records(f"rpc.SiteLink.{name}", "clinic")
        assert rec.event.outcome == "error", name
        assert "holds no lease" in rec.event.details["message"], name
    # Nor does the clinic learn of it.
    seen = clinic.Hello(pb.HelloRequest(held=[pb.LeaseState(job_id="job-h")]), timeout=10)
    assert [(s.job_id, s.live) for s in seen.leases] == [("job-h", False)]
    # None of it was applied: the run ends as the holder ends it.
    ended = report_message(SiteReport("job-h", state=JobState.CANCELLED))
    assert hospital.Report(pb.ReportRequest(seq=0, report=ended), timeout=10).next_seq == 1
    t.join(timeout=10)
    assert [r.state for r in reports] == [JobState.CANCELLED]
