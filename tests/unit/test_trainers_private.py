"""The private-graph trainer (custom_code: private): a benign LoRA-style graph still learns
under the site's DP-SGD, the DP parameters come from the accountant, and the harness knows it.

Loss is measured by the test on held-out sequences (the trainer itself reports none)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainers.errors import ConfigError
from trainers.harness import TRAINERS
from trainers.private import PROGRAM_FILE, dp_sgd, epsilon_of, load_program, noise_for
from trainers.private_hparams import PrivateHyperparameters

V, D, R, T = 16, 16, 8, 12


class LoRALM(nn.Module):
    """A tiny causal LM: a frozen base (embedding, output) plus trainable low-rank adapters.
    One example in (``int64[T]``), its mean next-token loss out."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(V, D, generator=g), requires_grad=False)
        self.out = nn.Parameter(torch.randn(D, V, generator=g) / D**0.5, requires_grad=False)
        self.adapter_a = nn.Parameter(torch.randn(D, R, generator=g) * 0.1)
        self.adapter_b = nn.Parameter(torch.zeros(R, V))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed[tokens[:-1]]
        return h @ self.out + (h @ self.adapter_a) @ self.adapter_b

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(tokens), tokens[1:])


def sequences(n: int, seed: int) -> torch.Tensor:
    """A language with one rule: the next token is (3 x + 1) mod V."""
    start = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
    rows = [start]
    for _ in range(T - 1):
        rows.append((rows[-1] * 3 + 1) % V)
    return torch.stack(rows, 1)


def export(module: nn.Module, path: Path) -> Path:
    program = torch.export.export(module, (torch.zeros(T, dtype=torch.long),))
    torch.export.save(program, path)
    return path


def held_out_loss(module: nn.Module, params: dict[str, torch.Tensor], data: torch.Tensor) -> float:
    with torch.no_grad():
        for name, value in params.items():
            getattr(module, name).copy_(value)
        return float(torch.stack([module(row) for row in data]).mean())


def test_a_benign_lora_graph_learns_under_dp_sgd(tmp_path: Path, one_thread: None) -> None:
    model = LoRALM()
    graph, tensors, trainable = load_program(export(model, tmp_path / PROGRAM_FILE))
    assert trainable == {"adapter_a", "adapter_b"}  # the frozen base is not trained
    train, test = sequences(4096, seed=1), sequences(256, seed=2)
    hp = PrivateHyperparameters(
        dp_epsilon=8.0, max_steps=60, batch_size=512, learning_rate=5.0, block_size=T
    )
    before = held_out_loss(LoRALM(), {}, test)
    params, run = dp_sgd(graph, tensors, trainable, train, hp)
    after = held_out_loss(LoRALM(), params, test)
    print(f"benign LoRA graph, eps={run.epsilon:.2f}: held-out loss {before:.4f} -> {after:.4f}")
    assert run.epsilon <= 8.0 + 1e-6 and run.noise_multiplier > 0.5
    assert after < before - 0.3, (before, after)
    assert set(params) == {"adapter_a", "adapter_b"}


def test_the_accountant_sets_the_noise_and_recomputes_epsilon() -> None:
    sigma = noise_for(epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000)
    eps = epsilon_of(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5)
    assert 1.9 < eps <= 2.0 + 1e-6
    # Less noise would spend more: the site never picks a multiplier that overspends.
    assert epsilon_of(noise_multiplier=sigma * 0.8, sample_rate=0.01, steps=1000, delta=1e-5) > 2


def test_the_harness_registers_the_private_trainer_and_requires_epsilon() -> None:
    entry = TRAINERS["private"]
    assert entry.run == "trainers.private:run_bundle"
    assert entry.validate({"dp_epsilon": 4}).dp_epsilon == 4.0
    with pytest.raises(ConfigError, match="dp_epsilon"):
        entry.validate({"max_steps": 3})
    for bad in ({"dp_epsilon": 0}, {"dp_epsilon": math.inf}, {"dp_epsilon": 1, "lr": 1}):
        with pytest.raises(ConfigError):
            entry.validate(bad)
