"""Job specs: valid specs parse; hostile or malformed ones are refused naming the field."""

from __future__ import annotations

import json

import pytest

from policies.errors import SpecError
from policies.spec import DatasetRef, parse_spec

GOOD = """
name: tune-books
datasets: [books, medical@v2]
base_model: tiny-gpt
trainer: causal-lm
purpose: summarisation research
hyperparameters: {max_steps: 30, learning_rate: 0.001}
resources: {gpus: 1, memory_mb: 2048, timeout_s: 600}
env: {JOB_MODE: fast}
"""


def test_parses_and_pins_dataset_versions() -> None:
    spec = parse_spec(GOOD)
    assert spec.datasets == (DatasetRef("books"), DatasetRef("medical", 2))
    assert spec.resources.gpus == 1
    assert spec.hyperparameters["max_steps"] == 30


def test_digest_ignores_spelling_but_not_content() -> None:
    a = parse_spec(GOOD)
    b = parse_spec(json.dumps(parse_spec(GOOD).to_dict()))
    assert a.digest() == b.digest()
    c = parse_spec(GOOD.replace("max_steps: 30", "max_steps: 31"))
    assert c.digest() != a.digest()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ("privileged: true\n", "privileged"),
        ("devices: [/dev/sda]\n", "devices"),
        ("network_mode: host\n", "network_mode"),
        ("pid_mode: host\n", "pid_mode"),
        ("cap_add: [SYS_ADMIN]\n", "cap_add"),
        ("volumes: ['/:/host']\n", "volumes"),
        ("image: evil:latest\n", "image"),
        ("user: root\n", "user"),
    ],
)
def test_refuses_container_weakening_fields(patch: str, field: str) -> None:
    with pytest.raises(SpecError, match=f"'{field}' is not allowed"):
        parse_spec(GOOD + patch)


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PATH", "SEALROOM_JOB", "job_x"])
def test_refuses_environment_outside_job_prefix(name: str) -> None:
    with pytest.raises(SpecError, match=f"env: .*{name}"):
        parse_spec(GOOD.replace("JOB_MODE", name))


@pytest.mark.parametrize(
    ("before", "after", "field"),
    [
        ("gpus: 1", "gpus: 99", "resources.gpus"),
        ("gpus: 1", "gpus: '1'", "resources.gpus"),
        ("timeout_s: 600", "timeout_s: 1", "resources.timeout_s"),
        ("name: tune-books", "name: ../etc", "name"),
        ("datasets: [books, medical@v2]", "datasets: []", "datasets"),
        ("datasets: [books, medical@v2]", "datasets: [books, books@v1]", "datasets"),
        ("trainer: causal-lm", "trainer: Causal LM!", "trainer"),
        ("base_model: tiny-gpt", "base_model: 7", "base_model"),
    ],
)
def test_errors_name_the_field(before: str, after: str, field: str) -> None:
    with pytest.raises(SpecError, match=rf"{field}:"):
        parse_spec(GOOD.replace(before, after))


def test_unknown_field_is_refused() -> None:
    with pytest.raises(SpecError, match="colour"):
        parse_spec(GOOD + "colour: blue\n")


def test_custom_trainer_needs_entrypoint() -> None:
    with pytest.raises(SpecError, match="entrypoint"):
        parse_spec(GOOD.replace("causal-lm", "custom"))
    spec = parse_spec(GOOD.replace("causal-lm", "custom") + "entrypoint: mymod:Module\n")
    assert spec.is_custom


@pytest.mark.parametrize("text", ["", "- a list", "{{{", b"\xff\xfe", "x" * 70000])
def test_garbage_is_refused_cleanly(text: str | bytes) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)
