"""The release gate: from a finished job's ``/output`` to canonical artifacts, or a refusal.

:func:`run_gate` runs in the site, next to the data, as trusted code. It lists the output
without following links, checks and re-writes the weights (canonical safetensors in the release
dtype), checks and rounds the metrics, probes the released model for memorization of the
protected data and checks the privacy budget where the rules ask for them. It writes the
artifacts into a fresh destination directory and returns a :class:`GateResult`; when any check
refuses, the destination is removed and nothing is released.

What a release is comes from the site, never from the job: a :class:`ReleaseForm` (computed
from the approved hyperparameters by the trainers' trusted functions) says which tensors the
weights must hold, under which name they are released, and carries the config file the site
writes beside them (``weights/adapter_config.json`` for a LoRA adapter, ``weights/config.json``
for a classifier), so that ``weights/`` loads as it is in ``peft`` or ``transformers``. A
private graph's trainable parameters load in neither: the memorization probe cannot run on
them, and passes only where the policy's DP budget bounds the job instead.

Refusals are the job's fault and come back as a result (the gateway records them and moves the
job to REJECTED). Configuration faults (rules without checks, a memorization check with no
data to probe) raise, so that a broken site never passes a job by default.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclave import _beneath
from enclave.gate import _memorization, _safetensors, _walk
from policies.errors import AlreadyExists, InvalidInput, PolicyDocumentError, ReleaseRefused
from policies.release import (
    MANDATORY_CHECKS,
    ArtifactKind,
    CheckName,
    CheckResult,
    Layout,
    MetricsDecision,
    OutputLimits,
    ReleaseRules,
    TensorSpec,
    check_metrics,
    compare_layout,
    decide_dp,
    decide_memorization,
    make_layout,
)

RELEASED_WEIGHTS = "weights/model.safetensors"
RELEASED_ADAPTER = "weights/adapter_model.safetensors"
RELEASED_METRICS = "metrics.json"
MAX_CONFIG_BYTES = 1024 * 1024


class ReleaseKind(enum.StrEnum):
    """What a release's weights are, which decides their released name, the config file the
    site adds and how the memorization probe loads them."""

    FULL = "full"
    """All of the base model's tensors: ``weights/model.safetensors``."""
    LORA_ADAPTER = "lora-adapter"
    """A PEFT LoRA adapter: ``weights/adapter_model.safetensors`` + ``adapter_config.json``."""
    CLASSIFIER = "classifier"
    """A sequence classifier on the base's backbone: ``weights/model.safetensors`` +
    ``config.json``."""
    GRAPH_PARAMETERS = "graph-parameters"
    """The trainable parameters of a team's graph trained by the site's DP-SGD trainer
    (``custom_code: private``): ``weights/model.safetensors``, no config. No library loads
    them as a model, so the memorization probe cannot run; the policy's DP budget bounds
    them instead (:func:`_dp_bounds_memorization`)."""


_WEIGHTS_PATHS = {
    ReleaseKind.FULL: RELEASED_WEIGHTS,
    ReleaseKind.LORA_ADAPTER: RELEASED_ADAPTER,
    ReleaseKind.CLASSIFIER: RELEASED_WEIGHTS,
    ReleaseKind.GRAPH_PARAMETERS: RELEASED_WEIGHTS,
}
_CONFIG_PATHS = {
    ReleaseKind.LORA_ADAPTER: "weights/adapter_config.json",
    ReleaseKind.CLASSIFIER: "weights/config.json",
}


@dataclass(frozen=True)
class ReleaseForm:
    """The site's declaration of a release: the layout the weights must have and, for the
    kinds that need one, the config file (JSON, written by the site) released beside them.

    Raises :class:`InvalidInput` for a config on a full release, a missing config, or one that
    is not a JSON object."""

    kind: ReleaseKind
    layout: Mapping[str, TensorSpec | tuple[str, Iterable[int]]]
    config: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _CONFIG_PATHS:
            if self.config is not None:
                raise InvalidInput(f"a {self.kind} release carries no config of the site's")
            return
        if self.config is None:
            raise InvalidInput(f"a {self.kind} release needs the site's config file")
        if len(self.config) > MAX_CONFIG_BYTES:
            raise InvalidInput(f"the {self.kind} config exceeds {MAX_CONFIG_BYTES} bytes")
        try:
            parsed = json.loads(self.config)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInput(f"the {self.kind} config is not JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidInput(f"the {self.kind} config is not a JSON object")

    @property
    def weights_path(self) -> str:
        return _WEIGHTS_PATHS[self.kind]

    @property
    def config_path(self) -> str | None:
        return _CONFIG_PATHS.get(self.kind)


@dataclass(frozen=True)
class ReleasedArtifact:
    """One file the gate wrote for release, relative to the release directory."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class GateResult:
    """The gate's decision. ``artifacts`` is empty and ``release_dir`` None unless ``passed``."""

    passed: bool
    checks: tuple[CheckResult, ...]
    artifacts: tuple[ReleasedArtifact, ...]
    release_dir: Path | None
    rules_version: str

    def require_passed(self) -> None:
        """Raise :class:`ReleaseRefused` naming each refused check and its reasons."""
        if self.passed:
            return
        failed = [c for c in self.checks if not c.passed]
        text = "; ".join(f"{c.name}: {', '.join(c.reasons)}" for c in failed)
        raise ReleaseRefused(f"release refused by the gate: {text or 'no checks ran'}")


@dataclass(frozen=True)
class MemorizationInputs:
    """What the site supplies for the memorization probe: the trusted base model directory,
    the tokenizer and the protected texts (staged data, read once)."""

    model_dir: Path
    tokenizer: _memorization.Tokenizer
    texts: Iterable[str]


@dataclass(frozen=True)
class DPInputs:
    """The privacy-accounting hook. ``spent`` is what earlier releases on the same data used.
    ``epsilon`` is the site's accountant's ε for this job (:mod:`enclave._dp`); None means the
    site set no DP for it, which is charged as +inf. The job's own ``epsilon`` metric never
    counts, and is released only as the site's value."""

    spent: float
    epsilon: float | None = None


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


def _hash_artifact(root: Path, relpath: str) -> ReleasedArtifact:
    digest = hashlib.sha256()
    size = 0
    with open(root / relpath, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return ReleasedArtifact(path=relpath, sha256=digest.hexdigest(), size=size)


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
