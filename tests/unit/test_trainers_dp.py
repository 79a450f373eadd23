"""DP-SGD (Opacus) in the built-in trainers: a DP run of each reports a finite spent epsilon at
most the target, the noise does not follow the public seed, every step is accounted for even
when Poisson sampling draws an empty batch, and bad DP settings are refused by name.

Opacus' per-sample gradients are slow on CPU: runs are four steps on the tiny model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from tests.unit._trainer_support import make_inputs, mount, run_harness
from trainers import contract, training
from trainers.causal_lm import CausalLMModule, TextBlockDataModule
from trainers.errors import ConfigError
from trainers.hparams import CausalLMHyperparameters, DPSettings
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = 8.0
DP = {"max_steps": 4, "batch_size": 4, "seed": 3, "dp_epsilon": TARGET, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"), labelled="labelled")


def _dp_run(template: Path, root: Path, trainer: str, **extra: Any) -> dict[str, float]:
    dataset = "labelled" if trainer == "classification" else "books"
    hp = {**DP, **extra}
    if trainer != "classification":
        hp["block_size"] = 32
    rc, err = run_harness(mount(root, template), hp, trainer=trainer, datasets=(dataset,))
    assert rc == contract.EXIT_OK, err
    metrics: dict[str, float] = json.loads((root / "output" / "metrics.json").read_text())
    return metrics


@pytest.fixture(scope="module")
def full(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full") / "root"
    _dp_run(template, root, "causal-lm")
    return root


def test_a_dp_full_fine_tune_reports_epsilon_within_the_target(full: Path) -> None:
    metrics = json.loads((full / "output" / "metrics.json").read_text())
    epsilon = metrics["epsilon"]
    assert math.isfinite(epsilon) and 0.9 * TARGET < epsilon <= TARGET, metrics
    assert metrics["steps"] == DP["max_steps"]
    weights = full / "output" / "weights" / "model.safetensors"
    assert tensor_layout(weights) == tensor_layout(full / "model" / "base")


def test_the_checkpoint_keeps_the_accountant_and_the_secret_key(full: Path) -> None:
    state = torch.load(full / "output" / "checkpoints" / "last.ckpt", weights_only=False)
    dp = state["sealroom"]["dp"]
    assert len(dp["key"]) == training.KEY_BYTES
    ((noise, rate, steps),) = dp["history"]  # one mechanism, composed over every step
    assert steps == DP["max_steps"] and 0 < rate <= 1 and noise > 0


def test_dp_noise_does_not_follow_the_public_seed(
    full: Path, template: Path, tmp_path: Path
) -> None:
    # The seed is in the spec, which the model team wrote: noise it could regenerate would
    # be noise it could subtract.
    _dp_run(template, tmp_path / "again", "causal-lm")
    first = (full / "output" / "weights" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "output" / "weights" / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize(
    ("trainer", "extra"),
    [
        ("causal-lm-lora", {"lora_r": 4}),
        ("classification", {"learning_rate": 0.003}),
    ],
)
def test_the_other_built_in_trainers_train_under_dp(
    template: Path, tmp_path: Path, trainer: str, extra: dict[str, Any]
) -> None:
    metrics = _dp_run(template, tmp_path / "root", trainer, dp_delta=1e-6, **extra)
    assert math.isfinite(metrics["epsilon"]) and metrics["epsilon"] <= TARGET, metrics
    assert metrics["steps"] == DP["max_steps"]


class _Bag(torch.nn.Module):
    """Embedding + linear head: layers Opacus computes per-sample gradients for directly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)
        self.head = torch.nn.Linear(8, 256)

    def forward(self, *, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.head(self.embed(input_ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss)


@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_empty_poisson_batches_still_step_and_are_accounted(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abcdefgh" * 40)  # 321 byte tokens: 40 blocks of 8
    data = TextBlockDataModule(
        [path],
        encode=lambda t: list(t.encode()),
        separator_id=0,
        block_size=8,
        batch_size=1,
        eval_fraction=0.1,
        seed=0,
    )
    data.setup("fit")
    assert data.train_blocks is not None
    net = _Bag()
    module = CausalLMModule(net, learning_rate=0.01, weight_decay=0.0, warmup_steps=0, max_steps=12)
    private = training.PrivateTraining.attach(
        net,
        DPSettings(target_epsilon=50.0, delta=1e-5, max_grad_norm=1.0),
        rows=len(data.train_blocks),
        batch_size=1,
        steps=12,
    )
    module.private = data.private = private
    sampler = training.step_batches(
        data, len(data.train_blocks), batch_size=1, seed=1, private=private
    )
    sizes = [len(sampler.batch(step)) for step in range(12)]
    assert 0 in sizes, "with one sample expected per step, some of the 12 batches are empty"
    before = net.head.weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=12,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 12
    assert private.accountant.history == [(private.noise_multiplier, private.sample_rate, 12)]
    assert len(module.train_losses) == sum(1 for s in sizes if s)
    assert module.tokens_seen == 8 * sum(sizes)
    assert not torch.equal(before, net.head.weight)
    assert private.epsilon() <= 50.0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"dp_delta": 1e-6}, "dp_delta"),  # DP settings without dp_epsilon
        ({"dp_max_grad_norm": 1.0}, "dp_max_grad_norm"),
        ({"dp_epsilon": 0}, "dp_epsilon"),
        ({"dp_epsilon": -1.0}, "dp_epsilon"),
        ({"dp_epsilon": "8"}, "dp_epsilon"),
        ({"dp_epsilon": 8, "dp_delta": 0.5}, "dp_delta"),
        ({"dp_epsilon": 8, "dp_max_grad_norm": 0}, "dp_max_grad_norm"),
    ],
)
def test_bad_dp_settings_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CausalLMHyperparameters.parse(raw)
    assert info.value.field == f"hyperparameters.{field}"


def test_an_epsilon_no_noise_reaches_is_refused_by_name(template: Path, tmp_path: Path) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, {**DP, "block_size": 32, "dp_epsilon": 1e-9})
    assert rc == contract.EXIT_BAD_CONFIG
    assert err.startswith("sealroom-harness: bad config: hyperparameters.dp_epsilon: "), err


def test_dp_settings_default_and_resume_depends_on_the_step_budget() -> None:
    hp = CausalLMHyperparameters.parse({"dp_epsilon": 3})
    assert hp.dp == DPSettings(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    assert CausalLMHyperparameters().dp is None
    # Noise is calibrated to max_steps: a DP checkpoint resumes only under the same budget.
    assert "max_steps" in hp.resume_key()
    assert "max_steps" not in CausalLMHyperparameters().resume_key()
