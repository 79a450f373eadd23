"""A site whose runs end at once, and a home of identities: what the gateway benches and the load
run put the gateway against when the site itself is not what they measure.

:class:`FastSite` is the shipped :class:`enclave.fake.FakeSite` with a script: each run
reports RUNNING, CHECKING and RELEASED (with a release directory holding a manifest, metrics and,
when asked, one payload file of ``release_bytes``); the fake counts the runs of every job id, so
that a job run twice is seen. :func:`make_home` lays out a deployment home (CA and people) the way
``sealroom ca init`` and ``ca issue`` do; :func:`prepare` registers a small dataset and a policy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from enclave.contract import Report, RunOrder, SiteReport
from enclave.fake import FakeSite
from enclave.identity import IdentityFiles
from enclave.provenance import (
    MANIFEST,
    SIGNATURE,
    SIGNING_CONTEXT,
    SITE_CERT,
    ArtifactDigest,
    AuditPosition,
    CheckRecord,
    DatasetVersion,
    GateRecord,
    Manifest,
    ReleaseContext,
    SiteSigner,
)
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.identity import Role
from policies.lifecycle import JobState
from policies.release import MANDATORY_CHECKS
from tests.integration._deployment import policy

PEOPLE: dict[str, tuple[Role, str]] = {
    "olivia": (Role.DATA_OWNER, "library"),
    "theo": (Role.MODEL_TEAM, "model-team"),
    "carol": (Role.COMPLIANCE, "audit"),
    "oscar": (Role.OPERATOR, "ops"),
}

FAST_SPEC = """\
name: {name}
datasets: [{dataset}]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
resources: {{cpus: 1, memory_mb: 1024, timeout_s: 60}}
"""

CUSTOM_SPEC = """\
name: {name}
datasets: [{dataset}]
base_model: tiny-lm
trainer: custom
entrypoint: "job:Module"
purpose: testing
resources: {{cpus: 1, memory_mb: 1024, timeout_s: 60}}
"""

ONE_STEP_SPEC = """\
name: {name}
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters: {{max_steps: 1, batch_size: 2, block_size: 32, seed: 0}}
resources: {{cpus: 1, memory_mb: 2048, timeout_s: 300}}
"""
"""A real container job that trains one step: what the launch bench and the load run start."""

BLOCK = 1 << 20


def write_payload(path: Path, size: int) -> Path:
    """A file of ``size`` bytes (one random MiB repeated: nothing on the wire compresses it)."""
    block = os.urandom(BLOCK)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, BLOCK)])
            left -= BLOCK
    return path


def _manifest(
    order: RunOrder, site: str, artifacts: list[ArtifactDigest], *, checks: tuple[str, ...]
) -> bytes:
    context = ReleaseContext(
        job_id=order.job_id,
        spec_sha256=order.spec_sha256,
        bundle_sha256=order.bundle_sha256 or None,
        image_id="sha256:" + "0" * 64,
        datasets={n: DatasetVersion(v, "0" * 64) for n, v in order.datasets},
        policy_versions=dict(order.policy_versions),
        approval_binding=order.approval_binding,
        approvals=tuple(order.approvals),
        audit=AuditPosition(checkpoint_root=order.audit_root or None),
    )
    gates = tuple(
        GateRecord(n, "fast", tuple(CheckRecord(c, True) for c in checks))
        for n, _ in order.datasets
    )
    return Manifest(
        context=context,
        site=site,
        issued_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
        gates=gates,
        artifacts=tuple(artifacts),
    ).to_bytes()


class FastSite(FakeSite):
    """The shipped fake site, its runs released at once with a payload of ``release_bytes``
    (held ``hold_s`` first); the release directory goes once the gateway has taken it."""

    def __init__(
        self,
        root: Path,
        *,
        release_bytes: int = 0,
        hold_s: float = 0.0,
        signer: SiteSigner | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        name = signer.site if signer is not None else "fast-site"
        super().__init__(root, name=name, script=self._release)
        # With a signer (a remote site in the load run), each release is signed as a real
        # site signs it, with every mandatory check recorded passed (the gate is not what this
        # loads), so that a gateway takes it over the site link.
        self.signer = signer
        self.hold_s = hold_s
        self._payload = None
        self._payload_sha256 = ""
        if release_bytes:
            self._payload = write_payload(root / "payload.bin", release_bytes)
            with self._payload.open("rb") as f:
                self._payload_sha256 = hashlib.file_digest(f, "sha256").hexdigest()

    def run(self, order: RunOrder, report: Report) -> None:
        """The fake's run, keeping no order once it is over (the fake keeps every order for the
        tests that inspect them; at 10,000 jobs that would be the fake's memory, counted as the
        gateway's, since the site runs in the gateway's process). Run counts are kept."""
        try:
            super().run(order, report)
        finally:
            with self._lock:
                self.orders.clear()

    def _release(self, order: RunOrder) -> Iterator[SiteReport]:
        job = order.job_id
        yield SiteReport(
            job,
            state=JobState.RUNNING,
            image_id=self.image_id(),
            reason="running (fast site)",
            audit_action="container.start",
        )
        if self.hold_s:
            time.sleep(self.hold_s)
        yield SiteReport(job, state=JobState.CHECKING, reason="release gate")
        out = self.root / "releases" / job
        out.mkdir(parents=True)
        try:
            metrics = b'{"train_loss": 1.5}'
            (out / "metrics.json").write_bytes(metrics)
            artifacts = [
                ArtifactDigest("metrics.json", hashlib.sha256(metrics).hexdigest(), len(metrics))
            ]
            if self._payload is not None:
                (out / "weights").mkdir()
                os.link(self._payload, out / "weights" / "model.safetensors")
                size = self._payload.stat().st_size
                artifacts.append(
                    ArtifactDigest("weights/model.safetensors", self._payload_sha256, size)
                )
            # A well-formed manifest (unsigned: the gateway does not check the site's signature,
            # the team does), so that a download sends its digests as it would a real release's.
            checks = tuple(sorted(MANDATORY_CHECKS)) if self.signer else ("artifacts",)
            body = _manifest(order, self.name, artifacts, checks=checks)
            (out / MANIFEST).write_bytes(body)
            if self.signer is not None:
                (out / SIGNATURE).write_bytes(self.signer.key.sign(SIGNING_CONTEXT + body))
                (out / SITE_CERT).write_bytes(self.signer.cert_pem)
            yield SiteReport(
                job,
                state=JobState.RELEASED,
                reason="released",
                metrics={"train_loss": 1.5},
                release_dir=out,
                audit_action="release.sign",
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def write_runs(self, path: Path) -> None:
        """The per-job run counts, as JSON (read by the load run after the gateway stops)."""
        path.write_text(json.dumps(dict(self.runs)))


@dataclass(frozen=True)
class Home:
    home: Path
    identities: dict[str, IdentityFiles]

    def client(self, address: str, name: str, *, timeout_s: float = 120.0) -> Client:
        return Client(address, self.identities[name], timeout_s=timeout_s)


def make_home(root: Path) -> Home:
    """A deployment home under ``root``: the CA and one identity per person in PEOPLE."""
    home = root / "home"
    ca = CertificateAuthority.init(home / "ca")
    ids = {
        name: ca.issue(name, role=role, team=team, out_dir=home / "identities")
        for name, (role, team) in PEOPLE.items()
    }
    return Home(home, ids)


def prepare(
    owner: Client, dataset: str, *, tmp: Path, mode: str = "automatic", custom_code: bool = True
) -> None:
    """Register a small dataset and its policy (no memorization check: no model runs here)."""
    archive = tmp / f"{dataset}.tar"
    with tarfile.open(archive, mode="w") as tar:
        data = b"a small protected text\n" * 64
        info = tarfile.TarInfo("doc-0.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    owner.register_dataset(dataset, archive)
    owner.put_policy(
        dataset, policy(dataset, mode=mode, custom_code=custom_code, memorization=False)
    )
