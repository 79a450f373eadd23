"""The ``classification`` trainer: labelled JSONL/CSV parsing, the site's torch-free release
layout and config against a real ``AutoModelForSequenceClassification``, a run through the
harness, and a release that passes the gate (the backbone probed for memorization), verifies
and classifies when loaded with ``from_pretrained``.

Tiny model: the trained run (30 steps) takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from enclave.gate import MemorizationInputs, ReleaseForm, ReleaseKind, run_gate
from enclave.provenance import SiteSigner, sign_release, verify_release
from policies.errors import IntegrityError
from policies.release import CheckName, MemorizationRules
from tests.unit._release_support import key_pem, make_ca, make_site_cert, rules, tiny_llama
from tests.unit._trainer_support import make_inputs, mount, run_harness
from tests.unit.test_provenance import _context
from trainers import contract, labelled, synthetic
from trainers.errors import DataError
from trainers.hparams import ClassificationHyperparameters
from trainers.release import expected_release
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"max_steps": 30, "batch_size": 8, "learning_rate": 0.003, "seed": 1}
METRICS = frozenset({"accuracy", "eval_loss", "train_loss", "steps"})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(
        tmp_path_factory.mktemp("inputs"), books=None, labelled="books", labelled_count=120
    )


@pytest.fixture(scope="module")
def trained(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = mount(tmp_path_factory.mktemp("run") / "root", template)
    rc, err = run_harness(root, FAST, trainer="classification")
    assert rc == contract.EXIT_OK, err
    return root


def _dataset_files(top: Path) -> list[tuple[str, bytes]]:
    return [
        (p.relative_to(top).as_posix(), p.read_bytes())
        for p in sorted(top.rglob("*"))
        if p.is_file()
    ]


# --- labelled files -------------------------------------------------------------------------


def test_jsonl_and_csv_give_the_same_examples() -> None:
    jsonl = b'{"text": "a b", "label": "pos"}\n\n{"text": "c, \\"d\\"", "label": 3}\n'
    csv = b'label,text\npos,a b\n3,"c, ""d"""\n'
    assert (
        labelled.parse_file("x.jsonl", jsonl)
        == labelled.parse_file("x.csv", csv)
        == [("a b", "pos"), ('c, "d"', "3")]
    )


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        (
            "a.jsonl",
            b'{"text": "secret words", "label": "x"}\n{"text": "secret"}\n',
            "a.jsonl line 2: expected an object",
        ),
        ("a.jsonl", b'{"text": "", "label": "x"}\n', "a.jsonl line 1: text must be"),
        ("a.jsonl", b'{"text": "secret", "label": true}\n', "a.jsonl line 1: label must be"),
        ("a.jsonl", b"not json secret\n", "a.jsonl line 1: not a JSON object"),
        ("a.csv", b"words,label\nsecret,x\n", "a.csv: the header must have"),
        ("a.csv", b"\xff\xfe", "a.csv: not UTF-8"),
    ],
)
def test_bad_files_are_named_and_their_content_is_not(name: str, data: bytes, words: str) -> None:
    with pytest.raises(DataError) as info:
        labelled.parse_file(name, data)
    assert str(info.value).startswith(words)
    assert "secret" not in str(info.value)


def test_labels_are_discovered_sorted_numerically_or_by_code_point() -> None:
    assert labelled.discover_labels([("t", "10"), ("t", "9"), ("t", "-1")]) == ("-1", "9", "10")
    assert labelled.discover_labels([("t", "b"), ("t", "B"), ("t", "10"), ("t", "9")]) == (
        "10",
        "9",
        "B",
        "b",
    )


def test_given_labels_must_cover_the_data_and_are_not_echoed() -> None:
    hp = ClassificationHyperparameters.parse({"labels": "neg,pos"})
    assert labelled.resolve_labels(hp, [("t", "pos"), ("t", "neg")]) == ("neg", "pos")
    with pytest.raises(DataError, match=r"^2 example\(s\) have a label") as info:
        labelled.resolve_labels(hp, [("t", "pos"), ("t", "Jane Doe"), ("t", "Jane Doe")])
    assert "Jane" not in str(info.value)
    with pytest.raises(DataError, match="1 distinct labels"):
        labelled.resolve_labels(ClassificationHyperparameters(), [("t", "x"), ("u", "x")])


