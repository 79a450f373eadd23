"""ε comes from the site, never from the job (issue 13, item 6).

The attacks: a job that ran no DP-SGD writes ``epsilon: 5`` into its metrics and was charged 5,
so a later honest job was denied; a released ``epsilon: -1000`` (or NaN) turned the dataset's
spent budget negative and every later submission failed with InvalidInput, for every team; a
custom-code job on a DP policy. Here the gate charges only the site's accountant's ε
(:mod:`enclave._dp`, +inf where the site set no DP), the released ``epsilon`` metric is the
site's, and the gateway sums the ε recorded in the signed manifests, never job metrics. The
positive side: the site's ε for given DP-SGD parameters is Opacus' accountant's, and the noise
it calibrates meets the target.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from enclave import _dp
from enclave.contract import RunOrder, SiteReport
from enclave.gate import RELEASED_METRICS, DPInputs, layout_from_files, run_gate
from gateway.core import Gateway
from policies.errors import InvalidInput
from policies.lifecycle import JobState
from policies.release import CheckName, DPRules, decide_dp
from policies.spec import parse_spec
from tests.integration._deployment import policy
from tests.unit._release_support import job_output, rules, write_tensors
from tests.unit.test_gateway_core import OLIVIA, THEO, ScriptedSite, _gateway, _register, _wait
from trainers import privacy
from trainers.contract import DPParameters, JobConfig
from trainers.hparams import DPSettings

DP_RULES = rules(checks=frozenset({*rules().checks, CheckName.DP}), dp=DPRules(8.0, 10.0))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    write_tensors(
        path,
        {"embed.weight": torch.randn(16, 8), "norm.weight": torch.ones(8)},
        metadata={"format": "pt"},
    )
    return path


def _gate(tmp_path: Path, base: Path, metrics: dict[str, float], dp: DPInputs, name: str):  # type: ignore[no-untyped-def]
    out = job_output(tmp_path / name, base, metrics)
    return run_gate(
        out,
        rules=DP_RULES,
        base_layout=layout_from_files([base]),
        dest_dir=tmp_path / f"release-{name}",
        dp=dp,
    )


# --- the gate ---------------------------------------------------------------------------------


def test_a_job_claiming_epsilon_5_without_dp_is_charged_infinity_and_refused(
    tmp_path: Path, base: Path
) -> None:
    charged = _dp.charged_epsilon(None, delta=1e-5)  # the site set no DP-SGD for it
    assert charged == math.inf
    for name, dp in {"a": DPInputs(spent=0.0), "b": DPInputs(spent=0.0, epsilon=charged)}.items():
        result = _gate(tmp_path, base, {"loss": 1.0, "epsilon": 5.0}, dp, name)
        assert not result.passed
        verdict = result.checks[-1]
        assert verdict.name is CheckName.DP and not verdict.passed
        assert "unbounded" in verdict.reasons[0]
        assert "epsilon" not in verdict.figures  # nothing for the gateway to charge


@pytest.mark.parametrize("claimed", [-1000.0, 0.0, 1e-300])
def test_a_job_writing_a_small_or_negative_epsilon_is_charged_the_sites(
    tmp_path: Path, base: Path, claimed: float
) -> None:
    site = 2.5
    result = _gate(
        tmp_path, base, {"loss": 1.0, "epsilon": claimed}, DPInputs(0.0, epsilon=site), "j"
    )
    result.require_passed()
    assert result.checks[-1].figures["epsilon"] == site
    released = json.loads((tmp_path / "release-j" / RELEASED_METRICS).read_text())
    assert released["epsilon"] == site  # the site's value leaves, never the job's


def test_a_job_that_hides_its_epsilon_is_still_charged(tmp_path: Path, base: Path) -> None:
    result = _gate(tmp_path, base, {"loss": 1.0}, DPInputs(9.0, epsilon=2.0), "h")
    assert not result.passed
    assert "exceeds the budget" in result.checks[-1].reasons[0]


@pytest.mark.parametrize("spent", [-1000.0, math.nan])
def test_a_negative_or_nan_spent_budget_never_makes_room(spent: float) -> None:
    verdict = decide_dp(9.0, spent=spent, rules=DPRules(10.0, 10.0))
    assert verdict.passed is (not math.isnan(spent))  # -1000 counts as 0 spent: 9 <= 10
    assert not decide_dp(11.0, spent=spent, rules=DPRules(20.0, 10.0)).passed


@pytest.mark.parametrize("epsilon", [math.nan, -1.0, math.inf, None])
def test_a_non_finite_or_negative_site_epsilon_is_refused(epsilon: float | None) -> None:
    verdict = decide_dp(epsilon, spent=0.0, rules=DPRules(10.0, 100.0))
    assert not verdict.passed and "epsilon" not in verdict.figures


def test_the_charged_figure_is_rounded_up() -> None:
    eps = 1.23456749
    assert decide_dp(eps, spent=0.0, rules=DPRules(10.0, 100.0)).figures["epsilon"] >= eps


# --- the site's parameters ----------------------------------------------------------------------


def _spec(hyperparameters: str, trainer: str = "causal-lm") -> object:
    entry = 'entrypoint: "m:M"\n' if trainer == "custom" else ""
    return parse_spec(
        "name: t\ndatasets: [books]\nbase_model: tiny-lm\n"
        f"trainer: {trainer}\n{entry}purpose: testing\n"
        "resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}\n"
        f"hyperparameters: {hyperparameters}\n"
    )


def test_custom_code_and_a_trainer_without_dp_get_no_site_dp_and_are_charged_infinity() -> None:
    def never() -> int:
        raise AssertionError("a job without DP needs no count of the data")

    for spec in (_spec("{}", "custom"), _spec("{max_steps: 4}")):
        params = _dp.decide(spec, training_rows=never)  # type: ignore[arg-type]
        assert params is None
        assert _dp.charged_epsilon(params, delta=1e-5) == math.inf


def test_the_site_decides_dp_sgd_and_its_epsilon_is_opacus_and_within_the_target() -> None:
    from opacus.accountants import RDPAccountant

    spec = _spec("{max_steps: 40, batch_size: 8, dp_epsilon: 3.0, dp_delta: 1.0e-6}")
    params = _dp.decide(spec, training_rows=lambda: 200)  # type: ignore[arg-type]
    assert params is not None
    assert params.sample_rate == 8 / 200 and params.steps == 40 and params.delta == 1e-6
    assert params.max_grad_norm == 1.0 and params.noise_multiplier > 0
    accountant = RDPAccountant()
    accountant.history = [(params.noise_multiplier, params.sample_rate, params.steps)]
    expected = accountant.get_epsilon(delta=1e-6, alphas=privacy.RDP_ORDERS)
    charged = _dp.charged_epsilon(params, delta=1e-6)
    assert charged == pytest.approx(expected, rel=1e-12)
    assert 0.9 * 3.0 < charged <= 3.0
    # At a policy's smaller delta the same run costs more, and is charged so.
    assert _dp.charged_epsilon(params, delta=1e-9) > charged
    # The parameters travel to the container exactly.
    config = JobConfig(job_id="j", trainer="causal-lm", datasets=("books",), dp=params)
    assert JobConfig.from_json(config.to_json()).dp == params


def test_a_target_the_data_cannot_reach_is_refused_without_figures_of_the_data() -> None:
    spec = _spec("{max_steps: 1000, batch_size: 64, dp_epsilon: 0.01}")
    with pytest.raises(InvalidInput) as info:
        _dp.decide(spec, training_rows=lambda: 64)  # type: ignore[arg-type]
    assert "64" not in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        {
            "noise_multiplier": -1.0,
            "sample_rate": 0.1,
            "steps": 3,
            "max_grad_norm": 1,
            "delta": 1e-5,
        },
        {
            "noise_multiplier": 1.0,
            "sample_rate": math.nan,
            "steps": 3,
            "max_grad_norm": 1,
            "delta": 1e-5,
        },
        {
            "noise_multiplier": 1.0,
            "sample_rate": 2.0,
            "steps": 3,
            "max_grad_norm": 1,
            "delta": 1e-5,
        },
        {
            "noise_multiplier": 1.0,
            "sample_rate": 0.1,
            "steps": 0,
            "max_grad_norm": 1,
            "delta": 1e-5,
        },
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, "max_grad_norm": 1},
    ],
)
def test_dp_parameters_no_accountant_could_use_are_refused(raw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DPParameters.from_obj(raw)


def test_the_trainer_uses_the_sites_parameters_exactly() -> None:
    from trainers.training import PrivateTraining

    settings = DPSettings(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    site = DPParameters(
        noise_multiplier=1.7, sample_rate=0.125, steps=4, max_grad_norm=1.0, delta=1e-5
    )
    net = torch.nn.Linear(4, 2)
    private = PrivateTraining.attach(net, settings, rows=64, batch_size=999, steps=4, site=site)
    assert (private.noise_multiplier, private.sample_rate) == (1.7, 0.125)
    assert private.expected_batch_size == 8
    with pytest.raises(ValueError, match="do not match"):
        PrivateTraining.attach(net, settings, rows=64, batch_size=8, steps=5, site=site)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit._trainer_support import make_inputs

    return make_inputs(tmp_path_factory.mktemp("inputs"), labelled="labelled")


def _files(top: Path):  # type: ignore[no-untyped-def]
    return lambda: [
        (p.relative_to(top).as_posix(), p.read_bytes())
        for p in sorted(top.rglob("*"))
        if p.is_file()
    ]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("trainer", ["causal-lm", "classification", "private"])
def test_the_site_counts_the_training_samples_as_the_trainer_does(
    template: Path, trainer: str
) -> None:
    from transformers import AutoTokenizer

    from trainers import classification
    from trainers.causal_lm import TextBlockDataModule
    from trainers.runtime import RunContext, find_text_files

    model = template / "model" / "base"
    tokenizer = AutoTokenizer.from_pretrained(model)
    if trainer == "causal-lm":
        hp = {"block_size": 32, "eval_fraction": 0.2}
        data = TextBlockDataModule(
            find_text_files([template / "data" / "books"]),
            encode=lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]),
            separator_id=tokenizer.eos_token_id,
            block_size=32,
            batch_size=4,
            eval_fraction=0.2,
            seed=0,
        )
        data.setup("fit")
        assert data.train_blocks is not None
        expected = len(data.train_blocks)
        top = template / "data" / "books"
    elif trainer == "private":
        from trainers.private import token_blocks

        hp = {"dp_epsilon": 1.0, "block_size": 32}
        top = template / "data" / "books"
        ctx = RunContext("j", (top,), model, model, model, model)
        expected = int(token_blocks(ctx, 32).shape[0])
    else:
        hp = {"max_length": 16}
        ctx = RunContext("j", (template / "data" / "labelled",), model, model, model, model)
        rows = [
            e
            for e in classification.load_examples(ctx)
            if tokenizer(e[0], add_special_tokens=False, truncation=True, max_length=16)[
                "input_ids"
            ]
        ]
        expected = len(rows) - min(len(rows) - 1, max(1, round(len(rows) * 0.1)))
        top = template / "data" / "labelled"
    counted = privacy.training_rows(trainer, hp, model_dir=model, dataset_files=_files(top))
    assert counted == expected > 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning")
def test_a_dp_job_in_a_site_trains_with_the_sites_noise_and_rate(
    template: Path, tmp_path: Path
) -> None:
    from tests.unit._trainer_support import mount, run_harness
    from trainers import contract

    hp = {
        "max_steps": 4,
        "batch_size": 4,
        "block_size": 32,
        "seed": 3,
        "dp_epsilon": 8.0,
        "checkpoint_every": 4,
    }
    spec = _spec(json.dumps(hp))
    rows = privacy.training_rows(
        "causal-lm",
        hp,
        model_dir=template / "model" / "base",
        dataset_files=_files(template / "data" / "books"),
    )
    params = _dp.decide(spec, training_rows=lambda: rows)  # type: ignore[arg-type]
    assert params is not None
    root = mount(tmp_path / "root", template)
    rc, err = run_harness(root, hp, dp=params)
    assert rc == contract.EXIT_OK, err
    state = torch.load(root / "output" / "checkpoints" / "last.ckpt", weights_only=False)
    ((noise, rate, steps),) = state["sealroom"]["dp"]["history"]
    assert (noise, rate, steps) == (params.noise_multiplier, params.sample_rate, params.steps)
    reported = json.loads((root / "output" / "metrics.json").read_text())["epsilon"]
    assert _dp.charged_epsilon(params, delta=params.delta) == pytest.approx(reported)


# --- the gateway ------------------------------------------------------------------------------

DP_POLICY = (
    policy("books", memorization=False)
    + "  differential_privacy:\n    epsilon_per_job: 2\n    epsilon_budget: 5\n"
)


def _release_with(site: ScriptedSite, metrics: dict[str, float], dp_figure: float | None):  # type: ignore[no-untyped-def]
    """The site's release of one job: the job's metrics as given, and a manifest whose books
    gate ran (or did not run) a DP check charging ``dp_figure``."""

    def script(order: RunOrder) -> list[SiteReport]:
        out = site.tmp / f"release-{order.job_id}"
        out.mkdir()
        checks = [{"name": "artifacts", "passed": True, "figures": {}}]
        if dp_figure is not None:
            checks.append({"name": "dp", "passed": True, "figures": {"epsilon": dp_figure}})
        manifest = {"gates": [{"dataset": "books", "rules_version": "v", "checks": checks}]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        (out / "metrics.json").write_text(json.dumps(metrics))
        return [
            SiteReport(order.job_id, state=JobState.RUNNING, image_id=site.image_id()),
            SiteReport(order.job_id, state=JobState.CHECKING),
            SiteReport(order.job_id, state=JobState.RELEASED, metrics=metrics, release_dir=out),
        ]

    return script


def _run_one(gw: Gateway, spec_text: str) -> str:
    job = gw.submit(principal=THEO, spec_text=spec_text, bundle=None, bundle_sha256="")
    gw.decide(principal=OLIVIA, job_id=job.id, approve=True, reason="ok")
    assert _wait(gw, job.id) is JobState.RELEASED
    return job.id


SPEC_DP = (
    "name: t\ndatasets: [books]\nbase_model: tiny-lm\ntrainer: causal-lm\npurpose: testing\n"
    "resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}\nhyperparameters: {dp_epsilon: 2}\n"
)


@pytest.mark.parametrize(
    ("claimed", "site_figure", "charged"),
    [
        (5.0, None, 0.0),  # a liar whose gate ran no DP check: charged nothing of the budget
        (-1000.0, 1.5, 1.5),  # a negative claim: the site's figure counts
        (0.0, 1.5, 1.5),
    ],
)
def test_a_released_job_epsilon_never_moves_the_budget_only_the_sites_figure_does(
    tmp_path: Path, site: ScriptedSite, claimed: float, site_figure: float | None, charged: float
) -> None:
    gw = _gateway(tmp_path, site)
    _register(gw, tmp_path)
    gw.put_policy(principal=OLIVIA, dataset="books", text=DP_POLICY)
    gw.start()
    try:
        site.script = _release_with(site, {"train_loss": 1.0, "epsilon": claimed}, site_figure)
        _run_one(gw, SPEC_DP)
        assert gw._epsilon_spent(["books"]) == {"books": charged}
        # A later honest DP job, from any team, is neither denied nor an InvalidInput.
        later = gw.submit(principal=THEO, spec_text=SPEC_DP, bundle=None, bundle_sha256="")
        assert later.state is JobState.PENDING_APPROVAL, later.reasons
    finally:
        gw.stop()
        gw.audit.close()


def test_an_unreadable_manifest_fails_closed_without_an_invalid_input(
    tmp_path: Path, site: ScriptedSite
) -> None:
    gw = _gateway(tmp_path, site)
    _register(gw, tmp_path)
    gw.put_policy(principal=OLIVIA, dataset="books", text=DP_POLICY)
    gw.start()
    try:
        site.script = _release_with(site, {"train_loss": 1.0}, math.nan)
        _run_one(gw, SPEC_DP)
        spent = gw._epsilon_spent(["books"])["books"]
        assert math.isfinite(spent) and spent > 5
        later = gw.submit(principal=THEO, spec_text=SPEC_DP, bundle=None, bundle_sha256="")
        assert later.state is JobState.DENIED  # refused by the budget, not an error
    finally:
        gw.stop()
        gw.audit.close()


@pytest.fixture
def site(tmp_path: Path) -> ScriptedSite:
    return ScriptedSite(tmp_path)
