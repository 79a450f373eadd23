"""The extractable-memorization probe: does the released model recite the protected data?

Two ways, over the same tokenised texts (read once):

- Sampled, following Carlini et al. ("Quantifying Memorization Across Neural Language Models",
  2023): K windows of ``prefix + suffix`` tokens (seeded, so the figure is reproducible), the
  released model prompted with each prefix, the suffix's length decoded greedily and compared
  with the true suffix.
- Whole data: every token of every text is scored under the released model and under the
  site's base model, in batched forward passes over overlapping blocks of the model's context
  (each token predicted with at least a quarter of a context of its own text before it, where
  the text has it). Every span of ``passage_tokens`` tokens gets its mean loss and top-1 rate
  under both models, with cumulative sums rather than a loop; spans the release knows far
  better than the base (:class:`policies.release.ScanThresholds`) are confirmed by greedy
  generation from the tokens before them in their text. So a passage the job made the model
  recite is found wherever it sits in the data, not only where a sample happened to fall.

A continuation counts as reproduced when it is exact or within the rule's normalised token edit
distance. Only counts leave this module; the texts and the generations never do. What the scan
cannot find is a passage recited only after a prompt that does not occur in the data (a
trigger): see ``docs/memorization.md``.

The model is what the release is, loaded from the canonical files the gate wrote over the
site's trusted base model, by transformers and peft from safetensors only, no remote code: a
full release is the base configuration with exactly the released weights; a LoRA adapter is
loaded with ``PeftModel.from_pretrained`` over the base (as a model team would) and merged; a
classifier's backbone is laid over the base causal LM (its language-model head, tied to the
embedding where the base ties them), since a classifier has no head to generate with. A
release that cannot be loaded that way raises :class:`NotProbeable`, and the gate refuses it.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from policies.errors import InvalidInput
from policies.release import (
    SCAN,
    MemorizationFigures,
    MemorizationRules,
    ScanThresholds,
    is_reproduced,
)

CONFIG_FILES = ("config.json", "generation_config.json")
BATCH = 64
"""Greedy continuations decoded together (one step of each is one forward call)."""
MAX_BLOCK = 1024
"""The scan's block: the model's context, at most this many tokens."""
LOGIT_BUDGET = 1 << 24
"""Logit values (floats) one scan batch may hold: 64 MiB."""
CHUNK_TOKENS = 1 << 20
"""Tokens of text the scan scores before it keeps only its best candidates."""
LM_HEAD_PREFIX = "lm_head."


class NotProbeable(InvalidInput):
    """The release cannot be loaded as the model it claims to be, so it cannot be probed."""


class Tokenizer(Protocol):
    """A ``tokenizers.Tokenizer`` or a transformers tokenizer (``encode`` returning ids)."""

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)  # tokenizers.Encoding carries .ids
    return [int(i) for i in ids]


def sample_windows(
    tokenizer: Tokenizer, texts: Iterable[str], *, rules: MemorizationRules
) -> list[tuple[list[int], list[int]]]:
    """Up to ``rules.samples`` (prefix, suffix) token windows, seeded; texts read once."""
    return _sample(_tokenize(tokenizer, texts), rules=rules)


def _tokenize(tokenizer: Tokenizer, texts: Iterable[str]) -> list[torch.Tensor]:
    # int32 tensors, 4 bytes a token: a list of Python ints would take nine times as much.
    return [torch.tensor(_ids(tokenizer, text), dtype=torch.int32) for text in texts]


def _sample(
    docs: Sequence[torch.Tensor], *, rules: MemorizationRules
) -> list[tuple[list[int], list[int]]]:
    """Reservoir sampling of K texts long enough, then one window in each; when fewer than K
    texts are long enough, windows are drawn again from those at other offsets."""
    need = rules.prefix_tokens + rules.suffix_tokens
    rng = random.Random(rules.seed)
    reservoir: list[torch.Tensor] = []
    seen = 0
    for ids in docs:
        if len(ids) < need:
            continue
        seen += 1
        if len(reservoir) < rules.samples:
            reservoir.append(ids)
        else:
            j = rng.randrange(seen)
            if j < rules.samples:
                reservoir[j] = ids
    windows = []
    for i in range(rules.samples if reservoir else 0):
        ids = reservoir[i % len(reservoir)]
        start = rng.randrange(len(ids) - need + 1)
        window: list[int] = ids[start : start + need].tolist()
        windows.append((window[: rules.prefix_tokens], window[rules.prefix_tokens :]))
    return windows


def load_released_model(model_dir: Path, weights: Path) -> Any:
    """The base model's architecture with exactly ``weights`` (a canonical safetensors file).

    Raises :class:`InvalidInput` if the weights do not fill the model exactly.
    """
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="sealroom-gate-") as tmp:
        for name in CONFIG_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, Path(tmp) / name)
        if not (Path(tmp) / "config.json").is_file():
            raise InvalidInput(f"base model directory {model_dir} has no config.json")
        # A link, not a copy: the release file is the gate's own and may be large.
        os.symlink(weights.resolve(), Path(tmp) / "model.safetensors")
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    model, info = loaded
    # A weight transformers had to initialise itself would make the probe test a random model.
    problems = sorted(k for k, v in info.items() if v)  # missing/unexpected/mismatched keys
    if problems:
        raise InvalidInput(f"released weights do not fill the base model: {problems}")
    model.eval()
    return model


def _load_base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )


def load_adapter_release(model_dir: Path, weights: Path) -> Any:
    """The base model with the released LoRA adapter (``weights`` and the
    ``adapter_config.json`` beside it) loaded by ``PeftModel.from_pretrained``, then merged.

    Raises :class:`NotProbeable` if peft does not load it, or loads other values than the
    released ones (a tensor left at its initialisation would probe a model that is not the
    release).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    base = _load_base(model_dir)
    try:
        with warnings.catch_warnings():
            # peft asking transformers for a name transformers deprecates: not ours.
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            model: Any = PeftModel.from_pretrained(base, str(weights.parent), is_trainable=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise NotProbeable(f"peft does not load the adapter: {type(e).__name__}") from e
    released = load_file(str(weights))
    loaded = get_peft_model_state_dict(model)
    if set(loaded) != set(released):
        raise NotProbeable("the loaded adapter's tensors differ from the released ones")
    for name, tensor in released.items():
        if not torch.equal(loaded[name], tensor.to(loaded[name].dtype)):
            raise NotProbeable(f"tensor {name!r} did not load with its released values")
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def load_backbone_release(model_dir: Path, weights: Path) -> Any:
    """The base causal LM with a classifier release's backbone laid over it.

    Every base tensor but the language-model head must be covered by a released tensor of the
    same name and shape (the classifier's own head, which the base lacks, is left out). Raises
    :class:`NotProbeable` otherwise.
    """
    from safetensors.torch import load_file

    model = _load_base(model_dir)
    released = load_file(str(weights))
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = 0
    with torch.no_grad():
        for name, param in params.items():
            if name.startswith(LM_HEAD_PREFIX):
                continue
            tensor = released.get(name)
            if tensor is None:
                raise NotProbeable(f"the release does not cover the base tensor {name!r}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise NotProbeable(f"tensor {name!r} has another shape than the base's")
            param.copy_(tensor.to(param.dtype))
            covered += 1
    if not covered:
        raise NotProbeable("the release shares no tensor with the base model")
    model.eval()
    return model


class _EditRow:
    """The last row of the edit-distance table of a growing generation against ``truth``: its
    minimum is the least distance any continuation of the generation can end at, so once it
    exceeds the budget the generation can no longer reproduce the truth."""

    def __init__(self, truth: Sequence[int]) -> None:
        self.truth = truth
        self.row = list(range(len(truth) + 1))

    def push(self, token: int) -> int:
        prev, cur = self.row, [self.row[0] + 1]
        for j, y in enumerate(self.truth, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (token != y)))
        self.row = cur
        return min(cur)


@torch.inference_mode()
def _greedy(
    model: Any,
    prefixes: Sequence[list[int]],
    steps: int,
    *,
    truths: Sequence[Sequence[int]] | None = None,
    ratio: float = 0.0,
) -> list[list[int]]:
    """Greedy continuations of equally long ``prefixes``, ``steps`` tokens each: a plain argmax
    loop over the model's key-value cache, no sampling, no early stop at an end-of-text token.

    With ``truths``, decoding stops early once no continuation could come within ``ratio`` edits
    per token of its truth (the generations are then cut short, and reproduce nothing)."""
    if not steps or not prefixes:
        return [[] for _ in prefixes]
    rows = [_EditRow(t) for t in truths] if truths is not None else None
    out = model(input_ids=torch.tensor(prefixes, dtype=torch.long), use_cache=True)
    nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    generated = [nxt]
    for _ in range(steps - 1):
        if rows is not None and truths is not None:
            tokens = nxt[:, 0].tolist()
            least = [row.push(t) for row, t in zip(rows, tokens, strict=True)]
            if all(d > ratio * len(t) for d, t in zip(least, truths, strict=True)):
                break
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(nxt)
    result: list[list[int]] = torch.cat(generated, dim=1).tolist()
    return result


def _reproduced(
    model: Any, prompts: Sequence[tuple[list[int], list[int]]], *, ratio: float
) -> list[tuple[bool, bool]]:
    """For each ``(prefix, truth)``: (exact, within ``ratio``) of the greedy continuation of
    the truth's length, batched among prompts of equal shapes."""
    results: list[tuple[bool, bool]] = [(False, False) for _ in prompts]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prefix, truth) in enumerate(prompts):
        groups.setdefault((len(prefix), len(truth)), []).append(i)
    for (_, steps), members in sorted(groups.items()):
        for at in range(0, len(members), BATCH):
            chunk = members[at : at + BATCH]
            truths = [prompts[i][1] for i in chunk]
            gens = _greedy(model, [prompts[i][0] for i in chunk], steps, truths=truths, ratio=ratio)
            for i, gen, truth in zip(chunk, gens, truths, strict=True):
                results[i] = (gen == truth, is_reproduced(gen, truth, ratio=ratio))
    return results


