"""The ``causal-lm-lora`` trainer: the site's torch-free view of the adapter (layout and
``adapter_config.json``) against what PEFT really builds, a fast run through the harness, and a
release that goes through the gate (memorization probe included), verifies, and loads with
``PeftModel.from_pretrained`` over the base to generate.

Tiny model, a few steps: each run takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from enclave.gate import MemorizationInputs, ReleaseForm, ReleaseKind, run_gate
from enclave.provenance import SiteSigner, sign_release, verify_release
from policies.release import CheckName, MemorizationRules
from tests.unit._release_support import key_pem, make_ca, make_site_cert, rules
from tests.unit._trainer_support import digests, mount, run_harness
from tests.unit.test_provenance import _context
from trainers import contract, lora
from trainers.errors import ConfigError
from trainers.hparams import LoRAHyperparameters
from trainers.release import expected_release
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {
    "max_steps": 4,
    "batch_size": 4,
    "block_size": 32,
    "seed": 3,
    "lora_r": 4,
    "learning_rate": 0.01,
}


@pytest.fixture(scope="module")
def trained(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = mount(tmp_path_factory.mktemp("run") / "root", template)
    before = digests(template)
    rc, err = run_harness(root, FAST, trainer="causal-lm-lora")
    assert rc == contract.EXIT_OK, err
    assert digests(template) == before, "the run wrote into its read-only inputs"
    return root


def _peft_state(base_dir: Path, hp: LoRAHyperparameters) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model = get_peft_model(net, LoraConfig(**lora.adapter_config(hp)))
    return dict(get_peft_model_state_dict(model))


@pytest.mark.parametrize(
    "raw",
    [
        {"lora_r": 4},
        {"lora_r": 2, "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
        {"lora_r": 16, "target_modules": "down_proj"},
    ],
)
def test_the_site_layout_is_what_peft_builds(template: Path, raw: dict[str, Any]) -> None:
    hp = LoRAHyperparameters.parse(raw)
    expected = lora.adapter_layout(template / "model" / "base", hp)
    state = _peft_state(template / "model" / "base", hp)
    assert expected == {n: ("F32", tuple(t.shape)) for n, t in state.items()}
    assert all(t.dtype == torch.float32 for t in state.values())


def test_the_site_config_is_the_trained_adapters_config(template: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftConfig

    hp = LoRAHyperparameters.parse(
        {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "v_proj,q_proj"}
    )
    (tmp_path / lora.ADAPTER_CONFIG).write_bytes(lora.adapter_config_bytes(hp))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LoraConfig)
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (4, 8.0, 0.1)
    assert set(loaded.target_modules) == {"q_proj", "v_proj"}
    assert loaded.base_model_name_or_path is None and loaded.inference_mode
    # Canonical bytes: the same hyperparameters always give the same file.
    assert lora.adapter_config_bytes(hp) == lora.adapter_config_bytes(
        LoRAHyperparameters.parse(
            {"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "target_modules": "q_proj,v_proj"}
        )
    )


def test_a_base_model_lora_cannot_target_is_refused(tmp_path: Path, template: Path) -> None:
    shutil.copytree(template / "model" / "base", tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError) as info:
        lora.adapter_layout(tmp_path / "gpt", LoRAHyperparameters())
    assert info.value.field == "model"


def test_a_run_writes_only_the_adapter(trained: Path) -> None:
    out = trained / "output"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["metrics.json", "metrics.jsonl", "weights/model.safetensors"]
    hp = LoRAHyperparameters.parse(FAST)
    layout = tensor_layout(out / "weights" / "model.safetensors")
    assert layout == lora.adapter_layout(trained / "model" / "base", hp)
    assert all(n.startswith("base_model.model.") and ".lora_" in n for n in layout)
    adapter = load_file(str(out / "weights" / "model.safetensors"))
    # LoRA starts B at zero: a trained adapter has moved it.
    assert any(bool(t.abs().sum() > 0) for n, t in adapter.items() if ".lora_B." in n)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train_loss", "eval_loss", "perplexity", "steps", "tokens_seen"}
    assert metrics["steps"] == FAST["max_steps"]
    assert all(math.isfinite(v) for v in metrics.values())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]


def test_same_seed_same_adapter(trained: Path, template: Path, tmp_path: Path) -> None:
    again = mount(tmp_path / "again", template)
    assert run_harness(again, FAST, trainer="causal-lm-lora")[0] == contract.EXIT_OK
    first = (trained / "output" / "weights" / "model.safetensors").read_bytes()
    assert (again / "output" / "weights" / "model.safetensors").read_bytes() == first


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"lora_r": 0}, "hyperparameters.lora_r"),
        ({"lora_alpha": 0}, "hyperparameters.lora_alpha"),
        ({"lora_dropout": 1.0}, "hyperparameters.lora_dropout"),
        ({"target_modules": "embed_tokens"}, "hyperparameters.target_modules"),
        ({"target_modules": "q_proj,q_proj"}, "hyperparameters.target_modules"),
        ({"target_modules": ""}, "hyperparameters.target_modules"),
        ({"lora_rank": 4}, "hyperparameters.lora_rank"),
    ],
)
def test_bad_lora_hyperparameters_name_the_field(
    template: Path, tmp_path: Path, hyperparameters: dict[str, Any], field: str
) -> None:
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, hyperparameters, trainer="causal-lm-lora")
    assert rc == contract.EXIT_BAD_CONFIG
    assert err.startswith(f"sealroom-harness: bad config: {field}: "), err
    assert not (root / "output" / "weights" / "model.safetensors").exists()


def test_the_release_passes_the_gate_verifies_and_loads_in_peft(
    trained: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = trained / "model" / "base"
    expected = expected_release("causal-lm-lora", FAST, model_dir=base_dir)
    form = ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = [p.read_text() for p in sorted((trained / "data" / "books").glob("*.txt"))]
    probe = MemorizationRules(samples=4, prefix_tokens=8, suffix_tokens=8, max_rate=0.5)
    gate = run_gate(
        trained / "output",
        rules=rules(
            checks=frozenset({*rules().checks, CheckName.MEMORIZATION}),
            memorization=probe,
            allowed_metrics=frozenset(
                {"train_loss", "eval_loss", "perplexity", "steps", "tokens_seen"}
            ),
            adapter_only=True,
        ),
        base_layout=tensor_layout(base_dir),
        form=form,
        dest_dir=tmp_path / "release",
        memorization=MemorizationInputs(model_dir=base_dir, tokenizer=tokenizer, texts=texts),
    )
    gate.require_passed()
    memo = next(c for c in gate.checks if c.name is CheckName.MEMORIZATION)
    assert memo.figures["samples"] == 4
    assert sorted(a.path for a in gate.artifacts) == [
        "metrics.json",
        "weights/adapter_config.json",
        "weights/adapter_model.safetensors",
    ]
    # The released config is the site's bytes, whatever the job wrote.
    assert (tmp_path / "release" / "weights" / "adapter_config.json").read_bytes() == (
        expected.config
    )

    ca_pem, ca_key = make_ca()
    cert, key = make_site_cert(ca_pem, ca_key, site="site-a")
    signer = SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))
    signed = sign_release({"clinical-notes": gate}, context=_context(), signer=signer)
    verified = verify_release(signed.directory, ca_cert_pem=ca_pem)
    assert "weights/adapter_config.json" in {a.path for a in verified.manifest.artifacts}

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = tokenizer("Chapter 1\n\nThe", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        model: Any = PeftModel.from_pretrained(base, str(signed.directory / "weights"))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, base_logits), "the adapter did nothing"
    out = model.generate(
        **ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_the_site_computes_releases_without_torch(template: Path) -> None:
    # The agent computes every release form before it reads the job's output; that must not
    # need torch (nor load a weight).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from trainers.release import expected_release\n"
        f"base = Path({str(template / 'model' / 'base')!r})\n"
        "a = expected_release('causal-lm-lora', {'lora_r': 4}, model_dir=base)\n"
        "c = expected_release('classification', {'labels': 'a,b'}, model_dir=base)\n"
        "f = expected_release('causal-lm', {}, model_dir=base)\n"
        "assert a.config and c.config and f.config is None and a.layout and c.layout\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
