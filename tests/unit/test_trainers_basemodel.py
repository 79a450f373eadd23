"""Locally created base models load like hub models and are reproducible from their seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import synthetic
from trainers.basemodel import SIZES, create_base_model, tensor_layout

TEXTS = synthetic.corpus(documents=8, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_base_model(tmp_path_factory.mktemp("tiny") / "base", texts=TEXTS, seed=0)


def test_directory_has_the_hugging_face_files(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    # The job reads the model as an unprivileged user of its own.
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tiny.iterdir())


def test_loads_with_auto_classes_and_generates(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        tiny, local_files_only=True, use_safetensors=True
    )
    shape = SIZES["tiny"]
    assert model.config.num_hidden_layers == shape.layers
    assert model.config.hidden_size == shape.hidden_size
    assert model.config.max_position_embeddings == shape.context
    assert len(tokenizer) == model.config.vocab_size
    assert 256 < len(tokenizer) <= shape.vocab_size
    assert tokenizer.eos_token_id is not None
    text = "The miller walked to the harbour at dawn."
    ids = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == text, "byte-level BPE round-trips text"
    out = model.generate(
        **ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert out.shape == (1, ids["input_ids"].shape[1] + 4)


def test_layout_lists_what_save_pretrained_stored(tiny: Path) -> None:
    layout = tensor_layout(tiny)
    stored = load_file(str(tiny / "model.safetensors"))
    assert layout == {k: ("F32", tuple(v.shape)) for k, v in stored.items()}
    # Tied embeddings: the head is not stored, the embedding is.
    assert "model.embed_tokens.weight" in layout
    assert "lm_head.weight" not in layout


def test_same_seed_same_weights_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = create_base_model(tmp_path / "again", texts=TEXTS, seed=0)
    other = create_base_model(tmp_path / "other", texts=TEXTS, seed=1)
    base = (tiny / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == base
    assert (again / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    a, b = load_file(str(tiny / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_creation_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_base_model(tmp_path / "m", texts=TEXTS[:2], seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"size": "huge"}, "unknown model size"),
        ({"texts": []}, "no non-empty text"),
        ({"texts": ["", ""]}, "no non-empty text"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], words: str) -> None:
    args: dict[str, object] = {"texts": TEXTS[:2], **kwargs}
    with pytest.raises(ValueError, match=words):
        create_base_model(tmp_path / "m", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "m").exists()


def test_a_non_empty_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        create_base_model(tmp_path, texts=TEXTS[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
