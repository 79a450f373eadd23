"""Create small Hugging Face-format causal language models locally, with nothing downloaded.

A byte-level BPE tokenizer is trained on the texts given, a Llama-style config of a named size is
random-initialised from a fixed seed, and both are written with ``save_pretrained`` so that
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load the directory as they would a
hub model. These are the demo's and the tests' base models; a site registers real ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from trainers.weights import tensor_layout

__all__ = ["SIZES", "ModelSize", "create_base_model", "tensor_layout"]

SPECIAL_TOKEN = "<|endoftext|>"  # noqa: S105 - a vocabulary entry, not a secret


@dataclass(frozen=True)
class ModelSize:
    """The shape of a generated model."""

    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    context: int


SIZES: Mapping[str, ModelSize] = {
    # ~0.1 M parameters: a 30-step fine-tune takes seconds on two CPU cores.
    "tiny": ModelSize(
        vocab_size=512, hidden_size=64, layers=2, heads=4, intermediate_size=192, context=128
    ),
    # ~1 M parameters: still CPU-sized, large enough for a visible learning curve.
    "small": ModelSize(
        vocab_size=1024, hidden_size=128, layers=4, heads=4, intermediate_size=384, context=256
    ),
}


def create_base_model(
    dest: Path, *, texts: Iterable[str], seed: int = 0, size: str = "tiny"
) -> Path:
    """Write a random-initialised causal LM and its tokenizer to ``dest`` and return ``dest``.

    ``dest`` must not exist or be empty; the files written are world-readable (0644). The same
    ``texts``, ``seed`` and ``size`` give the same weights. Raises ``ValueError`` for an unknown
    size, no texts, or a non-empty ``dest``.
    """
    if size not in SIZES:
        raise ValueError(f"size: unknown model size {size!r}; known: {', '.join(sorted(SIZES))}")
    shape = SIZES[size]
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("texts: no non-empty text to train the tokenizer on")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"dest: {dest} exists and is not an empty directory")

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus,
        vocab_size=shape.vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe._tokenizer,  # the wrapped `tokenizers.Tokenizer`
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=shape.context,
    )
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    assert isinstance(special_id, int)  # one token in, one id out
    config = LlamaConfig(
        # A small corpus may yield fewer merges than asked; size the embedding to what exists.
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=True,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    # safetensors writes 0600; the job reads the model as its own unprivileged user.
    for path in dest.iterdir():
        path.chmod(0o644)
    return dest
