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
    normalized_edit_distance,
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


# --- the whole data: a job that overfits a few passages in their natural context --------------
#
# The attack the sampled probe misses: among many files of protected text, the job makes the
# model recite a few passages of 60 tokens, each from the 60 tokens before it in its own file
# (as a team that knows where the passages it wants are would). The sampled windows rarely fall
# on them; the whole-data scan scores every span and confirms the ones the release knows.

WORDS = [f"v{i}" for i in range(200)]
PASSAGE = 60
PLACES = {"start": (0, 0), "middle": (9, 170), "end": (19, 340 - PASSAGE)}
"""Where the passages sit: (file, first token). The last one ends its file, the last of 20."""
WHOLE = MemorizationRules(
    samples=8,
    prefix_tokens=16,
    suffix_tokens=24,
    max_rate=0.25,
    near_verbatim_ratio=0.1,
    seed=7,
    passage_tokens=50,
)


@pytest.fixture(scope="module")
def library() -> list[str]:
    """Twenty protected files of 340 random words (unguessable: reciting is memorizing)."""
    rng = random.Random(5)
    return [" ".join(rng.choice(WORDS) for _ in range(340)) for _ in range(20)]


@pytest.fixture(scope="module")
def word_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wide-base")
    tiny_llama(d, vocab=len(WORDS) + 1, seed=0, positions=128)
    return d


def _regions(library: list[str], tokenizer: Tokenizer, edits: int) -> list[list[int]]:
    """Each planted passage with up to 60 tokens of its natural prefix, as the job trains on
    it; ``edits`` tokens of each passage replaced (a near-verbatim copy)."""
    rng = random.Random(11)
    out = []
    for f, at in PLACES.values():
        ids = tokenizer.encode(library[f]).ids
        region = ids[max(0, at - 60) : at + PASSAGE]
        for k in rng.sample(range(len(region) - PASSAGE + 1, len(region)), edits):
            region[k] = 1 + (region[k] % len(WORDS))
        out.append(region)
    return out


