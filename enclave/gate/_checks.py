"""The gate's per-check steps: the weights and metrics checks, which write the release's files,
and the memorization check's pieces.

The weights check opens each listed weights file beneath the output without following links,
reads its safetensors header against the expected layout and re-writes the tensors as one
canonical file in the release dtype; the metrics check reads ``metrics.json`` as strict JSON,
puts the site's ε in place of the job's and writes the rounded values. Each returns a
:class:`CheckResult` (a refusal is a result, not an exception). The memorization check's pieces
say how the probe loads the release (:func:`_probe_loader`) and when a graph's parameters, which
no probe can load, are bounded by DP instead (:func:`_dp_bounds_memorization`). Also here: the
layout of trusted safetensors files (the site's base model) and the hash of a written artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from enclave import _beneath
from enclave.gate import _memorization, _safetensors, _walk
from enclave.gate._release import (
    RELEASED_METRICS,
    RELEASED_WEIGHTS,
    DPInputs,
    MemorizationInputs,
    ReleasedArtifact,
    ReleaseForm,
    ReleaseKind,
)
from policies.errors import InvalidInput
from policies.release import (
    CheckName,
    CheckResult,
    Layout,
    MetricsDecision,
    OutputLimits,
    ReleaseRules,
    TensorSpec,
    check_metrics,
    compare_layout,
    make_layout,
)


def layout_from_files(paths: Iterable[Path]) -> Layout:
    """The tensor layout of trusted safetensors files (e.g. the site's copy of a base model)."""
    limits = OutputLimits()
    out: dict[str, TensorSpec] = {}
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            header = _safetensors.read_header(fd, known=frozenset(), limits=limits)
        except _safetensors.WeightsRefused as e:
            raise InvalidInput(f"{path}: {e}") from e
        finally:
            os.close(fd)
        for name, entry in header.tensors.items():
            if name in out:
                raise InvalidInput(f"{path}: tensor {name!r} appears in two files")
            out[name] = entry.spec
    return make_layout(out)


def layout_from_model_dir(model_dir: Path) -> Layout:
    """The layout of every ``*.safetensors`` file in a trusted model directory."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"{model_dir} holds no safetensors weights")
    return layout_from_files(files)


def _read_small(root: Path, ref: _walk.FileRef) -> bytes:
    fd = _walk.open_verified(root, ref)
    try:
        return _beneath.read_fd(fd, max_bytes=ref.size)
    finally:
        os.close(fd)


def _check_weights(
    root: Path,
    listing: _walk.Listing,
    *,
    rules: ReleaseRules,
    expected: Layout,
    what: str,
    dest: Path,
    released: str = RELEASED_WEIGHTS,
) -> CheckResult:
    known = frozenset(expected)
    fds: list[int] = []
    sources: dict[str, _safetensors.SourceTensor] = {}
    reasons: list[str] = []
    try:
        for ref in listing.weights:
            try:
                fd = _walk.open_verified(root, ref)
            except _beneath.BeneathRefused:
                reasons.append("a weights file could not be opened safely (name withheld)")
                continue
            fds.append(fd)
            try:
                header = _safetensors.read_header(fd, known=known, limits=rules.limits)
            except _safetensors.WeightsRefused as e:
                reasons.append(f"a weights file: {e}")
                continue
            for name, entry in header.tensors.items():
                if name in sources:
                    label = f"tensor {name!r}" if name in known else "a tensor (name withheld)"
                    reasons.append(f"{label} appears in more than one weights file")
                sources[name] = _safetensors.SourceTensor(fd=fd, header=header, entry=entry)
        if reasons:
            return CheckResult.decide(CheckName.WEIGHTS, reasons)
        actual = {n: s.entry.spec for n, s in sources.items()}
        reasons = compare_layout(actual, expected, what=what)
        if reasons:
            return CheckResult.decide(CheckName.WEIGHTS, reasons, {"tensors": len(actual)})
        (dest / released).parent.mkdir()
        try:
            with open(dest / released, "xb") as out:
                written = _safetensors.write_canonical(
                    out,
                    sources,
                    release_dtype=rules.release_dtype,
                    known=known,
                    scrub_bits=rules.scrub_bits,
                )
        except _safetensors.WeightsRefused as e:
            return CheckResult.decide(CheckName.WEIGHTS, [str(e)], {"tensors": len(actual)})
        return CheckResult.decide(
            CheckName.WEIGHTS,
            [],
            {
                "tensors": len(actual),
                "layout": what,
                "release_dtype": rules.release_dtype,
                "released_bytes": written.size,
            },
        )
    finally:
        for fd in fds:
            os.close(fd)


def _site_epsilon(raw: Any, *, rules: ReleaseRules, epsilon: float | None) -> Any:
    """The job's metrics with its ``epsilon`` replaced by the site's (dropped where the site
    has none, or the policy releases none): a job's own privacy figure never leaves."""
    if not isinstance(raw, dict) or "epsilon" not in raw:
        return raw
    out = {k: v for k, v in raw.items() if k != "epsilon"}
    if epsilon is not None and math.isfinite(epsilon) and "epsilon" in rules.allowed_metrics:
        out["epsilon"] = epsilon
    return out


def _check_metrics(
    root: Path,
    listing: _walk.Listing,
    *,
    rules: ReleaseRules,
    dest: Path,
    epsilon: float | None = None,
) -> MetricsDecision:
    if listing.metrics is None:
        decision = check_metrics({}, rules=rules)
    else:
        try:
            data = _read_small(root, listing.metrics)
            raw = _safetensors.strict_json(data, constants_as_floats=True)
        except _beneath.BeneathRefused:
            return MetricsDecision(
                {}, CheckResult.decide(CheckName.METRICS, ["metrics.json could not be read safely"])
            )
        except ValueError:
            return MetricsDecision(
                {},
                CheckResult.decide(
                    CheckName.METRICS,
                    ["metrics.json is not strict JSON (or repeats a name, or nests too deeply)"],
                ),
            )
        decision = check_metrics(_site_epsilon(raw, rules=rules, epsilon=epsilon), rules=rules)
    if decision.result.passed:
        text = json.dumps(
            dict(decision.values), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        with open(dest / RELEASED_METRICS, "x", encoding="ascii") as f:
            f.write(text)
    return decision


def _hash_artifact(root: Path, relpath: str) -> ReleasedArtifact:
    digest = hashlib.sha256()
    size = 0
    with open(root / relpath, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return ReleasedArtifact(path=relpath, sha256=digest.hexdigest(), size=size)


def _not_run_after_weights(rules: ReleaseRules) -> list[CheckResult]:
    return [
        CheckResult.not_run(n, CheckName.WEIGHTS)
        for n in CheckName
        if n in rules.checks and n not in (CheckName.ARTIFACTS, CheckName.WEIGHTS)
    ]


def _probe_loader(form: ReleaseForm, inputs: MemorizationInputs, dest: Path) -> Callable[[], Any]:
    """How the probe loads the released model: as released, over the trusted base model."""
    if form.kind is ReleaseKind.LORA_ADAPTER:
        # What a model team does: PeftModel.from_pretrained(base, release/weights), merged.
        return lambda: _memorization.load_adapter_release(
            inputs.model_dir, dest / form.weights_path
        )
    if form.kind is ReleaseKind.CLASSIFIER:
        return lambda: _memorization.load_backbone_release(
            inputs.model_dir, dest / form.weights_path
        )
    return lambda: _memorization.load_released_model(inputs.model_dir, dest / form.weights_path)


def _dp_bounds_memorization(rules: ReleaseRules, dp: DPInputs | None) -> CheckResult:
    """The memorization check of a graph's parameters: no probe can load them, and none is
    needed where the policy's DP budget binds the job. Passed (the probe skipped, the reason
    recorded in the figures) when the policy sets DP and the site's ε is finite and within its
    per-job cap, which the dp check then charges; refused otherwise (fail closed: a release
    nothing bounds does not leave)."""
    epsilon = dp.epsilon if dp is not None else None
    if rules.dp is None or CheckName.DP not in rules.checks:
        reason = "the policy sets no DP budget, and only DP bounds a graph's parameters"
    elif epsilon is None or not math.isfinite(epsilon) or epsilon < 0:
        reason = "the job ran without DP-SGD set by the site"
    elif epsilon > rules.dp.max_epsilon_per_job:
        reason = f"epsilon {epsilon:.4g} exceeds the per-job cap {rules.dp.max_epsilon_per_job:.4g}"
    else:
        return CheckResult.decide(
            CheckName.MEMORIZATION, [], {"skipped": f"bounded by DP, epsilon={epsilon:.4g}"}
        )
    return CheckResult.decide(CheckName.MEMORIZATION, [f"cannot be probed: {reason}"])


def _peek_names(root: Path, listing: _walk.Listing, rules: ReleaseRules) -> set[str] | None:
    names: set[str] = set()
    for ref in listing.weights:
        try:
            fd = _walk.open_verified(root, ref)
        except _beneath.BeneathRefused:
            return None
        try:
            header = _safetensors.read_header(fd, known=frozenset(), limits=rules.limits)
            names |= set(header.tensors)
        except _safetensors.WeightsRefused:
            return None
        finally:
            os.close(fd)
    return names