def test_hidden_and_other_files_are_not_examples() -> None:
    assert labelled.labelled_file("a/b.jsonl") and labelled.labelled_file("c.csv")
    assert not labelled.labelled_file(".a.jsonl")
    assert not labelled.labelled_file(".git/b.csv")
    assert not labelled.labelled_file("notes.txt")


# --- the release the site expects -----------------------------------------------------------


def test_the_site_layout_and_config_are_a_real_classifiers(template: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base_dir = template / "model" / "base"
    raw = labelled.release_config(base_dir, ["a", "b", "c"])
    net = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**raw))
    state = net.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values())
    assert labelled.released_layout(base_dir, 3) == {
        n: ("F32", tuple(t.shape)) for n, t in state.items()
    }
    assert net.config.id2label == {0: "a", 1: "b", 2: "c"} and net.config.num_labels == 3
    assert net.config.pad_token_id is not None


def test_a_run_writes_the_expected_layout_and_the_metrics(trained: Path) -> None:
    out = trained / "output"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["metrics.json", "metrics.jsonl", "weights/model.safetensors"]
    files = lambda: _dataset_files(trained / "data" / "books")  # noqa: E731
    expected = expected_release(
        "classification", FAST, model_dir=trained / "model" / "base", dataset_files=files
    )
    assert tensor_layout(out / "weights" / "model.safetensors") == expected.layout
    assert expected.layout["score.weight"] == ("F32", (3, 64))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["steps"] == FAST["max_steps"]
    # Three easy classes: the tiny model learns them in 30 steps.
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["eval_loss"] < math.log(3)


def test_csv_with_given_labels_and_seeded_reproducibility(template: Path, tmp_path: Path) -> None:
    rows = labelled.parse_file(
        "x.jsonl", (template / "data" / "books" / "examples.jsonl").read_bytes()
    )
    for name in ("one", "two"):
        root = tmp_path / name
        (root / "data" / "books").mkdir(parents=True)
        (root / "model").symlink_to(template / "model")
        with (root / "data" / "books" / "ex.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows[:40])
        hp = {**FAST, "max_steps": 3, "labels": "weather,speech,errand"}
        rc, err = run_harness(root, hp, trainer="classification")
        assert rc == contract.EXIT_OK, err
    first, second = (
        tmp_path / n / "output" / "weights" / "model.safetensors" for n in ("one", "two")
    )
    assert first.read_bytes() == second.read_bytes()
    config = json.loads(
        expected_release("classification", hp, model_dir=template / "model" / "base").config or b""
    )
    assert config["id2label"] == {"0": "weather", "1": "speech", "2": "errand"}


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"labels": "a,a"}, "hyperparameters.labels"),
        ({"labels": "only"}, "hyperparameters.labels"),
        ({"labels": "a,,b"}, "hyperparameters.labels"),
        ({"max_length": 2}, "hyperparameters.max_length"),
        ({"max_length": 100_000}, "hyperparameters.max_length"),  # beyond the model's context
        ({"block_size": 64}, "hyperparameters.block_size"),  # a causal-LM field
    ],
)
def test_bad_classification_hyperparameters_name_the_field(
    template: Path, tmp_path: Path, hyperparameters: dict[str, Any], field: str
) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, hyperparameters, trainer="classification")
    assert rc == contract.EXIT_BAD_CONFIG
    assert err.startswith(f"sealroom-harness: bad config: {field}: "), err


def test_data_outside_the_given_labels_fails_without_showing_it(
    template: Path, tmp_path: Path
) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, {**FAST, "labels": "weather,speech"}, trainer="classification")
    assert rc == contract.EXIT_TRAINING_FAILED
    assert "40 example(s) have a label that hyperparameters.labels does not list" in err
    assert "errand" not in err