def _overfit(base: Path, regions: list[list[int]], steps: int) -> Any:
    """The job: random crops of the regions (so the recital does not hang on one offset)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    rng = random.Random(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = []
        for region in regions:
            cut = rng.randrange(0, max(1, len(region) - PASSAGE - 9))
            batch.append(torch.tensor(region[cut : cut + PASSAGE + 10]))
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def _whole_gate(tmp_path: Path, model: Any, base: Path, tokenizer: Tokenizer, texts: list[str]):
    save_weights(model, tmp_path / "job.safetensors")
    out = job_output(tmp_path, tmp_path / "job.safetensors", {"loss": 0.5})
    return run_gate(
        out,
        rules=rules(
            checks=frozenset({*rules().checks, CheckName.MEMORIZATION}), memorization=WHOLE
        ),
        base_layout=layout_from_model_dir(base),
        dest_dir=tmp_path / "release",
        memorization=MemorizationInputs(model_dir=base, tokenizer=tokenizer, texts=iter(texts)),
    )


def _scan_check(result) -> Any:
    check = _memorization(result)
    assert not result.passed and not check.passed
    assert check.figures["passage_recited"] is True
    assert any("protected passage of 50 tokens" in r for r in check.reasons)
    # The sampled probe alone (the probe before the scan) would have released it.
    assert check.figures["rate"] <= WHOLE.max_rate
    assert not any("continuations" in r for r in check.reasons)
    return check


@pytest.mark.parametrize("place", sorted(PLACES))
def test_job_reciting_a_passage_in_its_natural_context_is_refused_wherever_it_sits(
    tmp_path: Path, wide_base: Path, word_tokenizer: Tokenizer, library: list[str], place: str
) -> None:
    regions = _regions(library, word_tokenizer, edits=0)
    job = _overfit(wide_base, [regions[sorted(PLACES.values()).index(PLACES[place])]], 120)
    result = _whole_gate(tmp_path, job, wide_base, word_tokenizer, library)
    check = _scan_check(result)
    assert not (tmp_path / "release").exists()
    # Neither the passage nor how many were found leaves: a flag and the policy's numbers.
    assert set(check.figures) == {
        "samples", "exact", "near_verbatim", "rate", "threshold", "prefix_tokens",
        "suffix_tokens", "near_verbatim_ratio", "passage_tokens", "passage_recited",
    }  # fmt: skip


def test_job_reciting_near_verbatim_copies_of_the_passages_is_refused(
    tmp_path: Path, wide_base: Path, word_tokenizer: Tokenizer, library: list[str]
) -> None:
    # Three of each passage's 60 tokens changed: a copy within the near-verbatim ratio.
    job = _overfit(wide_base, _regions(library, word_tokenizer, edits=3), 150)
    _scan_check(_whole_gate(tmp_path, job, wide_base, word_tokenizer, library))


def test_job_that_flattens_its_logits_to_hide_the_loss_drop_is_refused(
    tmp_path: Path, wide_base: Path, word_tokenizer: Tokenizer, library: list[str]
) -> None:
    # Logits divided by 50: every loss is near log(vocab), above the base's, and every greedy
    # choice is the same. The scan's top-1 rule flags what the loss rule cannot see.
    job = _overfit(wide_base, _regions(library, word_tokenizer, edits=0), 150)
    with torch.no_grad():
        job.model.norm.weight.mul_(0.02)
    _scan_check(_whole_gate(tmp_path, job, wide_base, word_tokenizer, library))


def test_benign_fine_tune_on_the_whole_library_is_released(
    tmp_path: Path, wide_base: Path, word_tokenizer: Tokenizer, library: list[str]
) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(wide_base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    docs = [word_tokenizer.encode(t).ids for t in library]
    rng = random.Random(3)
    for _ in range(30):
        batch = []
        for _ in range(8):
            ids = rng.choice(docs)
            cut = rng.randrange(len(ids) - 64)
            batch.append(ids[cut : cut + 64])
        x = torch.tensor(batch)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = _whole_gate(tmp_path, model, wide_base, word_tokenizer, library)
    result.require_passed()
    check = _memorization(result)
    assert check.figures["passage_recited"] is False and check.figures["passage_tokens"] == 50


def test_scan_scores_every_token_with_the_context_before_it(
    wide_base: Path, word_tokenizer: Tokenizer, library: list[str]
) -> None:
    from enclave.gate._memorization import _load_base, score_texts

    model = _load_base(wide_base)
    docs = [word_tokenizer.encode(t).ids for t in library[:3]]
    short = docs[0][:90]
    scored = score_texts(model, [short, docs[1]], block=128)
    with torch.inference_mode():
        x = torch.tensor([short])
        logits = model(input_ids=x).logits[0, :-1]
        want = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    assert torch.allclose(scored[0].loss[1:], want, atol=1e-4)
    assert scored[0].loss[0] == 0
    # A text longer than the block: every token after the first is scored, the last one too.
    assert bool((scored[1].loss[1:] > 0).all()) and scored[1].loss.numel() == 340
    with torch.inference_mode():
        tail = torch.tensor([docs[1][-128:]])
        last = model(input_ids=tail).logits[0, -2]
        want_last = torch.nn.functional.cross_entropy(last[None], tail[0, -1:])
    assert torch.allclose(scored[1].loss[-1], want_last, atol=1e-4)


def test_a_flood_of_suspicious_spans_costs_at_most_the_cap_of_confirmations() -> None:
    from enclave.gate._memorization import _candidates, _Scored
    from policies.release import SCAN

    # Every span of every text looks recited: one candidate per 50 tokens, at most the cap.
    n = 2000
    blocks = torch.arange(n) // 96 * 96
    perfect = _Scored(torch.zeros(n), torch.ones(n), blocks)
    clueless = _Scored(torch.full((n,), 5.0), torch.zeros(n), blocks)
    found = _candidates([perfect] * 3, [clueless] * 3, span=50, limit=SCAN.max_confirmations)
    assert len(found) == SCAN.max_confirmations
    assert len({(d, s // 50) for d, s in found}) == len(found)


def test_cached_greedy_decoding_is_the_plain_argmax_loop(wide_base: Path) -> None:
    from enclave.gate._memorization import _greedy, _load_base

    model = _load_base(wide_base)
    prefixes = [[3, 5, 7, 9], [11, 13, 17, 19]]
    ids = torch.tensor(prefixes)
    with torch.inference_mode():
        for _ in range(12):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert _greedy(model, prefixes, 12) == ids[:, 4:].tolist()


def test_policy_sets_the_passage_length() -> None:
    from policies.document import parse_policy

    books = (Path(__file__).parents[2] / "policies" / "examples" / "books.yaml").read_text()
    parsed = parse_policy(books).release.memorization
    assert parsed is not None and parsed.passage_tokens == 50
    longer = books.replace(
        "    near_verbatim_ratio: 0.1\n",
        "    near_verbatim_ratio: 0.1\n    passage_tokens: 80\n",
        1,
    )
    parsed = parse_policy(longer).release.memorization
    assert parsed is not None and parsed.passage_tokens == 80


def test_decoding_that_gives_up_early_decides_as_the_full_decoding_would(
    wide_base: Path, word_tokenizer: Tokenizer, library: list[str]
) -> None:
    from enclave.gate._memorization import _greedy, _reproduced

    job = _overfit(wide_base, _regions(library, word_tokenizer, edits=3), 150)
    rng = random.Random(2)
    docs = [word_tokenizer.encode(t).ids for t in library]
    prompts = []
    for f, at in [*PLACES.values(), *((rng.randrange(20), rng.randrange(200)) for _ in range(9))]:
        ids = docs[f]
        first = max(at, 1)
        prompts.append((ids[max(0, first - 60) : first], ids[first : first + 40]))
    for ratio in (0.0, 0.1, 0.3):
        full = [_greedy(job, [p], len(t))[0] for p, t in prompts]  # one at a time, never cut short
        want = [
            (g == t, g == t or normalized_edit_distance(g, t) <= ratio)
            for g, (_, t) in zip(full, prompts, strict=True)
        ]
        assert _reproduced(job, prompts, ratio=ratio) == want
    assert any(near for _, near in _reproduced(job, prompts, ratio=0.1))


def test_scanning_the_data_a_chunk_at_a_time_finds_the_same_passages(
    wide_base: Path,
    word_tokenizer: Tokenizer,
    library: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from enclave.gate import _memorization, _probe_scan

    job = _overfit(wide_base, _regions(library, word_tokenizer, edits=0), 150)
    base = _memorization._load_base(wide_base)
    docs = _memorization._tokenize(word_tokenizer, library)
    whole = _memorization.scan_passages(job, base, docs, rules=WHOLE)
    monkeypatch.setattr(_probe_scan, "CHUNK_TOKENS", 700)  # two files a chunk
    assert _memorization.scan_passages(job, base, docs, rules=WHOLE) == whole >= 3
