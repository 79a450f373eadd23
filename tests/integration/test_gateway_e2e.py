"""The walking skeleton, attacked end to end: the real gateway over mTLS with its real site.

One deployment per module (CA, six people, a tiny base model, the gateway on ``localhost:0``
with its embedded site running jobs in real Docker). Each test plays one story and checks what
actually happened: the status a refused caller got and the audit record of the refusal, a
listener on the host that no job reached, a release that does not exist, an audit export whose
edited record is named.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sealroom.v1 import gateway_pb2 as pb
from sealroom.v1 import gateway_pb2_grpc as pb_grpc

from gateway.client import JobView
from gateway.identity import CertificateAuthority
from policies.errors import InvalidInput, NotFound, PermissionDenied
from policies.identity import Role
from tests.integration._deployment import Deployment, bundle, deploy, policy
from trainers.synthetic import write_corpus

pytestmark = pytest.mark.docker

TRAIN_SPEC = """\
name: {name}
datasets: [{dataset}]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters:
  {{max_steps: {steps}, learning_rate: 0.003, batch_size: 4, block_size: 32, seed: 0}}
resources: {{cpus: 2, memory_mb: 3072, timeout_s: 300}}
"""

CUSTOM_SPEC = """\
name: {name}
datasets: [scratch]
base_model: tiny-lm
trainer: custom
entrypoint: "attack:Module"
purpose: testing
resources: {{cpus: 1, memory_mb: 1024, timeout_s: 120}}
env: {{JOB_TARGET_PORTS: "{ports}"}}
"""

# Module-level code runs when the harness imports the entrypoint; each attack does its work
# there, leaves what it wants in /output and exits 0 so that the gate is what decides.
NETWORK_ATTACK = """
import errno, json, os, socket, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
ports = [int(p) for p in os.environ["JOB_TARGET_PORTS"].split(",")]
out = {}
for port in ports:
    for host in ("127.0.0.1", "::1"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        def tcp(host=host, port=port, fam=fam):
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((host, port))
                s.sendall(b"LEAK")
        out[f"tcp {host} {port}"] = attempt(tcp)
    def udp(port=port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"LEAK", ("127.0.0.1", port))
            s.settimeout(1)
            s.recv(16)
    out[f"udp {port}"] = attempt(udp)
out["dns"] = attempt(lambda: socket.getaddrinfo("example.com", 443))
out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
print("REPORT " + json.dumps(out), flush=True)
with open("/output/metrics.json", "w") as f:
    json.dump({"steps": 1}, f)
sys.exit(0)
"""

PICKLE_ATTACK = """
import json, pickle, shutil, sys
shutil.copy("/model/base/model.safetensors", "/output/model.safetensors")
with open("/output/model.pt", "wb") as f:
    pickle.dump({"weights": [1, 2, 3]}, f)
with open("/output/metrics.json", "w") as f:
    json.dump({"steps": 1}, f)
sys.exit(0)
"""

EXTRA_TENSOR_ATTACK = """
import json, sys
from safetensors.torch import load_file, save_file
import torch
tensors = load_file("/model/base/model.safetensors")
tensors["smuggled.payload"] = torch.arange(64, dtype=torch.float32)
import os
os.makedirs("/output/weights", exist_ok=True)
# In the released place, so that the weights check (not the artifacts check) is what refuses.
save_file(tensors, "/output/weights/model.safetensors")
with open("/output/metrics.json", "w") as f:
    json.dump({"steps": 1}, f)
sys.exit(0)
"""


class Listener:
    """A TCP and a UDP listener on the host's loopback that count what reaches them."""

    def __init__(self) -> None:
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._tcp, self._udp)]
        for t in self._threads:
            t.start()

    def _tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            with conn:
                self.received.append(b"tcp-connection")

    def _udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data, _ = self.udp.recvfrom(64)
            except OSError:
                continue
            self.received.append(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.tcp.close()
        self.udp.close()


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, runtime_image: str) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    d = deploy(root)
    with d.client("olivia") as owner:
        books = root / "books"
        write_corpus(books, documents=8, seed=7)
        owner.register_dataset("books", books, description="generated novels")
        owner.put_policy("books", policy("books"))
        scratch = root / "scratch"
        write_corpus(scratch, documents=2, seed=8)
        owner.register_dataset("scratch", scratch, description="a corpus hostile jobs attack")
        owner.put_policy("scratch", policy("scratch", custom_code=True, memorization=False))
    try:
        yield d
    finally:
        d.stop()


