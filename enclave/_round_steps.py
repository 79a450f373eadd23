"""The end of a federated round that exited cleanly, at the site: the update goes through the
site's release gate before anything of it may leave, then waits at the site for the masking.

The job's trained weights minus the round's start is written as a weights file next to the
job's metrics (:func:`enclave.federated.write_update`), and :func:`enclave.gate.run_gate` checks
it under each held dataset's release rules, as it would a release: structure against the form
the approved spec gives, re-quantisation to the release dtype and scrubbing, the metrics rules,
and the DP check against the ε this site has spent on the job so far (composed over its rounds).
The memorization probe waits for the final model (:mod:`enclave.federated`). The update read
back from the gated file, with the gated training loss, is the round's :class:`RoundUpdate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from enclave import _beneath, _channels
from enclave._release_steps import gate_each, refused, release_form, release_layout
from enclave.contract import Report, RoundOrder, RoundUpdate, SiteReport
from enclave.federated import read_vector, round_vector, update_layout, write_update
from enclave.gate import RELEASED_METRICS
from enclave.vault import DatasetVersion, Vault
from policies.channels import TeamReason
from policies.errors import IntegrityError, SiteError
from policies.lifecycle import JobState
from policies.release import CheckName, OutputLimits, ReleaseRules
from trainers.contract import METRICS_FILE, OUTPUT_DIR, WEIGHTS_DIR
from trainers.rounds import round_layout

_WEIGHTS = WEIGHTS_DIR.relative_to(OUTPUT_DIR) / "model.safetensors"
_METRICS = METRICS_FILE.relative_to(OUTPUT_DIR)


def check_round(
    rnd: RoundOrder,
    report: Report,
    *,
    run_id: str,
    vault: Vault,
    run_dir: Path,
    output: Path,
    rules: list[tuple[str, ReleaseRules]],
    model_dir: Path,
    layout: Any,
    versions: list[DatasetVersion],
    epsilon: float,
    weight: int,
) -> RoundUpdate | SiteReport:
    """Gate the round's update; the update, or the REJECTED report that left it out."""
    order = rnd.order
    gate_in = run_dir / "update"
    try:
        taken = take_output(output, run_dir / "taken", [r.limits for _, r in rules])
        write_update(taken / _WEIGHTS, rnd.start, gate_in / _WEIGHTS)
    except IntegrityError as e:
        return refused_structure(run_id, str(e))
    if (taken / _METRICS).is_file():  # the site's own copy: moved, not copied again
        (taken / _METRICS).rename(gate_in / _METRICS)
    form = release_form(order, report, vault, model_dir, versions, code_dir=None)
    if form is None:
        raise SiteError("a federated round runs a built-in trainer: it has a release form")
    # The update's form: the release's names and shapes, in F32 (trainers.rounds).
    form = dataclasses.replace(form, layout=round_layout(release_layout(form)))
    gates = gate_each(
        run_id,
        report,
        gate_in,
        # The memorization probe waits for the final model (RoundRuns.countersign).
        [(d, dataclasses.replace(r, checks=r.checks - {CheckName.MEMORIZATION})) for d, r in rules],
        layout=layout,
        form=form,
        run_dir=run_dir,
        spent=order.epsilon_spent,
        epsilon=lambda delta: epsilon,
    )
    refusal = refused(run_id, gates)
    if refusal is not None:
        return refusal
    first = gates[sorted(gates)[0]]
    assert first.release_dir is not None  # passed
    vector = read_vector(first.release_dir / form.weights_path, update_layout(rnd.start))
    metrics = json.loads((first.release_dir / RELEASED_METRICS).read_text())
    loss = float(metrics.get("train_loss", math.nan))
    clip = order.spec.federation.update_clip if order.spec.federation else 1.0
    return RoundUpdate(vector=round_vector(vector, loss, clip=clip), weight=weight)


def take_output(output: Path, dest: Path, limits: list[OutputLimits]) -> Path:
    """Copy the job's trained weights and its metrics (if it wrote any) out of ``output`` into
    ``dest``, the site's own, opening nothing the job could have pointed elsewhere (no link
    followed, nothing outside ``output`` or on another filesystem, no FIFO or device, no hard
    link; :mod:`enclave._beneath`), each within the tightest of ``limits``. Returns ``dest``.
    Raises :class:`IntegrityError` with the reason, whose text never names what the job wrote."""
    dest.mkdir(mode=0o700)
    (dest / _WEIGHTS).parent.mkdir(mode=0o700)
    try:
        max_weights = min(x.max_file_bytes for x in limits)
        _beneath.copy_beneath(output, str(_WEIGHTS), dest / _WEIGHTS, max_bytes=max_weights)
    except _beneath.BeneathRefused as e:
        raise IntegrityError(
            f"federated round: the trained weights were not read: {e.reason}"
        ) from e
    try:
        max_metrics = min(x.max_metrics_bytes for x in limits)
        _beneath.copy_beneath(output, str(_METRICS), dest / _METRICS, max_bytes=max_metrics)
    except _beneath.BeneathRefused as e:
        if e.reason != _beneath.MISSING:
            raise IntegrityError(f"federated round: the metrics were not read: {e.reason}") from e
    return dest


def refused_structure(run_id: str, detail: str) -> SiteReport:
    return _channels.terminal(
        run_id, JobState.REJECTED, TeamReason.REJECTED_WEIGHTS, f"round refused: {detail}"
    )
