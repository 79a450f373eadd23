"""The end of a run that exited cleanly: the release gate, for every dataset's rules, and signing.

:func:`check_and_sign` runs :func:`enclave.gate.run_gate` once per dataset's release rules
(the memorization probe and the DP check with inputs only the site computes), audits every
check, and signs the provenance manifest with the site's identity when all pass; it returns the
run's terminal report. What a built-in trainer's release must be (:func:`release_form`) and the
DP-SGD the site grants a job (:func:`dp_parameters`) come from the approved spec, the site's own
copy of the base model and its own plaintext: never from what the job wrote. Every read of the
plaintext here is reported (``data.gate-read``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from enclave import _channels, _dp
from enclave.contract import Report, RunOrder, SiteReport
from enclave.gate import (
    DPInputs,
    GateResult,
    MemorizationInputs,
    ReleaseForm,
    ReleaseKind,
    run_gate,
)
from enclave.identity import IdentityFiles
from enclave.provenance import AuditPosition, ReleaseContext, SiteSigner, sign_release
from enclave.provenance import DatasetVersion as ProvenanceVersion
from enclave.vault import DatasetVersion as VaultVersion
from enclave.vault import Vault
from policies import channels
from policies.channels import REJECTED_BY_CHECK, TeamReason
from policies.errors import ReleaseRefused, SiteError
from policies.lifecycle import JobState
from policies.release import CheckName, ReleaseRules, make_layout
from trainers import privacy
from trainers.contract import DPParameters
from trainers.errors import TrainerError
from trainers.labelled import labelled_file
from trainers.release import expected_release
from trainers.weights import TensorLayout


def check_and_sign(
    order: RunOrder,
    report: Report,
    *,
    vault: Vault,
    image: str,
    signer: IdentityFiles,
    dp_set: DPParameters | None,
    run_dir: Path,
    output: Path,
    rules: list[tuple[str, ReleaseRules]],
    model_dir: Path,
    layout: Any,
    versions: list[VaultVersion],
    acct: channels.LeakageAccount,
    quantum_s: float,
) -> SiteReport:
    """Run the gate once per dataset's rules; release only if every run passes. Returns
    the terminal report (RELEASED or REJECTED), for the caller to publish on the grid.
    ``dp_set`` is the DP-SGD this site set for the job (:func:`dp_parameters`)."""
    job = order.job_id
    code_dir = run_dir / "code" if order.bundle is not None else None
    form = release_form(order, report, vault, model_dir, versions, code_dir=code_dir)
    gates = gate_each(
        job,
        report,
        output,
        rules,
        layout=layout,
        form=form,
        run_dir=run_dir,
        spent=order.epsilon_spent,
        # The site's accountant over the DP-SGD it set (+inf where it set none), at each
        # policy's delta: never what the job wrote.
        epsilon=lambda delta: _dp.charged_epsilon(dp_set, delta=delta),
        memorization=lambda dataset: memorization_inputs(
            job, report, vault, model_dir, versions, dataset
        ),
    )
    refusal = refused(job, gates)
    if refusal is not None:
        return refusal
    context = ReleaseContext(
        job_id=job,
        spec_sha256=order.spec_sha256,
        bundle_sha256=order.bundle_sha256 or None,
        image_id=image,
        datasets={
            v.name: ProvenanceVersion(version=v.version, root_hash=v.root_hash) for v in versions
        },
        policy_versions=dict(order.policy_versions),
        approval_binding=order.approval_binding,
        approvals=tuple(order.approvals),
        audit=AuditPosition(checkpoint_root=order.audit_root),
        channels={**acct.items, "budget_bits": acct.budget},
    )
    try:
        # Stamped with the grid point before signing: the second it was signed would tell
        # how long the checks took (the job steers that).
        issued = channels.round_time(time.time(), quantum_s)
        signed = sign_release(
            gates,
            context=context,
            signer=SiteSigner.from_files(cert=signer.cert, key=signer.key),
            now=dt.datetime.fromtimestamp(issued, dt.UTC),
        )
    except ReleaseRefused as e:
        return _channels.terminal(job, JobState.REJECTED, TeamReason.REJECTED_SIGNING, str(e))
    metrics = json.loads((signed.directory / "metrics.json").read_text())
    return SiteReport(
        job,
        state=JobState.RELEASED,
        reason=TeamReason.RELEASED,
        metrics={k: float(v) for k, v in metrics.items()},
        release_dir=signed.directory,
        audit_action="release.sign",
        details={"manifest_sha256": signed.manifest_sha256},
    )


def gate_each(
    run_id: str,
    report: Report,
    source: Path,
    rules: list[tuple[str, ReleaseRules]],
    *,
    layout: Any,
    form: ReleaseForm | None,
    run_dir: Path,
    spent: Mapping[str, float] | None = None,
    epsilon: Callable[[float], float] | None = None,
    memorization: Callable[[str], MemorizationInputs] | None = None,
) -> dict[str, GateResult]:
    """Run the gate over ``source`` once per dataset's rules (into ``run_dir/gate-DATASET``)
    and audit every check. The DP check, where a dataset's rules have it, weighs the ε the
    site charges (``epsilon`` at the rules' δ) against what the dataset has ``spent``; the
    memorization probe, where they have it, gets ``memorization(dataset)``. Rules that ask for
    a check whose inputs are not given are refused by the gate (:class:`InvalidInput`)."""
    gates: dict[str, GateResult] = {}
    for dataset, r in rules:
        dp = None
        if CheckName.DP in r.checks and r.dp is not None and epsilon is not None:
            dp = DPInputs(spent=(spent or {}).get(dataset, 0.0), epsilon=epsilon(r.dp.delta))
        memo = None
        if CheckName.MEMORIZATION in r.checks and memorization is not None:
            memo = memorization(dataset)
        result = run_gate(
            source,
            rules=r,
            base_layout=layout,
            form=form,
            dest_dir=run_dir / f"gate-{dataset}",
            memorization=memo,
            dp=dp,
        )
        audit_checks(run_id, report, dataset, result)
        gates[dataset] = result
    return gates


def release_layout(form: ReleaseForm) -> TensorLayout:
    """A release form's layout as the trainers write it (name -> (dtype, shape))."""
    return {n: (s.dtype, s.shape) for n, s in make_layout(form.layout).items()}


def memorization_inputs(
    job: str,
    report: Report,
    vault: Vault,
    model_dir: Path,
    versions: list[VaultVersion],
    dataset: str,
) -> MemorizationInputs:
    """What the memorization probe reads: the base model's tokenizer and ``dataset``'s
    documents, from the site's own plaintext (the read reported)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The probe tokenises whole documents, longer than the model's context on purpose (it
    # samples windows from them): that warning is noise here.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [
        data.decode("utf-8", "replace")
        for v in versions
        if v.name == dataset
        for _, data in vault.iter_plaintext(v)
    ]
    report(
        SiteReport(
            job,
            audit_action="data.gate-read",
            audit_dataset=dataset,
            details={"purpose": "memorization check", "files": len(texts)},
        )
    )
    return MemorizationInputs(model_dir=model_dir, tokenizer=tokenizer, texts=texts)


def audit_checks(job: str, report: Report, dataset: str, result: GateResult) -> None:
    """Report every check of one gate run as an audit record."""
    for check in result.checks:
        report(
            SiteReport(
                job,
                audit_action="release.check",
                audit_dataset=dataset,
                audit_outcome="ok" if check.passed else "denied",
                details={
                    "check": str(check.name),
                    "outcome": str(check.outcome),
                    "reasons": list(check.reasons),
                    "figures": jsonable(check.figures),
                },
            )
        )


def refused(job: str, gates: dict[str, GateResult]) -> SiteReport | None:
    """The REJECTED end naming every refused check of ``gates``, or None when all passed."""
    reasons = [
        f"{d}: {c.name}: {', '.join(c.reasons) or c.outcome}"
        for d, g in gates.items()
        for c in g.checks
        if not c.passed
    ]
    if not reasons:
        return None
    first = next(c.name for g in gates.values() for c in g.checks if not c.passed)
    return _channels.terminal(
        job,
        JobState.REJECTED,
        REJECTED_BY_CHECK[CheckName(first)],
        "release refused: " + "; ".join(reasons),
    )


def dp_parameters(
    order: RunOrder, report: Report, vault: Vault, model_dir: Path, versions: list[VaultVersion]
) -> DPParameters | None:
    """The DP-SGD this site grants the job (None: none), its sample rate from the training
    samples counted in the site's own plaintext with the trainer's own rules."""

    return _dp.decide(
        order.spec,
        training_rows=lambda: training_rows(
            order, report, vault, model_dir, versions, purpose="DP-SGD sample rate"
        ),
    )


def training_rows(
    order: RunOrder,
    report: Report,
    vault: Vault,
    model_dir: Path,
    versions: list[VaultVersion],
    *,
    purpose: str,
) -> int:
    """The training samples the job's built-in trainer draws from, counted in the site's own
    plaintext with the trainer's own rules (each read reported, for ``purpose``)."""

    def dataset_files() -> Iterator[tuple[str, bytes]]:
        return _audited_files(order, report, vault, versions, purpose=purpose)

    return privacy.training_rows(
        order.spec.trainer,
        dict(order.spec.hyperparameters),
        model_dir=model_dir,
        dataset_files=dataset_files,
    )


def release_form(
    order: RunOrder,
    report: Report,
    vault: Vault,
    model_dir: Path,
    versions: list[VaultVersion],
    *,
    code_dir: Path | None,
) -> ReleaseForm | None:
    """What a built-in trainer's release is, from the approved spec and the site's own
    copy of the base model (and, for a classifier without given labels, the data; for a
    private graph, the program in the bundle the site unpacked, which the job could not
    write): never from the job's output. None for custom code, whose release is the base
    layout."""
    spec = order.spec
    if spec.is_custom:
        return None

    def dataset_files() -> Iterator[tuple[str, bytes]]:
        return _audited_files(
            order, report, vault, versions, purpose="classifier labels", keep=labelled_file
        )

    try:
        expected = expected_release(
            spec.trainer,
            dict(spec.hyperparameters),
            model_dir=model_dir,
            dataset_files=dataset_files,
            code_dir=code_dir,
        )
    except TrainerError as e:
        # The job ran to completion under these very hyperparameters and data: the site
        # and the trainer disagree, which is the system's fault, not the job's.
        raise SiteError(
            f"the release of trainer {spec.trainer!r} cannot be computed: {type(e).__name__}"
        ) from e
    return ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config)


def _audited_files(
    order: RunOrder,
    report: Report,
    vault: Vault,
    versions: list[VaultVersion],
    *,
    purpose: str,
    keep: Callable[[str], bool] = lambda _: True,
) -> Iterator[tuple[str, bytes]]:
    """The plaintext files (path, bytes) of each version that ``keep`` accepts, each version's
    read audited (``data.gate-read`` with its purpose and file count) before its files go."""
    for v in versions:
        files = [(e.path, d) for e, d in vault.iter_plaintext(v) if keep(e.path)]
        report(
            SiteReport(
                order.job_id,
                audit_action="data.gate-read",
                audit_dataset=v.name,
                details={"purpose": purpose, "files": len(files)},
            )
        )
        yield from files


def jsonable(figures: Any) -> Any:
    return json.loads(json.dumps(dict(figures or {}), default=str))
