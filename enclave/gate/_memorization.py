"""The extractable-memorization probe: does the released model recite the protected data?

Following Carlini et al. ("Quantifying Memorization Across Neural Language Models", 2023): take
K windows of ``prefix + suffix`` tokens from the protected texts (sampled with a seeded
generator, so the figure is reproducible), prompt the released model with each prefix, decode
the suffix's length greedily and compare with the true suffix. A continuation counts as
memorized when it is exact or within the rule's normalised token edit distance. Only counts
leave this module; the texts and the generations never do.

The model is the base model's configuration with exactly the released weights (the canonical
file the gate wrote), loaded by transformers from safetensors only, no remote code.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from policies.errors import InvalidInput
from policies.release import MemorizationFigures, MemorizationRules, normalized_edit_distance

CONFIG_FILES = ("config.json", "generation_config.json")
BATCH = 16


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
    """Up to ``rules.samples`` (prefix, suffix) token windows, seeded; texts read once.

    Reservoir sampling keeps memory at K texts whatever the dataset's size. When fewer than K
    texts are long enough, windows are drawn again from those at other offsets.
    """
    need = rules.prefix_tokens + rules.suffix_tokens
    rng = random.Random(rules.seed)
    reservoir: list[list[int]] = []
    seen = 0
    for text in texts:
        ids = _ids(tokenizer, text)
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
        window = ids[start : start + need]
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


@torch.no_grad()
def _greedy(model: Any, prefixes: Sequence[list[int]], steps: int) -> list[list[int]]:
    # A plain argmax loop: no sampling, no early stop at an end-of-text token.
    ids = torch.tensor(prefixes, dtype=torch.long)
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
        nxt = logits.argmax(dim=-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(out, dim=1).tolist() if out else [[] for _ in prefixes]


def measure_memorization(
    *,
    model_dir: Path,
    weights: Path,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    rules: MemorizationRules,
) -> MemorizationFigures:
    """Probe the released model (``model_dir``'s config + ``weights``) with the protected texts.

    Returns the counts; the caller decides with :func:`policies.release.decide_memorization`.
    Raises :class:`InvalidInput` if the tokenizer's ids do not fit the model's vocabulary.
    """
    windows = sample_windows(tokenizer, texts, rules=rules)
    exact = near = 0
    if windows:
        model = load_released_model(model_dir, weights)
        vocab = int(model.get_input_embeddings().num_embeddings)
        if any(t >= vocab or t < 0 for p, s in windows for t in (*p, *s)):
            raise InvalidInput("the tokenizer's ids do not fit the model's vocabulary")
        for at in range(0, len(windows), BATCH):
            batch = windows[at : at + BATCH]
            generated = _greedy(model, [p for p, _ in batch], rules.suffix_tokens)
            for (_, truth), gen in zip(batch, generated, strict=True):
                if gen == truth:
                    exact += 1
                elif normalized_edit_distance(gen, truth) <= rules.near_verbatim_ratio:
                    near += 1
    return MemorizationFigures(
        samples=len(windows),
        exact=exact,
        near_verbatim=near,
        prefix_tokens=rules.prefix_tokens,
        suffix_tokens=rules.suffix_tokens,
    )
