"""Hyperparameters from the job's JSON: defaults, and every kind of bad value refused by name."""

from __future__ import annotations

import math
from typing import Any

import pytest

from trainers.errors import ConfigError
from trainers.hparams import CausalLMHyperparameters


def test_defaults_are_demo_sized() -> None:
    hp = CausalLMHyperparameters.parse({})
    assert hp == CausalLMHyperparameters()
    assert hp.max_steps <= 60
    assert hp.precision == "auto"


def test_values_are_taken_and_ints_widen_to_floats() -> None:
    hp = CausalLMHyperparameters.parse({"max_steps": 5, "learning_rate": 1, "seed": 9})
    assert (hp.max_steps, hp.seed) == (5, 9)
    assert isinstance(hp.learning_rate, float)
    assert hp.learning_rate == 1.0


def test_value_is_frozen() -> None:
    hp = CausalLMHyperparameters.parse({})
    with pytest.raises(AttributeError):
        hp.max_steps = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"learning_rate": -0.1}, "learning_rate", "> 0.0"),
        ({"learning_rate": 0}, "learning_rate", "> 0.0"),
        ({"learning_rate": math.nan}, "learning_rate", "finite"),
        ({"learning_rate": math.inf}, "learning_rate", "finite"),
        ({"learning_rate": "0.1"}, "learning_rate", "must be a number, got str"),
        ({"learning_rate": True}, "learning_rate", "must be a number, got bool"),
        ({"max_steps": 0}, "max_steps", ">= 1"),
        ({"max_steps": 2.5}, "max_steps", "must be an integer, got float"),
        ({"max_steps": 3.0}, "max_steps", "must be an integer, got float"),
        ({"max_steps": True}, "max_steps", "must be an integer, got bool"),
        ({"max_steps": None}, "max_steps", "must be an integer, got NoneType"),
        ({"batch_size": 10**9}, "batch_size", "<= 4096"),
        ({"eval_fraction": 0.0}, "eval_fraction", "> 0.0"),
        ({"eval_fraction": 0.9}, "eval_fraction", "<= 0.5"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"precision": "fp8"}, "precision", "must be one of"),
        ({"precision": 16}, "precision", "must be a string"),
        ({"max_steps": 3, "warmup_steps": 4}, "warmup_steps", "must not exceed max_steps"),
        ({"lerning_rate": 0.1}, "lerning_rate", "unknown hyperparameter"),
        ({"__class__": 1}, "__class__", "unknown hyperparameter"),
    ],
)
def test_bad_values_name_the_field(raw: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        CausalLMHyperparameters.parse(raw)
    assert info.value.field == f"hyperparameters.{field}"
    assert str(info.value).startswith(f"hyperparameters.{field}: ")
    assert words in str(info.value)


def test_every_unknown_name_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        CausalLMHyperparameters.parse({"zeta": 1, "alpha": 2, "max_steps": 3})
    assert info.value.field == "hyperparameters.alpha"
    assert "alpha, zeta" in str(info.value)


def test_a_non_object_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        CausalLMHyperparameters.parse([("max_steps", 3)])  # type: ignore[arg-type]
    assert info.value.field == "hyperparameters"


def test_optional_fields_take_null_as_unset() -> None:
    hp = CausalLMHyperparameters.parse({"dp_epsilon": None, "dp_delta": None})
    assert hp.dp_epsilon is None and hp.dp is None
    with pytest.raises(ConfigError, match=r"^hyperparameters\.dp_epsilon: must be a number"):
        CausalLMHyperparameters.parse({"dp_epsilon": "8"})


def test_each_trainer_refuses_the_others_fields() -> None:
    from trainers.hparams import ClassificationHyperparameters, LoRAHyperparameters

    assert LoRAHyperparameters.parse({"lora_r": 4, "block_size": 32}).lora_r == 4
    with pytest.raises(ConfigError) as info:
        CausalLMHyperparameters.parse({"lora_r": 4})
    assert info.value.field == "hyperparameters.lora_r"
    with pytest.raises(ConfigError) as info:
        ClassificationHyperparameters.parse({"target_modules": "q_proj"})
    assert info.value.field == "hyperparameters.target_modules"
    assert ClassificationHyperparameters.parse({"labels": " neg , pos "}).label_names == (
        "neg",
        "pos",
    )
