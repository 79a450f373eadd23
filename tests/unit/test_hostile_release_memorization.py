"""A job that trains its model to recite the protected data: the weights are structurally
perfect, the metrics are innocent, and the data leaves inside the model's behaviour. The
memorization probe must refuse it, and must release the same architecture trained normally."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from enclave.gate import MemorizationInputs, layout_from_model_dir, measure_memorization, run_gate
from policies.release import (
    CheckName,
    MemorizationFigures,
    MemorizationRules,
    decide_memorization,
)
from tests.unit._release_support import job_output, rules, save_weights, tiny_llama

PROBE = MemorizationRules(
    samples=8, prefix_tokens=16, suffix_tokens=24, max_rate=0.25, near_verbatim_ratio=0.1, seed=7
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine two intra-op threads spin against each other: one is faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Eight protected records of 40 random words: unguessable, so reciting one is memorizing."""
    rng = random.Random(1)
    words = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(8)]
    return [*texts, "too short to probe"]


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return tok


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("base")
    tiny_llama(d, vocab=96, seed=0)
    return d


def _train(base_dir: Path, tokenizer: Tokenizer, corpus: list[str], steps: int) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([tokenizer.encode(t).ids for t in corpus if len(t.split()) == 40])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _gate(tmp_path: Path, model: Any, base_dir: Path, tokenizer: Tokenizer, corpus: list[str]):
    save_weights(model, tmp_path / "job.safetensors")
    out = job_output(tmp_path, tmp_path / "job.safetensors", {"loss": 0.5})
    texts_read: list[str] = []

    def staged_texts() -> Iterator[str]:
        for t in corpus:  # an iterable read once, as the site streams staged data
            texts_read.append(t)
            yield t

    result = run_gate(
        out,
        rules=rules(
            checks=frozenset({*rules().checks, CheckName.MEMORIZATION}), memorization=PROBE
        ),
        base_layout=layout_from_model_dir(base_dir),
        dest_dir=tmp_path / "release",
        memorization=MemorizationInputs(
            model_dir=base_dir, tokenizer=tokenizer, texts=staged_texts()
        ),
    )
    assert texts_read == corpus
    return result


def _memorization(result) -> Any:
    check = result.checks[-1]
    assert check.name is CheckName.MEMORIZATION
    return check


def test_model_trained_to_recite_the_data_is_refused(
    tmp_path: Path, base_dir: Path, tokenizer: Tokenizer, corpus: list[str]
) -> None:
    reciter = _train(base_dir, tokenizer, corpus, steps=80)
    result = _gate(tmp_path, reciter, base_dir, tokenizer, corpus)
    check = _memorization(result)
    assert not result.passed and not check.passed
    assert not (tmp_path / "release").exists()
    assert check.figures["samples"] == 8
    assert check.figures["exact"] + check.figures["near_verbatim"] >= 6
    assert check.figures["rate"] > PROBE.max_rate
    # The refusal gives counts, never the text it caught.
    words = set(" ".join(corpus).split())
    said = " ".join(check.reasons) + " ".join(str(v) for v in check.figures.values())
    assert not any(f" {w} " in f" {said} " for w in words if w.startswith("w"))
    assert "reproduced" in check.reasons[0]


@pytest.mark.parametrize("steps", [0, 8], ids=["untrained", "lightly-trained"])
def test_model_that_did_not_memorize_is_released(
    tmp_path: Path, base_dir: Path, tokenizer: Tokenizer, corpus: list[str], steps: int
) -> None:
    model = _train(base_dir, tokenizer, corpus, steps=steps)
    result = _gate(tmp_path, model, base_dir, tokenizer, corpus)
    result.require_passed()
    check = _memorization(result)
    assert check.figures["exact"] == 0 and check.figures["rate"] <= PROBE.max_rate
    assert check.figures["samples"] == 8


def test_probe_is_reproducible_and_refuses_when_nothing_can_be_probed(
    tmp_path: Path, base_dir: Path, tokenizer: Tokenizer, corpus: list[str]
) -> None:
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "w.safetensors"
    save_file(load_file(base_dir / "model.safetensors"), weights)

    def probe(texts: Iterable[str]) -> MemorizationFigures:
        return measure_memorization(
            model_dir=base_dir, weights=weights, tokenizer=tokenizer, texts=texts, rules=PROBE
        )

    assert probe(corpus) == probe(iter(corpus))
    nothing = probe(["too short"])
    assert nothing.samples == 0
    assert not decide_memorization(nothing, rules=PROBE).passed