# --- the release ------------------------------------------------------------------------------


def test_the_release_passes_the_gate_verifies_and_classifies(trained: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_dir = trained / "model" / "base"
    data_dir = trained / "data" / "books"
    expected = expected_release(
        "classification", FAST, model_dir=base_dir, dataset_files=lambda: _dataset_files(data_dir)
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    gate = run_gate(
        trained / "output",
        rules=rules(
            checks=frozenset({*rules().checks, CheckName.MEMORIZATION}),
            memorization=MemorizationRules(
                samples=4, prefix_tokens=4, suffix_tokens=4, max_rate=0.5
            ),
            allowed_metrics=METRICS,
        ),
        base_layout=tensor_layout(base_dir),
        form=ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config),
        dest_dir=tmp_path / "release",
        memorization=MemorizationInputs(
            model_dir=base_dir,
            tokenizer=tokenizer,
            texts=[(data_dir / "examples.jsonl").read_text()],
        ),
    )
    gate.require_passed()
    memo = next(c for c in gate.checks if c.name is CheckName.MEMORIZATION)
    assert memo.figures["samples"] == 4
    assert sorted(a.path for a in gate.artifacts) == [
        "metrics.json",
        "weights/config.json",
        "weights/model.safetensors",
    ]

    ca_pem, ca_key = make_ca()
    cert, key = make_site_cert(ca_pem, ca_key, site="site-a")
    signed = sign_release(
        {"clinical-notes": gate},
        context=_context(),
        signer=SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key)),
    )
    verify_release(signed.directory, ca_cert_pem=ca_pem)
    # The config is covered by the signature like the weights.
    (signed.directory / "weights" / "config.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"weights/config\.json"):
        verify_release(signed.directory, ca_cert_pem=ca_pem)
    (signed.directory / "weights" / "config.json").write_bytes(expected.config or b"")

    model: Any = AutoModelForSequenceClassification.from_pretrained(
        signed.directory / "weights", local_files_only=True, use_safetensors=True
    )
    model.eval()
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    fresh = synthetic.labelled_examples(count=30, seed=99)
    classes = sorted(synthetic.LABELS)
    batch = tokenizer(
        [t for t, _ in fresh], return_tensors="pt", padding=True, add_special_tokens=False
    )
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=-1).tolist()
    right = sum(classes[p] == label for p, (_, label) in zip(predicted, fresh, strict=True))
    assert right / len(fresh) >= 0.9


def test_a_classifier_the_probe_cannot_load_is_refused(trained: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base_dir = trained / "model" / "base"
    # A probe pointed at another architecture than the classifier's backbone (its MLP is
    # narrower) cannot lay the release over it: the release is refused, not probed halfway.
    other = tmp_path / "other"
    tiny_llama(other, vocab=json.loads((base_dir / "config.json").read_text())["vocab_size"])
    expected = expected_release(
        "classification",
        FAST,
        model_dir=base_dir,
        dataset_files=lambda: _dataset_files(trained / "data" / "books"),
    )
    gate = run_gate(
        trained / "output",
        rules=rules(
            checks=frozenset({*rules().checks, CheckName.MEMORIZATION}),
            memorization=MemorizationRules(samples=2, prefix_tokens=4, suffix_tokens=4),
            allowed_metrics=METRICS,
        ),
        base_layout=tensor_layout(base_dir),
        form=ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config),
        dest_dir=tmp_path / "release",
        memorization=MemorizationInputs(
            model_dir=other,
            tokenizer=AutoTokenizer.from_pretrained(base_dir),
            texts=["the harbour at dawn, said Ada to the miller"],
        ),
    )
    assert not gate.passed
    memo = next(c for c in gate.checks if c.name is CheckName.MEMORIZATION)
    assert memo.reasons and memo.reasons[0].startswith("cannot be probed:")
    assert not (tmp_path / "release").exists()
