"""The release of a private graph (``custom_code: private``) as the site decides it.

The site computes the release's layout itself, from the program in the bundle it unpacked
(never from the job's output), by loading it as the trainer does: the graph's trainable
parameters, float32, in their shapes. What the trainer writes matches it exactly, so the
gate's weights check passes it and nothing else. No probe loads a graph's parameters as a
model: the memorization check passes a private release only where the policy's DP budget
bounds the job (the reason is recorded), and refuses it otherwise; a policy with the probe and
no DP budget refuses a graph at submission. The site's load runs no pickle from the bundle and
inflates no zip bomb. A private spec without its bundle, or without ``dp_epsilon``, is
refused at submission.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from enclave.gate import DPInputs, MemorizationInputs, ReleaseForm, ReleaseKind, run_gate
from gateway.core import Gateway
from policies.access import Outcome, Rule
from policies.errors import SpecError
from policies.release import CheckName, DPRules, MemorizationRules
from tests.unit._policy_factory import make_policy, make_spec
from tests.unit._private_graph import (
    TRAINABLE,
    AdapterLM,
    export_graph,
    with_extra_member,
    with_pickled_weight,
)
from tests.unit._release_support import rules
from tests.unit._trainer_support import make_inputs, mount, run_harness
from tests.unit.test_gateway_core import THEO, ScriptedSite, _bundle, _gateway, _register, spec
from tests.unit.test_policy_access import decide
from trainers import private
from trainers.errors import ConfigError
from trainers.release import GRAPH_PARAMETERS, expected_release
from trainers.weights import tensor_layout

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16
HP: dict[str, Any] = {"dp_epsilon": 4.0, "max_steps": 2, "batch_size": 4, "block_size": BLOCK}
SITE_EPSILON = 3.9
PROBE = MemorizationRules(samples=4, prefix_tokens=8, suffix_tokens=8, max_rate=0.5)


def _vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private job run by the harness as the container runs it: ``root/code/program.pt2``
    trained on the template's books, its output in ``root/output``."""
    template = make_inputs(tmp_path_factory.mktemp("private-template"))
    root = mount(tmp_path_factory.mktemp("private-run") / "root", template)
    (root / "code").mkdir()
    vocab = _vocab(root / "model" / "base")
    export_graph(AdapterLM(vocab), BLOCK, root / "code" / private.PROGRAM_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEALROOM_ROOT", str(root))  # where run_bundle finds the code directory
        rc, err = run_harness(root, HP, trainer="private")
    assert rc == 0, err
    return root


def _form(root: Path) -> ReleaseForm:
    expected = expected_release(
        "private", HP, model_dir=root / "model" / "base", code_dir=root / "code"
    )
    assert expected.kind == GRAPH_PARAMETERS and expected.config is None
    return ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config)


def _gate(root: Path, dest: Path, *, dp: DPRules | None, epsilon: float | None) -> Any:
    checks = {*rules().checks, CheckName.MEMORIZATION} | ({CheckName.DP} if dp else set())
    return run_gate(
        root / "output",
        rules=rules(
            checks=frozenset(checks),
            memorization=PROBE,
            dp=dp,
            allowed_metrics=frozenset({"epsilon", "steps"}),  # what the trainer reports
        ),
        base_layout=tensor_layout(root / "model" / "base"),
        form=_form(root),
        dest_dir=dest,
        # Never used for a graph's parameters: the probe cannot load them.
        memorization=MemorizationInputs(
            model_dir=root / "model" / "base", tokenizer=cast(Any, None), texts=[]
        ),
        dp=DPInputs(spent=0.0, epsilon=epsilon) if dp else None,
    )


def test_the_sites_layout_from_the_bundle_is_exactly_what_the_trainer_writes(
    trained: Path,
) -> None:
    written = tensor_layout(trained / "output" / "weights" / "model.safetensors")
    assert _form(trained).layout == written
    assert set(written) == TRAINABLE  # the frozen base of the graph is not released
    assert all(dtype == private.RELEASED_DTYPE for dtype, _ in written.values())


def test_a_private_release_passes_memorization_bounded_by_the_policys_dp(
    trained: Path, tmp_path: Path
) -> None:
    gate = _gate(trained, tmp_path / "r", dp=DPRules(5.0, 12.0), epsilon=SITE_EPSILON)
    gate.require_passed()
    memo = next(c for c in gate.checks if c.name is CheckName.MEMORIZATION)
    assert memo.figures["skipped"] == f"bounded by DP, epsilon={SITE_EPSILON:.4g}"
    assert sorted(a.path for a in gate.artifacts) == ["metrics.json", "weights/model.safetensors"]
    released = tensor_layout(tmp_path / "r" / "weights" / "model.safetensors")
    assert set(released) == TRAINABLE
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["epsilon"] == pytest.approx(SITE_EPSILON)  # the site's, not the job's


