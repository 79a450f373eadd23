"""The extractable-memorization probe: does the released model recite the protected data?

Two ways, over the same tokenised texts (read once):

- Sampled, here, following Carlini et al. ("Quantifying Memorization Across Neural Language
  Models", 2023): K windows of ``prefix + suffix`` tokens (seeded, so the figure is
  reproducible), the released model prompted with each prefix, the suffix's length decoded
  greedily and compared with the true suffix.
- Whole data (:mod:`._probe_scan`): every token of every text scored under the released model
  and under the site's base model; spans the release knows far better than the base are
  confirmed by greedy generation from the tokens before them in their text.

Both confirm by greedy decoding (:mod:`._probe_greedy`): a continuation counts as reproduced
when it is exact or within the rule's normalised token edit distance. Only counts leave this
module; the texts and the generations never do. What the scan cannot find is a passage recited
only after a prompt that does not occur in the data (a trigger): see ``docs/memorization.md``.
The model is what the release is, loaded over the site's trusted base model
(:mod:`._probe_load`); a release that cannot be loaded so raises :class:`NotProbeable`, and the
gate refuses it. :func:`measure_memorization` runs both ways and returns the counts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from enclave.gate._probe_greedy import BATCH, _greedy, _reproduced
from enclave.gate._probe_load import (
    CONFIG_FILES,
    LM_HEAD_PREFIX,
    NotProbeable,
    _load_base,
    load_adapter_release,
    load_backbone_release,
    load_released_model,
)
from enclave.gate._probe_scan import (
    LOGIT_BUDGET,
    MAX_BLOCK,
    _candidates,
    _Scored,
    context_of,
    flag_spans,
    scan_passages,
    score_texts,
)
from policies.errors import InvalidInput
from policies.release import MemorizationFigures, MemorizationRules

__all__ = [
    "BATCH",
    "CONFIG_FILES",
    "LM_HEAD_PREFIX",
    "LOGIT_BUDGET",
    "MAX_BLOCK",
    "NotProbeable",
    "Tokenizer",
    "_Scored",
    "_candidates",
    "_greedy",
    "_load_base",
    "_reproduced",
    "context_of",
    "flag_spans",
    "load_adapter_release",
    "load_backbone_release",
    "load_released_model",
    "measure_memorization",
    "sample_windows",
    "scan_passages",
    "score_texts",
]


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
