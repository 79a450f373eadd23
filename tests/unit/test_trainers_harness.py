"""The harness end to end on the host: the built-in causal-LM trainer run through
``trainers.harness.main`` under a temporary root, as the container would run it.

Tiny model, a few steps: each training run takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.unit._trainer_support import FAST, digests, mount, run_harness
from trainers import contract
from trainers.basemodel import tensor_layout
from trainers.harness import TRAINERS, main
from trainers.runtime import ROOT_ENV


@pytest.fixture(scope="module")
def trained(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = mount(tmp_path_factory.mktemp("run") / "root", template)
    before = digests(template)
    rc, err = run_harness(root)
    assert rc == contract.EXIT_OK, err
    assert digests(template) == before, "the run wrote into its read-only inputs"
    return root


def test_registry_has_the_causal_lm_trainer() -> None:
    assert "causal-lm" in TRAINERS


def test_run_writes_only_the_release_candidates_and_progress(trained: Path) -> None:
    out = trained / "output"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["metrics.json", "metrics.jsonl", "weights/model.safetensors"]
    # Scratch is cleaned up, and nothing else appeared under the root.
    assert list((trained / "tmp").iterdir()) == []
    assert sorted(p.name for p in trained.iterdir()) == ["data", "model", "output", "tmp"]


def test_weights_have_exactly_the_base_layout(trained: Path) -> None:
    released = tensor_layout(trained / "output" / "weights" / "model.safetensors")
    assert released == tensor_layout(trained / "model" / "base")


def test_weights_changed_from_the_base(trained: Path) -> None:
    new = load_file(str(trained / "output" / "weights" / "model.safetensors"))
    old = load_file(str(trained / "model" / "base" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in new.values())
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert "model.embed_tokens.weight" in changed
    assert len(changed) == len(old), "a full fine-tune updates every stored tensor"


def test_metrics_are_flat_finite_numbers(trained: Path) -> None:
    metrics = json.loads((trained / "output" / "metrics.json").read_text())
    assert set(metrics) == {"train_loss", "eval_loss", "perplexity", "steps", "tokens_seen"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["steps"] == FAST["max_steps"]
    assert metrics["tokens_seen"] == FAST["max_steps"] * FAST["batch_size"] * FAST["block_size"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # A random-init model scores about ln(vocab); a few steps must not make it worse than that.
    vocab = AutoTokenizer.from_pretrained(trained / "model" / "base").__len__()
    assert 0 < metrics["eval_loss"] < math.log(vocab) + 0.5


def test_progress_lines_one_per_step(trained: Path) -> None:
    lines = (trained / "output" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["total"] == 4 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["tokens_seen"] == 4 * 4 * 32


def test_released_weights_load_into_the_base_config_and_generate(
    trained: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "released"
    shutil.copytree(trained / "model" / "base", model_dir)
    weights = trained / "output" / "weights" / "model.safetensors"
    shutil.copyfile(weights, model_dir / "model.safetensors")
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    released = load_file(str(weights))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in released.items())
    # The tied head follows the trained embedding.
    assert torch.equal(state["lm_head.weight"], released["model.embed_tokens.weight"])
    ids = tokenizer("Chapter 1\n\nThe", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_same_seed_same_weights_other_seed_other_weights(
    trained: Path, template: Path, tmp_path: Path
) -> None:
    first = (trained / "output" / "weights" / "model.safetensors").read_bytes()
    again = mount(tmp_path / "again", template)
    assert run_harness(again)[0] == contract.EXIT_OK
    assert (again / "output" / "weights" / "model.safetensors").read_bytes() == first
    assert (again / "output" / "metrics.json").read_bytes() == (
        trained / "output" / "metrics.json"
    ).read_bytes()
    other = mount(tmp_path / "other", template)
    assert run_harness(other, {**FAST, "seed": 4})[0] == contract.EXIT_OK
    assert (other / "output" / "weights" / "model.safetensors").read_bytes() != first


def test_nothing_is_written_to_the_working_directory(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = mount(tmp_path / "root", template)
    assert run_harness(root, {**FAST, "max_steps": 1})[0] == contract.EXIT_OK
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"learning_rate": -0.001}, "hyperparameters.learning_rate"),
        ({"learning_rate": "fast"}, "hyperparameters.learning_rate"),
        ({"max_steps": 5, "dropout": 0.1}, "hyperparameters.dropout"),
        ({"batch_size": 2.5}, "hyperparameters.batch_size"),
        ({"block_size": 4096}, "hyperparameters.block_size"),  # beyond the model's context
    ],
)
def test_bad_hyperparameters_exit_bad_config_naming_the_field(
    template: Path, tmp_path: Path, hyperparameters: dict[str, Any], field: str
) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, hyperparameters)
    assert rc == contract.EXIT_BAD_CONFIG
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sealroom-harness: bad config: {field}: ")
    assert not (root / "output" / "metrics.json").exists()
    assert not (root / "output" / "weights" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"trainer": "rm-rf"}, "trainer"),
        ({"entrypoint": "evil:Trainer"}, "entrypoint"),
        ({"datasets": ()}, "datasets"),
        ({"datasets": ("books", "books")}, "datasets"),
        ({"datasets": ("missing",)}, "datasets[0]"),
        ({"datasets": ("books", "../model")}, "datasets[1]"),
        ({"datasets": ("..",)}, "datasets[0]"),
        ({"datasets": ("/etc",)}, "datasets[0]"),
    ],
)
def test_bad_job_fields_exit_bad_config_naming_the_field(
    template: Path, tmp_path: Path, job: dict[str, Any], field: str
) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, **job)
    assert rc == contract.EXIT_BAD_CONFIG
    assert err.startswith(f"sealroom-harness: bad config: {field}: "), err
    assert err.count("\n") == 1


def test_missing_base_model_is_bad_config(template: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "data").symlink_to(template / "data")
    rc, err = run_harness(root)
    assert rc == contract.EXIT_BAD_CONFIG
    assert "bad config: model: " in err


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "SEALROOM_JOB: is not set"),
        ("{not json", "SEALROOM_JOB: "),
        ("[1, 2]", "must be a JSON object"),
        ('{"trainer": "causal-lm"}', "missing 'job_id'"),
    ],
)
def test_unreadable_job_environment_is_bad_config(
    tmp_path: Path, value: str | None, words: str
) -> None:
    env = {ROOT_ENV: str(tmp_path)}
    if value is not None:
        env[contract.JOB_ENV] = value
    err = io.StringIO()
    assert main(env, stderr=err) == contract.EXIT_BAD_CONFIG
    assert words in err.getvalue()
    assert err.getvalue().count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def odd_data(template: Path, tmp_path: Path) -> Iterator[Path]:
    """A root whose data directory the test fills itself."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "model").symlink_to(template / "model")
    yield root


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"a.txt": "Too short."}, "DataError: the datasets yield"),
        ({"notes.md": "Chapter 1\n" * 400, ".hidden.txt": "x " * 4000}, "DataError: no .txt files"),
        ({"bad.txt": b"\xff\xfe not utf-8" * 200}, "DataError: bad.txt: not UTF-8"),
    ],
)
def test_unusable_data_exits_training_failed(
    odd_data: Path, files: dict[str, str | bytes], words: str
) -> None:
    books = odd_data / "data" / "books"
    books.mkdir()
    for name, content in files.items():
        path = books / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    rc, err = run_harness(odd_data)
    assert rc == contract.EXIT_TRAINING_FAILED
    assert words in err
    assert not (odd_data / "output" / "metrics.json").exists()


