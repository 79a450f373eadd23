"""The whole-data scan of the memorization probe: every span of the data, not a sample.

Every token of every text is scored under the released model and under the site's base model,
in batched forward passes over overlapping blocks of the model's context (each token predicted
with at least a quarter of a context of its own text before it, where the text has it). Every
span of ``passage_tokens`` tokens gets its mean loss and top-1 rate under both models, with
cumulative sums rather than a loop; spans the release knows far better than the base
(:class:`policies.release.ScanThresholds`) are confirmed by greedy generation from the tokens
before them in their text (:mod:`._probe_greedy`). So a passage the job made the model recite
is found wherever it sits in the data, not only where a sample happened to fall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from enclave.gate._probe_greedy import _reproduced
from policies.errors import InvalidInput
from policies.release import SCAN, MemorizationRules, ScanThresholds

MAX_BLOCK = 1024
"""The scan's block: the model's context, at most this many tokens."""
LOGIT_BUDGET = 1 << 24
"""Logit values (floats) one scan batch may hold: 64 MiB."""
CHUNK_TOKENS = 1 << 20
"""Tokens of text the scan scores before it keeps only its best candidates."""


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
