"""The release gate: from a finished job's ``/output`` to canonical artifacts, or a refusal.

:func:`run_gate` runs in the site, next to the data, as trusted code. It lists the output
without following links, checks and re-writes the weights (canonical safetensors in the release
dtype), checks and rounds the metrics, probes the released model for memorization of the
protected data and checks the privacy budget where the rules ask for them. It writes the
artifacts into a fresh destination directory and returns a :class:`GateResult`; when any check
refuses, the destination is removed and nothing is released.

What a release is comes from the site, never from the job: a :class:`ReleaseForm` (in
``_release``, with the result values) says which tensors the weights must hold and under which
name they are released. This module is the order of the checks and what runs after what; each
check's own steps, which write the release's files, are in ``_checks``. A private graph's
trainable parameters load in no library: the memorization probe cannot run on them, and passes
only where the policy's DP budget bounds the job instead.

Refusals are the job's fault and come back as a result (the gateway records them and moves the
job to REJECTED). Configuration faults (rules without checks, a memorization check with no
data to probe) raise, so that a broken site never passes a job by default.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from enclave.gate import _memorization, _walk
from enclave.gate._checks import (
    _check_metrics,
    _check_weights,
    _dp_bounds_memorization,
    _hash_artifact,
    _not_run_after_weights,
    _peek_names,
    _probe_loader,
    layout_from_files,
    layout_from_model_dir,
)
from enclave.gate._release import (
    MAX_CONFIG_BYTES,
    RELEASED_ADAPTER,
    RELEASED_METRICS,
    RELEASED_WEIGHTS,
    DPInputs,
    GateResult,
    MemorizationInputs,
    ReleasedArtifact,
    ReleaseForm,
    ReleaseKind,
)
from policies.errors import AlreadyExists, InvalidInput, PolicyDocumentError
from policies.release import (
    MANDATORY_CHECKS,
    ArtifactKind,
    CheckName,
    CheckResult,
    Layout,
    ReleaseRules,
    TensorSpec,
    decide_dp,
    decide_memorization,
    make_layout,
)

__all__ = [
    "MAX_CONFIG_BYTES",
    "RELEASED_ADAPTER",
    "RELEASED_METRICS",
    "RELEASED_WEIGHTS",
    "DPInputs",
    "GateResult",
    "MemorizationInputs",
    "ReleaseForm",
    "ReleaseKind",
    "ReleasedArtifact",
    "layout_from_files",
    "layout_from_model_dir",
    "run_gate",
]


def run_gate(
    output_dir: Path,
    *,
    rules: ReleaseRules,
    base_layout: Mapping[str, TensorSpec | tuple[str, Iterable[int]]],
    dest_dir: Path,
    adapter_layout: Mapping[str, TensorSpec | tuple[str, Iterable[int]]] | None = None,
    form: ReleaseForm | None = None,
    memorization: MemorizationInputs | None = None,
    dp: DPInputs | None = None,
) -> GateResult:
    """Decide what of ``output_dir`` may be released, writing it into ``dest_dir``.

    ``dest_dir`` must not exist; it is created and, when any check refuses, removed again.
    With a ``form`` (a built-in trainer's release), the weights must match ``form.layout``
    and are released under its name with its config; under ``adapter_only`` rules only a LoRA
    adapter form passes. Without one, weights must match ``adapter_layout`` when the rules say
    ``adapter_only``; otherwise ``base_layout`` (or ``adapter_layout`` where one is declared).

    Raises :class:`PolicyDocumentError` for rules that would pass anything,
    :class:`InvalidInput` when a check the rules require lacks its inputs (or both a form and
    an adapter layout are given), and :class:`AlreadyExists` when ``dest_dir`` exists.
    Refusals are returned, not raised.
    """
    if not rules.checks or not rules.checks >= MANDATORY_CHECKS:
        raise PolicyDocumentError("release rules: the gate needs at least the structural checks")
    base = make_layout(base_layout)
    adapter = make_layout(adapter_layout) if adapter_layout is not None else None
    if form is not None and adapter is not None:
        raise InvalidInput("declare a release form or an adapter layout, not both")
    declared = make_layout(form.layout) if form is not None else None
    if rules.adapter_only and adapter is None and form is None:
        raise InvalidInput("the rules release adapters only, and no adapter layout was declared")
    if CheckName.MEMORIZATION in rules.checks and memorization is None:
        raise InvalidInput("the rules require the memorization check and no data was supplied")
    if CheckName.DP in rules.checks and dp is None:
        raise InvalidInput("the rules require the dp check and no privacy record was supplied")
    try:
        dest_dir.mkdir(mode=0o700)
    except FileExistsError as e:
        raise AlreadyExists(f"release directory {dest_dir} already exists") from e

    checks: list[CheckResult] = []
    try:
        checks = _run_checks(
            output_dir,
            rules=rules,
            base=base,
            adapter=adapter,
            form=form,
            declared=declared,
            dest=dest_dir,
            memorization=memorization,
            dp=dp,
        )
    finally:
        passed = bool(checks) and all(c.passed for c in checks)
        if not passed:
            shutil.rmtree(dest_dir, ignore_errors=True)
    artifacts: tuple[ReleasedArtifact, ...] = ()
    if passed:
        paths = [RELEASED_WEIGHTS, RELEASED_METRICS]
        if form is not None:
            paths = [form.weights_path, RELEASED_METRICS]
            if form.config_path is not None:
                paths.append(form.config_path)
        artifacts = tuple(_hash_artifact(dest_dir, p) for p in sorted(paths))
    return GateResult(
        passed=passed,
        checks=tuple(checks),
        artifacts=artifacts,
        release_dir=dest_dir if passed else None,
        rules_version=rules.version,
    )


def _run_checks(
    output_dir: Path,
    *,
    rules: ReleaseRules,
    base: Layout,
    adapter: Layout | None,
    form: ReleaseForm | None,
    declared: Layout | None,
    dest: Path,
    memorization: MemorizationInputs | None,
    dp: DPInputs | None,
) -> list[CheckResult]:
    checks: list[CheckResult] = []
    listing, reasons = _walk.list_output(output_dir, limits=rules.limits)
    if (
        listing is not None
        and listing.metrics is not None
        and (ArtifactKind.METRICS not in rules.allowed_artifacts)
    ):
        reasons = ["metrics.json is present and the policy releases no metrics"]
        listing = None
    # No figures here: file counts and sizes are the job's choice, and a figure leaves the site.
    checks.append(CheckResult.decide(CheckName.ARTIFACTS, reasons))
    if listing is None:
        checks.extend(
            CheckResult.not_run(n, CheckName.ARTIFACTS)
            for n in CheckName
            if n in rules.checks and n is not CheckName.ARTIFACTS
        )
        return checks

    if form is not None:
        assert declared is not None
        what = {
            ReleaseKind.FULL: "base model",
            ReleaseKind.LORA_ADAPTER: "declared adapter",
            ReleaseKind.CLASSIFIER: "declared classifier",
            ReleaseKind.GRAPH_PARAMETERS: "graph's trainable parameters",
        }[form.kind]
        if rules.adapter_only and form.kind is not ReleaseKind.LORA_ADAPTER:
            checks.append(
                CheckResult.decide(
                    CheckName.WEIGHTS,
                    [f"the policy releases adapters only; this job's trainer releases a {what}"],
                )
            )
            checks.extend(_not_run_after_weights(rules))
            return checks
        weights = _check_weights(
            output_dir,
            listing,
            rules=rules,
            expected=declared,
            what=what,
            dest=dest,
            released=form.weights_path,
        )
        if weights.passed and form.config_path is not None:
            assert form.config is not None
            # The site's own file, never the job's: written only once the weights passed.
            with open(dest / form.config_path, "xb") as f:
                f.write(form.config)
    else:
        if rules.adapter_only:
            assert adapter is not None
            expected, what = adapter, "declared adapter"
        else:
            expected, what = base, "base model"
            if adapter is not None:
                # Either layout may be released; match the one the tensor names point at.
                listing_names = _peek_names(output_dir, listing, rules)
                if listing_names is not None and listing_names <= set(adapter):
                    expected, what = adapter, "declared adapter"
        weights = _check_weights(
            output_dir, listing, rules=rules, expected=expected, what=what, dest=dest
        )
        if what == "declared adapter":
            # An adapter declared by layout alone: nothing tells the probe how to load it.
            if CheckName.MEMORIZATION in rules.checks and weights.passed:
                raise InvalidInput(
                    "the memorization probe of an adapter needs its release form (adapter config)"
                )
        else:
            form = ReleaseForm(ReleaseKind.FULL, base)
    return _after_weights(
        output_dir,
        listing,
        checks,
        weights,
        rules=rules,
        dest=dest,
        form=form,
        memorization=memorization,
        dp=dp,
    )


def _after_weights(
    output_dir: Path,
    listing: _walk.Listing,
    checks: list[CheckResult],
    weights: CheckResult,
    *,
    rules: ReleaseRules,
    dest: Path,
    form: ReleaseForm | None,
    memorization: MemorizationInputs | None,
    dp: DPInputs | None,
) -> list[CheckResult]:
    checks.append(weights)
    site_epsilon = dp.epsilon if dp is not None else None
    metrics = _check_metrics(output_dir, listing, rules=rules, dest=dest, epsilon=site_epsilon)
    checks.append(metrics.result)

    if CheckName.MEMORIZATION in rules.checks:
        assert memorization is not None and rules.memorization is not None
        if not weights.passed:
            checks.append(CheckResult.not_run(CheckName.MEMORIZATION, CheckName.WEIGHTS))
        elif form is not None and form.kind is ReleaseKind.GRAPH_PARAMETERS:
            checks.append(_dp_bounds_memorization(rules, dp))
        else:
            assert form is not None
            try:
                figures_m = _memorization.measure_memorization(
                    model_dir=memorization.model_dir,
                    weights=dest / form.weights_path,
                    tokenizer=memorization.tokenizer,
                    texts=memorization.texts,
                    rules=rules.memorization,
                    loader=_probe_loader(form, memorization, dest),
                )
            except _memorization.NotProbeable as e:
                # Fail closed: a release the probe cannot test does not leave.
                checks.append(
                    CheckResult.decide(CheckName.MEMORIZATION, [f"cannot be probed: {e}"])
                )
            else:
                checks.append(decide_memorization(figures_m, rules=rules.memorization))

    if CheckName.DP in rules.checks:
        assert dp is not None and rules.dp is not None
        # The site's ε only: no DP the site set is +inf, whatever the job's metrics say.
        epsilon = dp.epsilon if dp.epsilon is not None else math.inf
        checks.append(decide_dp(epsilon, spent=dp.spent, rules=rules.dp))
    return checks