def _run_to_end(
    dep: Deployment, spec: str, *, bundle_path: Path | None = None, approver: str = "olivia"
) -> JobView:
    with dep.client("theo") as team, dep.client(approver) as owner:
        job = team.submit(spec, bundle=bundle_path)
        assert job.state == "PENDING_APPROVAL", job
        owner.decide(job.id, approve=True, reason="test")
        for event in team.watch(job.id, timeout=600):
            if event.state == "AWAITING_REVIEW":  # custom code on `scratch` (custom_code: true)
                owner.review_release(job.id)
                owner.decide_release(job.id, approve=True, reason="test")
        return team.job(job.id)


# -- identities and roles -------------------------------------------------------------------


def test_a_caller_without_a_client_certificate_is_refused(dep: Deployment) -> None:
    ca_pem = dep.ca.cert_pem
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    channel = grpc.secure_channel(dep.address, creds)
    with channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GatewayStub(channel).WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails


def test_a_plaintext_caller_is_refused(dep: Deployment) -> None:
    with grpc.insecure_channel(dep.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GatewayStub(channel).WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(dep: Deployment, tmp_path: Path) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue-ca")
    ident = rogue.issue("eve", role=Role.OPERATOR, team="ops", out_dir=tmp_path / "ids")
    cert, key, _ = ident.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=dep.ca.cert_pem, private_key=key, certificate_chain=cert
    )
    with grpc.secure_channel(dep.address, creds) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GatewayStub(ch).QueryAudit(pb.QueryAuditRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_wrong_roles_are_refused_with_the_reason_and_audited(dep: Deployment) -> None:
    with dep.client("theo") as team, dep.client("carol") as compliance:
        assert team.whoami().role == "model-team"
        with pytest.raises(PermissionDenied, match="role model-team may not call PutPolicy"):
            team.put_policy("books", policy("books", custom_code=True))
        with pytest.raises(PermissionDenied, match="may not call QueryAudit"):
            team.audit_query(action="rpc.PutPolicy")
        with pytest.raises(PermissionDenied, match="role compliance may not call SubmitJob"):
            compliance.submit(TRAIN_SPEC.format(name="x", dataset="books", steps=1))
        denied = compliance.audit_query(action="rpc.PutPolicy", outcome="denied")
        assert any(r.event.principal == "theo" for r in denied)
        assert any(
            r.event.principal == "carol"
            for r in compliance.audit_query(action="rpc.SubmitJob", outcome="denied")
        )
    # The policy is unchanged: custom code is still refused on books.
    with dep.client("olivia") as owner:
        assert "custom_code: false" in owner.policy("books").document


def test_a_data_owner_cannot_write_another_owners_policy(dep: Deployment) -> None:
    with dep.client("otto") as other, pytest.raises(PermissionDenied, match="books"):
        other.put_policy("books", policy("books", custom_code=True))


def test_another_team_is_denied_with_every_reason(dep: Deployment) -> None:
    with dep.client("mallory") as outsider:
        job = outsider.submit(
            TRAIN_SPEC.format(name="outsider", dataset="books", steps=1).replace(
                "purpose: testing", "purpose: curiosity"
            )
        )
    assert job.state == "DENIED"
    text = " ".join(job.reasons)
    assert "other-team" in text and "curiosity" in text  # both failing rules, not the first only


def test_a_forbidden_spec_field_is_refused_before_anything_exists(dep: Deployment) -> None:
    with dep.client("theo") as team:
        before = len(team.jobs())
        with pytest.raises(InvalidInput, match="privileged"):
            team.submit(
                TRAIN_SPEC.format(name="p", dataset="books", steps=1) + "privileged: true\n"
            )
        with pytest.raises(InvalidInput, match="LD_PRELOAD"):
            team.submit(
                TRAIN_SPEC.format(name="p", dataset="books", steps=1)
                + "env: {LD_PRELOAD: /code/x.so}\n"
            )
        assert len(team.jobs()) == before


def test_custom_code_is_refused_where_the_policy_forbids_it(
    dep: Deployment, tmp_path: Path
) -> None:
    code = bundle(tmp_path / "b.tar.gz", {"attack.py": PICKLE_ATTACK})
    with dep.client("theo") as team:
        job = team.submit(
            CUSTOM_SPEC.format(name="c", ports="1").replace("[scratch]", "[books]"), bundle=code
        )
    assert job.state == "DENIED"
    assert any("custom" in r for r in job.reasons)


# -- the walking skeleton: a real job, released and verified ---------------------------------


def test_a_training_job_is_released_signed_and_verifiable(dep: Deployment, tmp_path: Path) -> None:
    from enclave.provenance import verify_release

    job = _run_to_end(dep, TRAIN_SPEC.format(name="ok", dataset="books", steps=6))
    assert job.state == "RELEASED", job.reasons
    assert job.image_id.startswith("sha256:")
    assert set(job.metrics) >= {"train_loss", "steps"}
    with dep.client("theo") as team:
        dest = team.download_release(job.id, tmp_path / "release")
        with pytest.raises(PermissionDenied, match="logs"):
            team.logs(job.id)  # stdout and stderr stay with the owners
    verify_release(dest, ca_cert_pem=dep.ca.cert_pem)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert "manifest.json" in files and "metrics.json" in files
    assert any(f.endswith(".safetensors") for f in files)
    with dep.client("carol") as compliance:
        actions = {r.event.action for r in compliance.audit_query(job_id=job.id)}
        assert {"container.start", "container.stop", "data.read", "release.sign"} <= actions
        # The data key's release, the staging and its destruction, each naming the version.
        for action in ("data.key_released", "data.staged", "data.destroyed"):
            recs = compliance.audit_query(job_id=job.id, action=action)
            assert [r.event.dataset for r in recs] == ["books@v1"], action
        reads = compliance.audit_query(job_id=job.id, action="data.read")
        assert reads and all(
            (r.event.dataset or "").startswith("books") and r.event.file for r in reads
        )


# -- hostile jobs through the whole system ---------------------------------------------------


def test_a_job_that_opens_network_connections_reaches_nothing(
    dep: Deployment, tmp_path: Path
) -> None:
    listener = Listener()
    try:
        ports = f"{listener.port},{dep.running.port}"
        code = bundle(tmp_path / "net.tar.gz", {"attack.py": NETWORK_ATTACK})
        job = _run_to_end(dep, CUSTOM_SPEC.format(name="net", ports=ports), bundle_path=code)
    finally:
        listener.close()
    assert listener.received == []
    with dep.client("olivia") as owner:
        logs = owner.logs(job.id)
    report = json.loads(next(ln for ln in logs.splitlines() if ln.startswith(b"REPORT "))[7:])
    # What the job printed is kept sealed on the site's disk, never in plaintext.
    kept = (dep.home / "site" / "runs" / job.id / "logs.sealed").read_bytes()
    assert b"REPORT" not in kept and b"interfaces" not in kept
    assert report["interfaces"] == ["lo"]
    attempts = {k: v for k, v in report.items() if k != "interfaces"}
    assert attempts and all(v != "ok" for v in attempts.values()), attempts


@pytest.mark.parametrize(
    ("attack", "expected"),
    [(PICKLE_ATTACK, "artifact"), (EXTRA_TENSOR_ATTACK, "weights")],
    ids=["pickle", "extra-tensor"],
)
def test_a_job_that_writes_a_pickle_or_an_extra_tensor_gets_no_release(
    dep: Deployment, tmp_path: Path, attack: str, expected: str
) -> None:
    code = bundle(tmp_path / "b.tar.gz", {"attack.py": attack})
    job = _run_to_end(dep, CUSTOM_SPEC.format(name="smuggle", ports="1"), bundle_path=code)
    assert job.state == "REJECTED", (job.state, job.reasons)
    assert expected in " ".join(job.reasons).lower()
    assert "smuggled.payload" not in " ".join(job.reasons)  # names from the job never echo
    with dep.client("theo") as team, pytest.raises((NotFound, InvalidInput, Exception)) as err:
        team.download_release(job.id, tmp_path / "nothing")
    assert "release" in str(err.value).lower()
    assert not (dep.home / "gateway" / "releases" / job.id).exists()


# -- the audit log --------------------------------------------------------------------------


def test_an_edited_audit_record_is_detected_and_named(dep: Deployment, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from enclave.audit import verify_export
    from policies.errors import AuditLogError

    with dep.client("carol") as compliance:
        export = compliance.audit_export(tmp_path / "audit.jsonl")
    pub: Any = serialization.load_pem_public_key(
        (dep.home / "gateway" / "audit-signing.pub").read_bytes()
    )
    good = verify_export(export, public_key=pub)
    lines = export.read_text().splitlines()
    records = [i for i, ln in enumerate(lines) if '"checkpoint"' not in ln]
    assert good.size == len(records) > 5
    # Change who did something, in a record in the middle of the log.
    idx = records[len(records) // 2]
    rec = json.loads(lines[idx])
    rec["leaf"]["principal"] = "someone-else"
    lines[idx] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError) as err:
        verify_export(edited, public_key=pub)
    assert f"record {rec['seq']}:" in str(err.value)


def test_proofs_and_the_takedown_report_over_the_wire(dep: Deployment, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from enclave.audit import SignedCheckpoint, verify_consistency, verify_inclusion

    pub: Any = serialization.load_pem_public_key(
        (dep.home / "gateway" / "audit-signing.pub").read_bytes()
    )
    job = _run_to_end(dep, TRAIN_SPEC.format(name="report", dataset="books", steps=2))
    assert job.state == "RELEASED", job.reasons
    with dep.client("carol") as compliance, dep.client("theo") as team:
        with pytest.raises(PermissionDenied, match="may not call GetCheckpoint"):
            team.audit_checkpoint()
        old = compliance.audit_checkpoint(fresh=True)
        read = compliance.audit_query(job_id=job.id, action="data.read")[0]
        compliance.audit_query(job_id=job.id)  # one more audited RPC: the log grows
        new = compliance.audit_checkpoint(fresh=True)
        signed = SignedCheckpoint(new.size, new.root, new.time, new.signature)
        signed.verify(pub)
        assert new.size > old.size
        proof = compliance.audit_inclusion_proof(read.seq, new.size)
        assert proof.leaf_hash == read.leaf_hash
        verify_inclusion(
            index=read.seq,
            size=new.size,
            leaf=proof.leaf_hash,
            proof=list(proof.hashes),
            expected_root=signed.root,
        )
        cons = compliance.audit_consistency_proof(old.size, new.size)
        verify_consistency(
            old_size=old.size,
            new_size=new.size,
            old_root=old.root,
            new_root=signed.root,
            proof=list(cons.hashes),
        )
        report = compliance.audit_report("books")
    reads = {job_id: set(files) for job_id, files in report.reads.items()}
    assert job.id in reads and read.event.file in reads[job.id]
    assert job.id in {r.job_id for r in report.releases}
    assert any(a.principal == "olivia" and a.action == "dataset.register" for a in report.accesses)


def test_identity_issuance_is_audited(dep: Deployment) -> None:
    with dep.client("carol") as compliance:
        issued = compliance.audit_query(action="identity.issue")
    names = {r.event.details["name"] for r in issued}
    assert {"olivia", "theo", "carol", "oscar", "gateway"} <= names