# --- the whole-data scan -------------------------------------------------------------------


@dataclass(frozen=True)
class _Scored:
    """Per-token figures of one text under one model: ``loss[t]`` is -log p(token t | the
    tokens before it), ``top1[t]`` is 1 where token t was the model's argmax; position 0 has
    no context and holds 0 in both."""

    loss: torch.Tensor
    top1: torch.Tensor
    context: torch.Tensor
    """Where the context token t was scored with begins (the start of its block)."""


def context_of(model: Any) -> int:
    """The model's context length, capped at :data:`MAX_BLOCK`."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return min(int(n), MAX_BLOCK) if isinstance(n, int) and n > 1 else MAX_BLOCK


def _windows(n: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, end, first)``: blocks over a text of ``n`` tokens, each scoring tokens
    ``first..end-1``. Consecutive blocks overlap by a quarter, so every token past the first
    block has at least ``block // 4`` tokens of context; the last block ends at the text's end
    and is a whole block whenever the text is that long (so most blocks share one shape)."""
    stride = max(1, block - block // 4)
    out: list[tuple[int, int, int]] = []
    scored = 1
    start = 0
    while scored < n:
        start = min(start, max(0, n - block))
        end = min(start + block, n)
        out.append((start, end, scored))
        scored = end
        start += stride
    return out


@torch.inference_mode()
def score_texts(
    model: Any, docs: Sequence[torch.Tensor | list[int]], *, block: int
) -> list[_Scored]:
    """Every token of every text scored under ``model``: batched forward passes over blocks of
    at most ``block`` tokens, blocks of one length together (no padding, so no mask), per-token
    cross-entropy and argmax hits."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    # Logits take batch x block x vocab floats: keep them near LOGIT_BUDGET.
    batch = max(1, LOGIT_BUDGET // (block * vocab))
    tensors = [torch.as_tensor(ids, dtype=torch.long) for ids in docs]
    jobs = [(d, *w) for d, ids in enumerate(docs) for w in _windows(len(ids), block)]
    jobs.sort(key=lambda job: job[2] - job[1])
    loss = [torch.zeros(len(ids)) for ids in docs]
    top1 = [torch.zeros(len(ids)) for ids in docs]
    context = [torch.zeros(len(ids), dtype=torch.long) for ids in docs]
    at = 0
    while at < len(jobs):
        width = jobs[at][2] - jobs[at][1]
        chunk = [j for j in jobs[at : at + batch] if j[2] - j[1] == width]
        at += len(chunk)
        ids = torch.stack([tensors[d][start:end] for d, start, end, _ in chunk])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :]
        target = ids[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2).float(), target, reduction="none"
        )
        hits = (logits.argmax(dim=-1) == target).float()
        for row, (d, start, end, first) in enumerate(chunk):
            # Column j predicts token start + j + 1.
            lo, hi = first - start - 1, end - start - 1
            loss[d][first:end] = token_loss[row, lo:hi]
            top1[d][first:end] = hits[row, lo:hi]
            context[d][first:end] = start
    return [_Scored(*f) for f in zip(loss, top1, context, strict=True)]


def _span_means(values: torch.Tensor, span: int) -> torch.Tensor:
    """Mean of ``values[max(s, 1) : s + span]`` for every start ``s`` (position 0 excluded)."""
    n = values.numel()
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    starts = torch.arange(n - span + 1)
    lo = starts.clamp(min=1)
    return ((sums[starts + span] - sums[lo]) / (starts + span - lo)).float()


def flag_spans(
    release: _Scored, base: _Scored, *, span: int, thresholds: ScanThresholds = SCAN
) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, scores) of the flagged spans of one text, at most one per ``span`` tokens (the
    best by release top-1, then loss drop); empty when the text is shorter than ``span``."""
    n = release.loss.numel()
    if n < span:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    lr, lb = _span_means(release.loss, span), _span_means(base.loss, span)
    ar, ab = _span_means(release.top1, span), _span_means(base.top1, span)
    by_loss = (lr <= thresholds.loss_ratio * lb) & (lb - lr >= thresholds.loss_margin)
    by_top1 = (ar >= thresholds.top1) & (ar - ab >= thresholds.top1_gain)
    # Top-1 first (steps of 1/span >= 1/4096), then the loss drop (at most 2e-4).
    score = ar + (lb - lr).clamp(0.0, 20.0) * 1e-5
    score = torch.where(by_loss | by_top1, score, torch.tensor(-math.inf))
    count = score.numel()
    buckets = -(-count // span)
    padded = torch.full((buckets * span,), -math.inf)
    padded[:count] = score
    best, where = padded.view(buckets, span).max(dim=1)
    keep = torch.isfinite(best)
    starts = torch.arange(buckets)[keep] * span + where[keep]
    return starts, best[keep]


def _flagged(
    released: Sequence[_Scored], base: Sequence[_Scored], *, span: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, start, score) of the flagged spans of these texts, as tensors."""
    docs, starts, scores = (
        [torch.zeros(0, dtype=torch.long)],
        [torch.zeros(0, dtype=torch.long)],
        [torch.zeros(0)],
    )
    for d, (r, b) in enumerate(zip(released, base, strict=True)):
        s, v = flag_spans(r, b, span=span)
        docs.append(torch.full_like(s, d))
        starts.append(s)
        scores.append(v)
    return torch.cat(docs), torch.cat(starts), torch.cat(scores)


def _candidates(
    released: Sequence[_Scored], base: Sequence[_Scored], *, span: int, limit: int
) -> list[tuple[int, int]]:
    """``(text, start)`` of at most ``limit`` flagged spans, the highest scores first."""
    docs, starts, scores = _flagged(released, base, span=span)
    top = torch.topk(scores, min(limit, scores.numel())).indices
    return [(int(docs[i]), int(starts[i])) for i in top]


def scan_passages(
    model: Any,
    base: Any,
    docs: Sequence[torch.Tensor],
    *,
    rules: MemorizationRules,
    thresholds: ScanThresholds = SCAN,
) -> int:
    """How many flagged spans of ``rules.passage_tokens`` the released ``model`` reproduces
    (exact or near-verbatim) from the tokens before them in their text (at most
    :attr:`ScanThresholds.max_confirmations` are tried). Texts are scored a chunk of
    :data:`CHUNK_TOKENS` at a time, keeping only the best candidates so far, so memory does not
    grow with the data beyond its tokens.

    Raises :class:`InvalidInput` when the model's context cannot hold a passage and a token
    before it.
    """
    span = rules.passage_tokens
    block = min(context_of(model), context_of(base))
    if block < span + 1:
        raise InvalidInput(
            f"the model's context ({block} tokens) cannot hold a passage of {span} tokens"
        )
    long_enough = [ids for ids in docs if len(ids) >= span]
    limit = thresholds.max_confirmations
    # The best candidates so far: text, start, score, and where the scan's context began.
    kept = [torch.zeros(0, dtype=torch.long)] * 2 + [
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
    ]
    at = 0
    while at < len(long_enough):
        chunk: list[torch.Tensor] = []
        size = 0
        while at < len(long_enough) and (not chunk or size + len(long_enough[at]) <= CHUNK_TOKENS):
            chunk.append(long_enough[at])
            size += len(long_enough[at])
            at += 1
        released = score_texts(model, chunk, block=block)
        trusted = score_texts(base, chunk, block=block)
        d, s, v = _flagged(released, trusted, span=span)
        begins = [
            int(released[int(di)].context[max(int(si), 1)]) for di, si in zip(d, s, strict=True)
        ]
        d = d + (at - len(chunk))
        merged = [
            torch.cat([k, x])
            for k, x in zip(kept, (d, s, v, torch.tensor(begins, dtype=torch.long)), strict=True)
        ]
        top = torch.topk(merged[2], min(limit, merged[2].numel())).indices
        kept = [m[top] for m in merged]
    # Each candidate from two natural contexts: the one the scan scored its first token with
    # (so a span the scan saw recited is recited here too), and the longest that fits.
    prompts, owners = [], []
    for n, (d_, start, scanned) in enumerate(
        zip(kept[0].tolist(), kept[1].tolist(), kept[3].tolist(), strict=True)
    ):
        ids, first = long_enough[d_], max(start, 1)
        longest = max(0, first - (block - span))
        for begin in sorted({max(scanned, longest), longest}):
            prompts.append((ids[begin:first].tolist(), ids[first : start + span].tolist()))
            owners.append(n)
    results = _reproduced(model, prompts, ratio=rules.near_verbatim_ratio)
    return len({n for n, (_, near) in zip(owners, results, strict=True) if near})


def measure_memorization(
    *,
    model_dir: Path,
    weights: Path,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    rules: MemorizationRules,
    loader: Callable[[], Any] | None = None,
) -> MemorizationFigures:
    """Probe the released model with the protected texts: by default ``model_dir``'s config
    with ``weights``; ``loader`` loads another kind of release (:func:`load_adapter_release`,
    :func:`load_backbone_release`). The whole-data scan compares it with ``model_dir``'s own
    weights, the site's trusted base.

    Returns the counts; the caller decides with :func:`policies.release.decide_memorization`.
    Raises :class:`InvalidInput` if the tokenizer's ids do not fit the model's vocabulary and
    :class:`NotProbeable` if the release cannot be loaded.
    """
    docs = _tokenize(tokenizer, texts)
    windows = _sample(docs, rules=rules)
    exact = near = recited = 0
    if windows or any(len(ids) >= rules.passage_tokens for ids in docs):
        model = loader() if loader is not None else load_released_model(model_dir, weights)
        vocab = int(model.get_input_embeddings().num_embeddings)
        if any(len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0) for ids in docs):
            raise InvalidInput("the tokenizer's ids do not fit the model's vocabulary")
        for is_exact, is_near in _reproduced(model, windows, ratio=rules.near_verbatim_ratio):
            exact += is_exact
            near += is_near and not is_exact
        base = _load_base(model_dir)
        base.eval()
        recited = scan_passages(model, base, docs, rules=rules)
    return MemorizationFigures(
        samples=len(windows),
        exact=exact,
        near_verbatim=near,
        prefix_tokens=rules.prefix_tokens,
        suffix_tokens=rules.suffix_tokens,
        passage_tokens=rules.passage_tokens,
        passages_recited=recited,
    )
