"""Attacks on the gate through ``metrics.json``: text smuggled as strings, names or nesting,
values that are not finite numbers, and sheer count. Only a flat object of allowed names to
finite, rounded numbers may leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from enclave.gate import RELEASED_METRICS, layout_from_files, run_gate
from policies.release import CheckName, CheckOutcome
from tests.unit._release_support import job_output, rules, write_tensors

SECRET = "patient-4711-hiv-positive"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    write_tensors(path, {"w": torch.randn(4, 4)})
    return path


def _metrics_refusal(tmp_path: Path, base: Path, text: str, **overrides: object) -> str:
    out = job_output(tmp_path, base, text)
    result = run_gate(
        out,
        rules=rules(**overrides),
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / "release",
    )
    assert not result.passed and not (tmp_path / "release").exists()
    metrics = next(c for c in result.checks if c.name is CheckName.METRICS)
    assert metrics.outcome is CheckOutcome.REFUSED
    reasons = " ".join(metrics.reasons)
    assert SECRET not in reasons
    return reasons


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"loss": NaN}', "metric 'loss' is not finite"),
        ('{"loss": Infinity}', "metric 'loss' is not finite"),
        ('{"loss": -Infinity}', "metric 'loss' is not finite"),
        ('{"loss": 1e400}', "metric 'loss' is not finite"),
        ('{"loss": 1e300}', "metric 'loss' exceeds 1e+12 in magnitude"),
        ('{"loss": ' + "9" * 400 + "}", "metric 'loss' exceeds 1e+12 in magnitude"),
        ('{"loss": ' + "9" * 5000 + "}", "not strict JSON"),  # past Python's int-digits limit
        (f'{{"loss": "{SECRET}"}}', "metric 'loss' is not a number"),
        ('{"loss": true}', "metric 'loss' is not a number"),
        ('{"loss": null}', "metric 'loss' is not a number"),
        (f'{{"loss": {{"nested": "{SECRET}"}}}}', "metric 'loss' is not a number"),
        ('{"loss": [1, 2, 3]}', "metric 'loss' is not a number"),
        (f'[1, "{SECRET}"]', "metrics.json is not a JSON object"),
        ('"just a string"', "metrics.json is not a JSON object"),
        ('{"loss": 1, "loss": 2}', "repeats a name"),
        ('{"loss": 1', "not strict JSON"),
        ("[" * 100_00 + "]" * 100_00, "not strict JSON"),
        (f'{{"{SECRET}": 1.0}}', "metric names not allowed by the policy (names withheld)"),
    ],
)
def test_hostile_metrics_are_refused(tmp_path: Path, base: Path, text: str, reason: str) -> None:
    assert reason in _metrics_refusal(tmp_path, base, text)


def test_invalid_utf8_is_refused(tmp_path: Path, base: Path) -> None:
    out = job_output(tmp_path, base)
    (out / "metrics.json").write_bytes(b'{"loss": 1.0, "\xff\xfe": 2}')
    result = run_gate(
        out, rules=rules(), base_layout=layout_from_files([base]), dest_dir=tmp_path / "r"
    )
    assert "not strict JSON" in " ".join(result.checks[2].reasons)


def test_hundreds_of_metric_names_are_refused_by_count(tmp_path: Path, base: Path) -> None:
    # Each name could carry ~64 bytes: hundreds of them are a file's worth of data.
    many = {f"m{i:03d}_{SECRET[i % len(SECRET)]}": float(i) for i in range(500)}
    reasons = _metrics_refusal(tmp_path, base, json.dumps(many))
    assert reasons == "more metrics than the cap of 32"


def test_allowed_names_under_the_cap_but_too_many_for_the_policy(
    tmp_path: Path, base: Path
) -> None:
    reasons = _metrics_refusal(
        tmp_path, base, '{"loss": 1, "eval_loss": 2, "accuracy": 3}', max_metrics=2
    )
    assert reasons == "more metrics than the cap of 2"


def test_low_order_digits_are_rounded_away(tmp_path: Path, base: Path) -> None:
    # 17 significant digits can carry ~40 bits per metric; the policy keeps 4.
    out = job_output(tmp_path, base, '{"loss": 0.12345678901234567, "accuracy": 12345.678}')
    result = run_gate(
        out, rules=rules(), base_layout=layout_from_files([base]), dest_dir=tmp_path / "r"
    )
    result.require_passed()
    released = json.loads((tmp_path / "r" / RELEASED_METRICS).read_text())
    assert released == {"loss": 0.1235, "accuracy": 12350.0}