def test_a_bad_config_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    # The host imports the package to validate specs, and a bad job must fail fast: neither
    # may pull in torch.
    code = (
        "import sys, io, trainers.harness as h\n"
        "err = io.StringIO()\n"
        'rc = h.main({\'SEALROOM_JOB\': \'{"job_id": "j", "trainer": "causal-lm", '
        '"datasets": ["b"], "hyperparameters": {"learning_rate": -1}}\', '
        f"'SEALROOM_ROOT': {str(tmp_path)!r}}}, stderr=err)\n"
        "assert rc == 2, (rc, err.getvalue())\n"
        "assert 'hyperparameters.learning_rate' in err.getvalue()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_progress_every_n_steps_and_at_the_last(template: Path, tmp_path: Path) -> None:
    root = mount(tmp_path / "root", template)
    assert run_harness(root, {**FAST, "max_steps": 7, "log_every": 3})[0] == contract.EXIT_OK
    lines = (root / "output" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6, 7]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_uses_bf16_mixed_and_keeps_the_fp32_layout(template: Path, tmp_path: Path) -> None:
    from trainers.causal_lm import _precision

    if torch.cuda.is_bf16_supported():
        assert _precision("auto") == "bf16-mixed"
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, {**FAST, "max_steps": 10})
    assert rc == contract.EXIT_OK, err
    released = tensor_layout(root / "output" / "weights" / "model.safetensors")
    assert released == tensor_layout(root / "model" / "base")
    assert {dtype for dtype, _ in released.values()} == {"F32"}
    metrics = json.loads((root / "output" / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values())
