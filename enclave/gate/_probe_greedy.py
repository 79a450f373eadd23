"""Greedy confirmation: does the model continue a prompt with the true tokens?

Both ways of the memorization probe end here: the sampled windows and the spans the
whole-data scan flagged are each a prompt and a truth; the model continues every prompt
greedily (a plain argmax loop over its key-value cache, prompts of one shape batched), and a
continuation counts as reproduced when it is exact or within the rule's normalised token edit
distance (:func:`policies.release.is_reproduced`). Decoding stops early once no continuation of
a batch can still come that close.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from policies.release import is_reproduced

BATCH = 64
"""Greedy continuations decoded together (one step of each is one forward call)."""


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
