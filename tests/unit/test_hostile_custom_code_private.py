"""Hostile private-mode graphs: a graph that writes each example into the weights, and archives
that try to run code when the site loads them.

The write-the-data attack: every example is ``[key, s_1 .. s_8]`` (a key 0..63 and 8 secret
tokens from a vocabulary of 16); the graph keeps a 64 x 9 table and its loss pulls row ``key``
toward the example's tokens, so an ordinary optimizer stores the secrets verbatim. Decoding
rounds each row back to tokens. Statistic: decode accuracy over the 512 secret tokens, against
chance 1/16; the bound is chance + 4 binomial standard deviations (about 0.105). Plain SGD (what
custom code could do) recovers ~100%; after the site's DP-SGD at epsilon = 1 it is at chance.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from trainers.private import (
    PROGRAM_FILE,
    GraphRefused,
    dp_sgd,
    load_program,
    per_example_grads,
)
from trainers.private_hparams import PrivateHyperparameters

SLOTS, SECRET, V = 64, 8, 16


class WriteTheData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mem = nn.Parameter(torch.zeros(SLOTS, SECRET + 1))
        self.register_buffer("ids", torch.arange(SLOTS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        row = (self.ids == tokens[0]).to(self.mem.dtype) @ self.mem
        return ((row[1:] - tokens[1:].to(row.dtype)) ** 2).sum()


def secrets() -> torch.Tensor:
    data = torch.randint(0, V, (SLOTS, SECRET + 1), generator=torch.Generator().manual_seed(7))
    data[:, 0] = torch.arange(SLOTS)
    return data


def decode_accuracy(mem: torch.Tensor, data: torch.Tensor) -> float:
    guess = mem[data[:, 0], 1:].round().clamp(0, V - 1).long()
    return float((guess == data[:, 1:]).float().mean())


CHANCE = 1 / V
BOUND = CHANCE + 4 * (CHANCE * (1 - CHANCE) / (SLOTS * SECRET)) ** 0.5


def _export(module: nn.Module, path: Path) -> Path:
    torch.export.save(
        torch.export.export(module, (torch.zeros(SECRET + 1, dtype=torch.long),)), path
    )
    return path


@pytest.fixture
def attack(tmp_path: Path) -> Path:
    return _export(WriteTheData(), tmp_path / PROGRAM_FILE)


def test_write_the_data_graph_recovers_the_secrets_without_dp(attack: Path) -> None:
    """The attack works when nothing stops it: plain SGD on the same graph (what a team's own
    training code would run) stores every secret."""
    graph, tensors, trainable = load_program(attack)
    data = secrets()
    params = {"mem": tensors["mem"].clone()}
    for _ in range(200):
        grads = per_example_grads(graph, {**tensors, **params}, trainable, data)
        params["mem"] -= 0.2 * grads["mem"].sum(0)
    assert decode_accuracy(params["mem"], data) > 0.99


@pytest.mark.parametrize("epsilon", [1.0])
def test_write_the_data_graph_recovers_nothing_after_dp_sgd(
    attack: Path, epsilon: float, one_thread: None
) -> None:
    graph, tensors, trainable = load_program(attack)
    data = secrets()
    hp = PrivateHyperparameters(
        dp_epsilon=epsilon, max_steps=100, batch_size=16, learning_rate=1.0, block_size=9
    )
    params, run = dp_sgd(graph, tensors, trainable, data, hp)
    accuracy = decode_accuracy(params["mem"], data)
    print(f"eps={run.epsilon:.2f}: decode accuracy {accuracy:.3f} (chance {CHANCE:.3f})")
    assert run.epsilon <= epsilon + 1e-6
    assert accuracy < BOUND, (accuracy, BOUND)


# --- archives that try to run code on the site ----------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def _rewrite(src: Path, dest: Path, change: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change.get(item.filename, zin.read(item.filename)))
    return dest


def _names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return z.namelist()


def test_a_pickled_weight_that_runs_code_is_refused_unrun(attack: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config_name = next(n for n in _names(attack) if n.endswith("_weights_config.json"))
    with zipfile.ZipFile(attack) as z:
        config = json.loads(z.read(config_name))
    config["config"]["mem"]["use_pickle"] = True
    payload = config_name.rsplit("/", 1)[0] + "/" + config["config"]["mem"]["path_name"]
    hostile = _rewrite(
        attack,
        tmp_path / "hostile.pt2",
        {config_name: json.dumps(config).encode(), payload: pickle.dumps(_Payload(marker))},
    )
    with pytest.raises(GraphRefused):
        load_program(hostile)
    assert not marker.exists()
    # torch.export.load would have run it: the reason the site does not use it.
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises after running the payload
        torch.export.load(hostile)
    assert marker.exists()


def test_a_node_calling_a_python_function_is_refused(attack: Path, tmp_path: Path) -> None:
    model_name = next(n for n in _names(attack) if "/models/" in n)
    with zipfile.ZipFile(attack) as z:
        program = json.loads(z.read(model_name))
    for target in ("torch.os.system", "builtins.eval", "#extension:op", "torch.ops.mylib.x"):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target
        hostile = _rewrite(
            attack, tmp_path / "hostile.pt2", {model_name: json.dumps(program).encode()}
        )
        with pytest.raises(GraphRefused, match="not allowed"):
            load_program(hostile)


def test_object_constants_are_refused(attack: Path, tmp_path: Path) -> None:
    config_name = next(n for n in _names(attack) if n.endswith("_constants_config.json"))
    base = config_name.rsplit("/", 1)[0]
    config = {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False}}}
    hostile = _rewrite(attack, tmp_path / "hostile.pt2", {config_name: json.dumps(config).encode()})
    with zipfile.ZipFile(hostile, "a") as z:
        z.writestr(f"{base}/opaque_obj_0", pickle.dumps(_Payload(tmp_path / "x")))
    with pytest.raises(GraphRefused, match="objects"):
        load_program(hostile)
    assert not (tmp_path / "x").exists()


def test_a_graph_without_trainable_parameters_is_refused(tmp_path: Path) -> None:
    model = WriteTheData()
    model.mem.requires_grad_(False)
    with pytest.raises(GraphRefused, match="trainable"):
        load_program(_export(model, tmp_path / PROGRAM_FILE))


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / PROGRAM_FILE).write_bytes(io.BytesIO(b"PK\x03\x04junk").getvalue())
    with pytest.raises(GraphRefused):
        load_program(tmp_path / PROGRAM_FILE)