@pytest.mark.parametrize(
    ("dp", "epsilon", "why"),
    [
        (None, None, "sets no DP budget"),
        (DPRules(5.0, 12.0), None, "without DP-SGD set by the site"),
        (DPRules(2.0, 12.0), SITE_EPSILON, "exceeds the per-job cap"),
    ],
)
def test_a_private_release_nothing_bounds_is_refused_not_probed(
    trained: Path, tmp_path: Path, dp: DPRules | None, epsilon: float | None, why: str
) -> None:
    gate = _gate(trained, tmp_path / "r", dp=dp, epsilon=epsilon)
    assert not gate.passed and not (tmp_path / "r").exists()
    memo = next(c for c in gate.checks if c.name is CheckName.MEMORIZATION)
    assert not memo.passed and why in memo.reasons[0], memo.reasons


def test_the_sites_load_of_a_program_pickle_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "site-ran-the-bundle"
    code = tmp_path / "code"
    code.mkdir()
    benign = export_graph(AdapterLM(32), BLOCK, tmp_path / "benign.pt2")
    with_pickled_weight(benign, code / private.PROGRAM_FILE, f"touch {marker}")
    with pytest.raises(private.GraphRefused):
        expected_release("private", HP, model_dir=tmp_path, code_dir=code)
    assert not marker.exists()


def test_a_zip_bomb_program_is_refused_before_it_inflates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The site loads the program outside any container: a member that inflates past the cap
    is refused from its declared size, before it is read."""
    monkeypatch.setattr(private, "MAX_UNPACKED_BYTES", 4 << 20)
    code = tmp_path / "code"
    code.mkdir()
    benign = export_graph(AdapterLM(32), BLOCK, tmp_path / "benign.pt2")
    with_extra_member(benign, code / private.PROGRAM_FILE, "bomb/zeros", 8 << 20)
    assert (code / private.PROGRAM_FILE).stat().st_size < 1 << 20
    with pytest.raises(private.GraphRefused, match="unpacks to over"):
        expected_release("private", HP, model_dir=tmp_path, code_dir=code)


def test_the_site_computes_no_private_release_without_a_bundle_or_epsilon(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as no_bundle:
        expected_release("private", HP, model_dir=tmp_path)
    assert no_bundle.value.field == "bundle"
    with pytest.raises(ConfigError) as no_epsilon:
        expected_release("private", {"max_steps": 2}, model_dir=tmp_path, code_dir=tmp_path)
    assert no_epsilon.value.field == "hyperparameters.dp_epsilon"


# --- at submission --------------------------------------------------------------------------

GRAPH = {"trainer": "private", "hyperparameters": {"dp_epsilon": 2.0}}
MEMORIZATION = {
    "memorization": {"samples": 8, "prefix_tokens": 16, "suffix_tokens": 16, "threshold": 0.5}
}
DP = {"differential_privacy": {"epsilon_per_job": 4.0, "epsilon_budget": 8.0}}


def test_a_graph_on_a_probed_dataset_needs_a_dp_budget_to_bound_it() -> None:
    probed = make_policy(trainers={"custom_code": "private"}, release=MEMORIZATION)
    denied = decide(make_spec(**GRAPH), policies={"books": probed})
    assert denied.outcome is Outcome.DENY and denied.rules == {Rule.CUSTOM_CODE}
    assert "memorization" in str(denied.reasons[0])
    bounded = make_policy(trainers={"custom_code": "private"}, release={**MEMORIZATION, **DP})
    assert decide(make_spec(**GRAPH), policies={"books": bounded}).outcome is Outcome.AUTO_APPROVE
    # Built-in trainers on the probed dataset are probed as before.
    assert decide(make_spec(), policies={"books": probed}).outcome is Outcome.AUTO_APPROVE


@pytest.fixture
def gw(tmp_path: Path) -> Any:
    site = ScriptedSite(tmp_path)
    g = _gateway(tmp_path, site)
    _register(g, tmp_path, custom_code=True)
    yield g, site
    g.stop()
    g.audit.close()


def test_a_private_spec_without_its_bundle_is_refused_at_submission(
    gw: tuple[Gateway, ScriptedSite],
) -> None:
    g, site = gw
    text = spec("private") + "hyperparameters: {dp_epsilon: 2.0}\n"
    with pytest.raises(SpecError) as err:
        g.submit(principal=THEO, spec_text=text, bundle=None, bundle_sha256="")
    assert str(err.value).startswith("bundle: trainer 'private'"), err.value
    assert "program.pt2" in str(err.value)
    assert g.store.jobs() == [] and site.orders == []


def test_a_private_spec_without_dp_epsilon_is_refused_at_submission(
    gw: tuple[Gateway, ScriptedSite], tmp_path: Path
) -> None:
    g, site = gw
    text = spec("private") + "hyperparameters: {max_steps: 2}\n"
    code = _bundle(tmp_path / "b.tar.gz", b"x")
    with pytest.raises(SpecError) as err:
        g.submit(principal=THEO, spec_text=text, bundle=code, bundle_sha256="")
    assert str(err.value).startswith("hyperparameters.dp_epsilon"), err.value
    assert g.store.jobs() == [] and site.orders == []
