"""The release gate on well-behaved outputs: what it releases, in which form, and the rules'
fail-closed construction. Hostile outputs are in ``test_hostile_release_*.py``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from enclave.gate import (
    RELEASED_METRICS,
    RELEASED_WEIGHTS,
    DPInputs,
    GateResult,
    layout_from_files,
    layout_from_model_dir,
    load_released_model,
    run_gate,
)
from policies.errors import (
    AlreadyExists,
    InvalidInput,
    PolicyDocumentError,
    ReleaseRefused,
)
from policies.release import (
    CheckName,
    CheckOutcome,
    DPRules,
    MemorizationRules,
    ReleaseRules,
    TensorSpec,
    check_metrics,
    compare_layout,
    decide_dp,
    make_layout,
    normalized_edit_distance,
)
from tests.unit._release_support import (
    job_output,
    read_raw,
    rules,
    save_weights,
    tiny_llama,
    write_tensors,
)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    write_tensors(
        path,
        {
            "embed.weight": torch.randn(16, 8),
            "layer.0.weight": torch.randn(8, 8),
            "norm.weight": torch.ones(8),
        },
        metadata={"format": "pt"},
    )
    return path


def test_a_tiny_hf_model_is_released_in_canonical_bf16(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "base")
    with torch.no_grad():  # "fine-tuning": the job changes the weights, not their structure
        for p in model.parameters():
            p.add_(0.01)
    save_weights(model, tmp_path / "job.safetensors")
    out = job_output(tmp_path, tmp_path / "job.safetensors", {"loss": 2.345678901, "accuracy": 0.5})

    result = run_gate(
        out,
        rules=rules(),
        base_layout=layout_from_model_dir(tmp_path / "base"),
        dest_dir=tmp_path / "release",
    )

    result.require_passed()
    assert [c.name for c in result.checks] == [
        CheckName.ARTIFACTS,
        CheckName.WEIGHTS,
        CheckName.METRICS,
    ]
    assert result.release_dir == tmp_path / "release"
    assert {a.path for a in result.artifacts} == {RELEASED_WEIGHTS, RELEASED_METRICS}
    header, _ = read_raw(tmp_path / "release" / RELEASED_WEIGHTS)
    assert "__metadata__" not in header
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert json.loads((tmp_path / "release" / RELEASED_METRICS).read_text()) == {
        "accuracy": 0.5,
        "loss": 2.346,
    }
    # The released model loads with transformers and holds the job's weights, rounded to bf16
    # and scrubbed of the policy's low mantissa bits, exactly.
    from enclave.gate._safetensors import scrub

    released = load_released_model(tmp_path / "base", tmp_path / "release" / RELEASED_WEIGHTS)
    for name, p in model.state_dict().items():
        got = released.state_dict()[name]
        want = scrub(p.to(torch.bfloat16), rules().scrub_bits).float()
        assert torch.allclose(got, want, atol=0, rtol=0), name
    weights = result.checks[1].figures
    assert weights["tensors"] == len(header) and weights["release_dtype"] == "BF16"


def test_release_is_canonical_whatever_the_job_wrote(tmp_path: Path, base: Path) -> None:
    # Same tensors, different file order, metadata and sharding: byte-identical releases.
    tensors = load_file(base)
    a = tmp_path / "a"
    write_tensors(a / "weights" / "model.safetensors", tensors, metadata={"note": "hello"})
    b = tmp_path / "b"
    names = sorted(tensors)
    write_tensors(b / "weights" / "part-1.safetensors", {n: tensors[n] for n in names[:1]})
    write_tensors(b / "weights" / "part-2.safetensors", {n: tensors[n] for n in names[1:]})
    layout = layout_from_files([base])
    ra = run_gate(a, rules=rules(), base_layout=layout, dest_dir=tmp_path / "ra")
    rb = run_gate(b, rules=rules(), base_layout=layout, dest_dir=tmp_path / "rb")
    ra.require_passed()
    rb.require_passed()
    assert ra.artifacts == rb.artifacts
    # ... and identical records: shard counts and file sizes are the job's choice, and what is
    # recorded leaves the site in the signed manifest.
    assert ra.checks == rb.checks
    assert (tmp_path / "ra" / RELEASED_WEIGHTS).read_bytes() == (
        tmp_path / "rb" / RELEASED_WEIGHTS
    ).read_bytes()
    assert json.loads((tmp_path / "ra" / RELEASED_METRICS).read_text()) == {}


def test_fp16_release_and_ignored_progress_and_checkpoints(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base, {"loss": 1.0})
    (out / "metrics.jsonl").write_text('{"step": 1, "total": 2, "loss": 3.0}\n')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"\x80\x04pickle")
    result = run_gate(
        out,
        rules=rules(release_dtype="F16"),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "rel",
    )
    result.require_passed()
    header, _ = read_raw(tmp_path / "rel" / RELEASED_WEIGHTS)
    assert {v["dtype"] for v in header.values()} == {"F16"}
    assert sorted(p.name for p in (tmp_path / "rel").rglob("*")) == [
        "metrics.json",
        "model.safetensors",
        "weights",
    ]


def test_declared_adapter_layout_is_accepted(tmp_path: Path, base: Path) -> None:
    adapter = tmp_path / "adapter.safetensors"
    write_tensors(
        adapter, {"layer.0.lora_A": torch.randn(2, 8), "layer.0.lora_B": torch.zeros(8, 2)}
    )
    out = job_output(tmp_path, adapter)
    layouts = layout_from_files([base]), layout_from_files([adapter])

    def gate(output: Path, release_rules: ReleaseRules, dest: str) -> GateResult:
        return run_gate(
            output,
            rules=release_rules,
            base_layout=layouts[0],
            adapter_layout=layouts[1],
            dest_dir=tmp_path / dest,
        )

    gate(out, rules(adapter_only=True), "r1").require_passed()
    gate(out, rules(), "r2").require_passed()
    # adapter_only refuses the full model even though it matches the base.
    refused = gate(job_output(tmp_path / "full", base), rules(adapter_only=True), "r3")
    assert not refused.passed
    assert "declared adapter" in " ".join(refused.checks[1].reasons)


def test_refused_release_leaves_nothing_behind(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base, {"loss": float("nan")})
    result = run_gate(
        out, rules=rules(), base_layout=layout_from_files([base]), dest_dir=tmp_path / "rel"
    )
    assert not result.passed
    assert result.artifacts == () and result.release_dir is None
    assert not (tmp_path / "rel").exists()
    with pytest.raises(ReleaseRefused, match="metrics: metric 'loss' is not finite"):
        result.require_passed()


# --- fail-closed configuration -----------------------------------------------------------------


def test_rules_without_checks_or_without_structural_checks_are_errors() -> None:
    with pytest.raises(PolicyDocumentError, match="empty list of checks"):
        ReleaseRules(version="v", checks=frozenset())
    with pytest.raises(PolicyDocumentError, match="cannot be turned off"):
        ReleaseRules(version="v", checks=frozenset({CheckName.ARTIFACTS, CheckName.METRICS}))
    with pytest.raises(PolicyDocumentError, match="release_dtype"):
        rules(release_dtype="F32")  # fp32 would keep low-order payload bits
    with pytest.raises(PolicyDocumentError, match="memorization check needs"):
        rules(checks=frozenset(CheckName))
    with pytest.raises(PolicyDocumentError, match="version"):
        rules(version="")


def test_gate_inputs_missing_for_required_checks_are_errors(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    layout = layout_from_files([base])
    mem = rules(
        checks=frozenset({*rules().checks, CheckName.MEMORIZATION}),
        memorization=MemorizationRules(),
    )
    with pytest.raises(InvalidInput, match="memorization"):
        run_gate(out, rules=mem, base_layout=layout, dest_dir=tmp_path / "r")
    dp = rules(checks=frozenset({*rules().checks, CheckName.DP}), dp=DPRules(1.0, 3.0))
    with pytest.raises(InvalidInput, match="dp"):
        run_gate(out, rules=dp, base_layout=layout, dest_dir=tmp_path / "r")
    with pytest.raises(InvalidInput, match="adapter"):
        run_gate(out, rules=rules(adapter_only=True), base_layout=layout, dest_dir=tmp_path / "r")
    with pytest.raises(PolicyDocumentError, match="empty layout"):
        run_gate(out, rules=rules(), base_layout={}, dest_dir=tmp_path / "r")
    (tmp_path / "exists").mkdir()
    with pytest.raises(AlreadyExists):
        run_gate(out, rules=rules(), base_layout=layout, dest_dir=tmp_path / "exists")
    assert not (tmp_path / "r").exists()


# --- the differential-privacy hook ---------------------------------------------------------------


def test_dp_hook_charges_the_sites_epsilon_and_compares_both_budgets(
    tmp_path: Path, base: Path
) -> None:
    layout = layout_from_files([base])
    dp_rules = rules(checks=frozenset({*rules().checks, CheckName.DP}), dp=DPRules(2.0, 5.0))
    out = job_output(tmp_path, base, {"loss": 1.0, "epsilon": 1.5})
    ok = run_gate(
        out,
        rules=dp_rules,
        base_layout=layout,
        dest_dir=tmp_path / "a",
        dp=DPInputs(3.0, epsilon=1.5),
    )
    ok.require_passed()
    assert ok.checks[-1].figures["epsilon"] == 1.5
    over_budget = run_gate(
        out,
        rules=dp_rules,
        base_layout=layout,
        dest_dir=tmp_path / "b",
        dp=DPInputs(spent=4.0, epsilon=1.5),
    )
    assert not over_budget.passed
    assert "exceeds the budget" in over_budget.checks[-1].reasons[0]
    # The site's accountant is what counts, never the job's metric.
    accountant = run_gate(
        out, rules=dp_rules, base_layout=layout, dest_dir=tmp_path / "c", dp=DPInputs(0, epsilon=9)
    )
    assert "per-job cap" in accountant.checks[-1].reasons[0]
    # No record of the site's (it set no DP-SGD): unbounded, whatever the job wrote.
    missing = run_gate(
        out, rules=dp_rules, base_layout=layout, dest_dir=tmp_path / "d", dp=DPInputs(0)
    )
    assert "unbounded" in missing.checks[-1].reasons[0]


def test_decide_dp_refuses_non_finite_epsilon() -> None:
    assert not decide_dp(math.nan, spent=0, rules=DPRules(1, 2)).passed
    assert not decide_dp(-1.0, spent=0, rules=DPRules(1, 2)).passed
    assert decide_dp(1.0, spent=1.0, rules=DPRules(1, 2)).passed


# --- pure pieces ---------------------------------------------------------------------------------


def test_metrics_are_rounded_to_significant_digits() -> None:
    decision = check_metrics(
        {"loss": 0.000123456789, "eval_loss": 98765.4321, "accuracy": -0.0},
        rules=rules(metric_significant_digits=3),
    )
    assert decision.result.outcome is CheckOutcome.PASSED
    assert dict(decision.values) == {"loss": 0.000123, "eval_loss": 98800.0, "accuracy": 0.0}


def test_compare_layout_names_expected_values_only() -> None:
    expected = make_layout({"a": ("F32", (4, 4)), "b": TensorSpec("F32", (4,))})
    actual = make_layout({"a": ("F32", (4, 5)), "zzz-job-text": ("F32", (1,))})
    reasons = compare_layout(actual, expected)
    text = " ".join(reasons)
    assert "zzz-job-text" not in text and "5" not in text
    assert "tensor 'a': shape differs from the base model's [4, 4]" in text
    assert "tensor 'b' of the base model is missing" in text
    assert "1 tensor(s) not in the base model's layout" in text


def test_normalized_edit_distance() -> None:
    assert normalized_edit_distance([1, 2, 3, 4], [1, 2, 3, 4]) == 0
    assert normalized_edit_distance([1, 2, 9, 4], [1, 2, 3, 4]) == 0.25
    assert normalized_edit_distance([2, 3, 4], [1, 2, 3, 4]) == 0.25
    assert normalized_edit_distance([], [1, 2]) == 1.0


def test_released_model_loader_refuses_weights_that_do_not_fill_the_model(
    tmp_path: Path,
) -> None:
    # Were a tensor missing, transformers would initialise it at random and the memorization
    # probe would test a model that is not the release.
    tiny_llama(tmp_path / "base")
    tensors = load_file(tmp_path / "base" / "model.safetensors")
    del tensors["model.norm.weight"]
    write_tensors(tmp_path / "partial.safetensors", tensors)
    with pytest.raises(InvalidInput, match="do not fill the base model"):
        load_released_model(tmp_path / "base", tmp_path / "partial.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no safetensors weights"):
        layout_from_model_dir(tmp_path / "empty")


def test_releases_load_whole_while_other_gates_load_theirs(tmp_path: Path) -> None:
    """Two gates probing at once in one process (two jobs at one site, or sites that share a
    process) each load the release they checked, whole. transformers' loading keeps
    process-wide state (its weight tying: huggingface/transformers#44940): a base with tied
    embeddings, loaded in four threads at once, came out with keys missing; loads take turns."""
    import threading

    from enclave.gate._probe_load import _load_base
    from trainers.basemodel import create_base_model
    from trainers.synthetic import corpus

    base = create_base_model(tmp_path / "tied", texts=corpus(documents=20, seed=1000), seed=0)
    weights = base / "model.safetensors"
    errors: list[BaseException] = []

    def load(fn: Callable[[], object]) -> None:
        try:
            for _ in range(5):
                fn()
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [
        threading.Thread(target=load, args=(lambda: load_released_model(base, weights),))
        for _ in range(3)
    ] + [threading.Thread(target=load, args=(lambda: _load_base(base),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
