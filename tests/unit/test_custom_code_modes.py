"""The three custom-code modes of a policy, and the owner's review of reviewed code's release.

``custom_code: false`` runs built-in trainers only; ``reviewed`` runs the team's own Python but
approval is manual whatever the policy's approval mode, and a passed release waits
(AWAITING_REVIEW) until the owner has read what its weights can carry and approved it;
``private`` runs a team's graph under the site's DP-SGD trainer only. A stored policy written
before the modes (``custom_code: true``) means ``reviewed`` and keeps its digest.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from enclave.contract import RunOrder, SiteReport
from enclave.provenance import (
    ArtifactDigest,
    AuditPosition,
    CheckRecord,
    GateRecord,
    Manifest,
    ReleaseContext,
)
from enclave.provenance import DatasetVersion as ProvenanceVersion
from gateway.core import Gateway
from policies.access import Outcome, Rule
from policies.document import CustomCode, parse_policy
from policies.errors import (
    IntegrityError,
    InvalidInput,
    InvalidState,
    NotFound,
    PermissionDenied,
)
from policies.lifecycle import TERMINAL, JobState, check_transition
from policies.review import surviving_bits, weights_capacity
from tests.integration._deployment import policy
from tests.unit._policy_factory import make_policy
from tests.unit.test_gateway_core import (
    OLIVIA,
    OTTO,
    THEO,
    ScriptedSite,
    _bundle,
    _gateway,
    _register,
    spec,
)
from tests.unit.test_policy_access import decide, make_spec

CUSTOM = {"trainer": "custom", "entrypoint": "m:M"}
GRAPH = {"trainer": "private", "hyperparameters": {"dp_epsilon": 2.0}}
DP = {"release": {"differential_privacy": {"epsilon_per_job": 4.0, "epsilon_budget": 8.0}}}


def _mode(text: str) -> str:
    return policy("books").replace("custom_code: false", f"custom_code: {text}")


# --- the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "mode"),
    [
        ("false", CustomCode.FORBIDDEN),
        ("true", CustomCode.REVIEWED),
        ("reviewed", CustomCode.REVIEWED),
        ("private", CustomCode.PRIVATE),
    ],
)
def test_the_policy_names_one_of_three_modes(written: str, mode: CustomCode) -> None:
    assert parse_policy(_mode(written)).trainers.custom_code is mode


def test_a_policy_stored_with_custom_code_true_keeps_its_digest() -> None:
    # Approvals bind the policy's digest: re-reading an old policy must not change it.
    doc = parse_policy(_mode("true"))
    assert doc.canonical["trainers"]["custom_code"] is True
    assert doc.digest() != parse_policy(_mode("reviewed")).digest()
    assert doc.trainers.custom_code is CustomCode.REVIEWED


@pytest.mark.parametrize("written", ["yes-please", "'true'", "1", "automatic"])
def test_an_unknown_mode_is_refused_naming_the_line(written: str) -> None:
    with pytest.raises(Exception, match=r"line \d+: trainers\.custom_code"):
        parse_policy(_mode(written))


# --- decisions ------------------------------------------------------------------------------


def test_forbidden_runs_built_in_trainers_only() -> None:
    policies = {"books": make_policy(trainers={"custom_code": False})}
    assert decide(make_spec(), policies=policies).outcome is Outcome.AUTO_APPROVE
    for job in (CUSTOM, GRAPH):
        decision = decide(make_spec(**job), policies=policies)
        assert decision.outcome is Outcome.DENY and decision.rules == {Rule.CUSTOM_CODE}


@pytest.mark.parametrize("written", ["reviewed", True])
def test_reviewed_custom_code_needs_an_owner_even_under_automatic_approval(
    written: object,
) -> None:
    policies = {"books": make_policy(trainers={"custom_code": written})}
    assert policies["books"].approval.quorum == 0  # the policy says automatic
    decision = decide(make_spec(**CUSTOM), policies=policies)
    assert decision.outcome is Outcome.NEEDS_APPROVAL
    [need] = decision.approvals
    assert need.quorum == 1 and need.owners == {"olivia", "oscar"}
    # Built-in trainers on the same dataset still follow the policy's own mode.
    assert decide(make_spec(), policies=policies).outcome is Outcome.AUTO_APPROVE


def test_reviewed_keeps_a_larger_quorum() -> None:
    p = make_policy(trainers={"custom_code": "reviewed"}, approval={"mode": "quorum", "quorum": 2})
    [need] = decide(make_spec(**CUSTOM), policies={"books": p}).approvals
    assert need.quorum == 2


def test_private_runs_graphs_only_and_under_a_dp_policy() -> None:
    policies = {"books": make_policy(trainers={"custom_code": "private"})}
    assert decide(make_spec(**GRAPH), policies=policies).outcome is Outcome.AUTO_APPROVE
    python = decide(make_spec(**CUSTOM), policies=policies)
    assert python.rules == {Rule.CUSTOM_CODE}
    assert "trainer: private" in " ".join(str(r) for r in python.reasons)
    # The site runs the DP-SGD itself, so a DP policy admits the graph and charges its epsilon.
    dp = {"books": make_policy(trainers={"custom_code": "private"}, **DP)}
    decision = decide(make_spec(**GRAPH), policies=dp)
    assert decision.outcome is Outcome.AUTO_APPROVE
    assert Rule.DP_CUSTOM_CODE in decide(make_spec(**CUSTOM), policies=dp).rules


# --- the capacity ---------------------------------------------------------------------------


def test_capacity_is_elements_times_the_bits_the_gate_leaves() -> None:
    assert surviving_bits("BF16", 2) == 14 and surviving_bits("F16", 4) == 12
    assert surviving_bits("F32", 2) == 32  # not a release dtype: nothing scrubbed
    cap = weights_capacity([("BF16", (4, 8)), ("BF16", (16,)), ("F16", ())], scrub_bits=2)
    assert cap.elements == 49 and cap.bits == 49 * 14
    assert cap.bits_per_element == {"BF16": 14, "F16": 14}
    with pytest.raises(InvalidInput):
        weights_capacity([("INT4", (2,))], scrub_bits=2)
    with pytest.raises(InvalidInput):
        weights_capacity([("BF16", (2,))], scrub_bits=5)


# --- the lifecycle --------------------------------------------------------------------------


def test_awaiting_review_sits_between_checking_and_the_verdict() -> None:
    check_transition(JobState.CHECKING, JobState.AWAITING_REVIEW)
    check_transition(JobState.AWAITING_REVIEW, JobState.RELEASED)
    check_transition(JobState.AWAITING_REVIEW, JobState.REJECTED)
    assert JobState.AWAITING_REVIEW not in TERMINAL
    for other in (JobState.RUNNING, JobState.CANCELLED, JobState.ERROR, JobState.QUEUED):
        with pytest.raises(InvalidState):
            check_transition(JobState.AWAITING_REVIEW, other)
    with pytest.raises(InvalidState):
        check_transition(JobState.RUNNING, JobState.AWAITING_REVIEW)


# --- the review flow ------------------------------------------------------------------------

SHAPES = {"w": (4, 8), "b": (16,)}
"""The released tensors the scripted site signs: 48 BF16 elements, 14 bits each at scrub 2."""


def _signed_release(
    site: ScriptedSite, order: RunOrder, weights_bytes: bytes | None = None
) -> list[SiteReport]:
    """The scripted site's release, with a manifest in the canonical form a site signs (its
    weights file holding ``weights_bytes`` instead of tensors, when given)."""
    import hashlib

    out = site.tmp / f"release-{order.job_id}"
    (out / "weights").mkdir(parents=True)
    weights = out / "weights" / "model.safetensors"
    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}, weights)
    if weights_bytes is not None:
        weights.write_bytes(weights_bytes)
    (out / "metrics.json").write_text('{"train_loss": 1.5}')
    arts = tuple(
        ArtifactDigest(
            p, hashlib.sha256((out / p).read_bytes()).hexdigest(), (out / p).stat().st_size
        )
        for p in ("metrics.json", "weights/model.safetensors")
    )
    manifest = Manifest(
        context=ReleaseContext(
            job_id=order.job_id,
            spec_sha256=order.spec_sha256,
            bundle_sha256=order.bundle_sha256 or None,
            image_id=site.image_id(),
            datasets={n: ProvenanceVersion(v, "r" * 8) for n, v in order.datasets},
            policy_versions=dict(order.policy_versions),
            approval_binding=order.approval_binding,
            approvals=order.approvals,
            audit=AuditPosition(checkpoint_root=order.audit_root),
        ),
        site=site.name,
        issued_at=dt.datetime.now(dt.UTC),
        gates=(
            GateRecord(
                "books",
                "v1",
                (
                    CheckRecord("artifacts", True),
                    CheckRecord("weights", True, {"tensors": 2}),
                    CheckRecord("metrics", True),
                ),
            ),
        ),
        artifacts=arts,
    )
    (out / "manifest.json").write_bytes(manifest.to_bytes())
    return [
        SiteReport(order.job_id, state=JobState.RUNNING, image_id=site.image_id()),
        SiteReport(order.job_id, state=JobState.CHECKING),
        SiteReport(
            order.job_id,
            state=JobState.RELEASED,
            reason="released",
            metrics={"train_loss": 1.5},
            release_dir=out,
            audit_action="release.sign",
        ),
    ]


def _wait(g: Gateway, job_id: str, until: set[JobState]) -> JobState:
    for _ in range(200):
        state = g.store.job(job_id).state
        if state in until:
            return state
        threading.Event().wait(0.05)
    return g.store.job(job_id).state


@pytest.fixture
def reviewed(tmp_path: Path, site: ScriptedSite) -> Iterator[tuple[Gateway, str]]:
    """A custom job on a dataset whose (legacy, automatic) policy says ``custom_code: true``,
    run by the scripted site up to its passed release."""
    g = _gateway(tmp_path, site)
    _register(g, tmp_path, custom_code=True, mode="automatic")
    site.script = lambda order: _signed_release(site, order)
    code = _bundle(tmp_path / "b.tar.gz", b"class M: pass\n")
    job = g.submit(principal=THEO, spec_text=spec("custom"), bundle=code, bundle_sha256="")
    assert job.state is JobState.PENDING_APPROVAL  # automatic in the policy, manual for custom
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="read the code")
    g.start()
    try:
        assert _wait(g, job.id, {JobState.AWAITING_REVIEW, *TERMINAL}) is JobState.AWAITING_REVIEW
        yield g, job.id
    finally:
        g.stop()
        g.audit.close()


@pytest.mark.parametrize(
    "weights",
    [
        (1 << 62).to_bytes(8, "little") + b"{}",  # a header longer than any file
        (40).to_bytes(8, "little") + b'{"w": {"dtype": "BF16", "shape": [4, 8]',  # cut short
        b"\xff" * 64,
    ],
    ids=["header-longer-than-any-file", "header-cut-short", "no-header"],
)
def test_a_release_whose_weights_are_not_safetensors_is_named_not_an_internal_error(
    tmp_path: Path, site: ScriptedSite, weights: bytes
) -> None:
    """The owner's review reads each weights file's header: one a site signed but that is not
    a safetensors file is refused as such (DATA_LOSS at the edge), and the job keeps waiting."""
    g = _gateway(tmp_path, site)
    _register(g, tmp_path, custom_code=True, mode="automatic")
    site.script = lambda order: _signed_release(site, order, weights)
    code = _bundle(tmp_path / "b.tar.gz", b"class M: pass\n")
    job = g.submit(principal=THEO, spec_text=spec("custom"), bundle=code, bundle_sha256="")
    g.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="read the code")
    g.start()
    try:
        assert _wait(g, job.id, {JobState.AWAITING_REVIEW, *TERMINAL}) is JobState.AWAITING_REVIEW
        with pytest.raises(IntegrityError, match=r"model\.safetensors: not a safetensors file"):
            g.release_review(principal=OLIVIA, job_id=job.id)
        with pytest.raises(IntegrityError, match="not a safetensors file"):
            g.decide_release(principal=OLIVIA, job_id=job.id, approve=True, reason="")
        assert g.store.job(job.id).state is JobState.AWAITING_REVIEW
    finally:
        g.stop()
        g.audit.close()


@pytest.fixture
def site(tmp_path: Path) -> ScriptedSite:
    return ScriptedSite(tmp_path)


def test_a_passed_release_of_reviewed_code_waits_and_the_team_sees_the_state_only(
    reviewed: tuple[Gateway, str],
) -> None:
    g, job_id = reviewed
    seen = g.job(principal=THEO, job_id=job_id)
    assert seen.state is JobState.AWAITING_REVIEW
    assert seen.metrics == {} and seen.release_id == ""
    with pytest.raises(InvalidState, match="nothing has been released"):
        g.release_dir(principal=THEO, job_id=job_id)
    # Neither the team nor an owner of other data may review it, nor see that it exists.
    for who in (THEO, OTTO):
        with pytest.raises((NotFound, PermissionDenied)):
            g.release_review(principal=who, job_id=job_id)
        with pytest.raises((NotFound, PermissionDenied)):
            g.decide_release(principal=who, job_id=job_id, approve=True, reason="")
    assert g.store.job(job_id).state is JobState.AWAITING_REVIEW


def test_the_owner_reads_the_capacity_and_the_checks_then_approves(
    reviewed: tuple[Gateway, str],
) -> None:
    g, job_id = reviewed
    report = g.release_review(principal=OLIVIA, job_id=job_id)
    assert report.capacity.elements == 48 and report.capacity.bits == 48 * 14
    assert [(c.check, c.passed) for c in report.checks] == [
        ("artifacts", True),
        ("weights", True),
        ("metrics", True),
    ]
    assert report.reviewers == {"olivia"} and report.approved_by == frozenset()
    done = g.decide_release(principal=OLIVIA, job_id=job_id, approve=True, reason="fine")
    assert done.state is JobState.RELEASED
    assert done.metrics == {"train_loss": 1.5} and done.release_id == report.release_id
    assert (g.release_dir(principal=THEO, job_id=job_id) / "metrics.json").exists()
    [approved] = g.audit.query(job=job_id, action="release.approve")
    assert approved.event.principal == "olivia"
    assert approved.event.details["weights_capacity_bits"] == 672
    assert g.audit.query(job=job_id, action="release.review")
    with pytest.raises(InvalidState, match="not waiting for review"):
        g.decide_release(principal=OLIVIA, job_id=job_id, approve=False, reason="")


def test_the_owner_rejects_and_nothing_is_kept(reviewed: tuple[Gateway, str]) -> None:
    g, job_id = reviewed
    done = g.decide_release(principal=OLIVIA, job_id=job_id, approve=False, reason="too wide")
    assert done.state is JobState.REJECTED and done.metrics == {}
    assert "too wide" not in " ".join(done.reasons)  # the owner's words stay in the audit
    assert not (g.home / "releases" / job_id).exists()
    [rejected] = g.audit.query(job=job_id, action="release.reject")
    assert rejected.event.details["reason"] == "too wide"


def test_built_in_trainers_on_a_reviewed_dataset_release_without_review(
    tmp_path: Path, site: ScriptedSite
) -> None:
    g = _gateway(tmp_path, site)
    _register(g, tmp_path, custom_code=True, mode="automatic")
    site.script = lambda order: _signed_release(site, order)
    g.start()
    try:
        job = g.submit(principal=THEO, spec_text=spec(), bundle=None, bundle_sha256="")
        assert _wait(g, job.id, set(TERMINAL)) is JobState.RELEASED
    finally:
        g.stop()
        g.audit.close()


def test_review_report_is_json_ready(reviewed: tuple[Gateway, str]) -> None:
    g, job_id = reviewed
    as_json = json.loads(json.dumps(g.release_review(principal=OLIVIA, job_id=job_id).to_dict()))
    assert as_json["weights_capacity_bits"] == 672 and as_json["bits_per_element"] == {"BF16": 14}
