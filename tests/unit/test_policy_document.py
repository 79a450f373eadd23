"""Policy documents: the example parses; every kind of error names its line and field; YAML's
silent surprises are refused; the canonical hash ignores layout; diffs name what changed."""

from __future__ import annotations

import datetime as dt
import re
from importlib.resources import files

import pytest

from policies.document import (
    ApprovalMode,
    CustomCode,
    LogVisibility,
    diff_policies,
    parse_policy,
    policy_digest,
    policy_from_mapping,
)
from policies.errors import InvalidInput, PolicyDocumentError
from policies.release import ArtifactKind, CheckName
from tests.unit._policy_factory import merge, policy_dict

BOOKS = (files("policies") / "examples" / "books.yaml").read_text()


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def problems(text: str) -> str:
    with pytest.raises(PolicyDocumentError) as info:
        parse_policy(text)
    return str(info.value)


# --- the example --------------------------------------------------------------------------------


def test_books_example_parses_into_the_rules_it_states() -> None:
    policy = parse_policy(BOOKS, version=3)
    assert policy.dataset == "books"
    assert policy.version == 3
    assert policy.expires == dt.datetime(2030, 12, 31, tzinfo=dt.UTC)
    assert policy.access.teams == frozenset({"model-team"})
    assert policy.base_models == frozenset({"tiny-lm"})
    assert policy.trainers.builtin == frozenset({"causal-lm", "causal-lm-lora", "classification"})
    assert policy.trainers.custom_code is CustomCode.FORBIDDEN
    assert policy.approval.mode is ApprovalMode.MANUAL
    assert policy.approval.quorum == 1
    assert policy.approval.valid_for == dt.timedelta(hours=72)
    assert policy.logs is LogVisibility.DATA_OWNER
    rules = policy.release
    assert rules.allowed_metrics == frozenset(
        {"train_loss", "eval_loss", "perplexity", "steps", "tokens_seen", "epsilon"}
    )
    assert rules.metric_significant_digits == 4
    assert rules.release_dtype == "BF16"
    assert rules.allowed_artifacts == frozenset({ArtifactKind.WEIGHTS, ArtifactKind.METRICS})
    assert rules.memorization is not None
    assert (rules.memorization.samples, rules.memorization.prefix_tokens) == (16, 32)
    assert (rules.memorization.suffix_tokens, rules.memorization.max_rate) == (32, 0.1)
    assert CheckName.MEMORIZATION in rules.checks
    assert CheckName.DP not in rules.checks and rules.dp is None
    assert rules.version == f"books:{policy.digest()}"
    assert re.fullmatch(r"[0-9a-f]{64}", policy.digest())
    assert policy.ref().digest == policy.digest() and policy.ref().version == 3


def test_dp_section_turns_on_the_dp_check_and_reads_exponents_without_a_dot() -> None:
    text = BOOKS.replace(
        "  memorization:\n",
        "  differential_privacy:\n"
        "    epsilon_per_job: 2\n"
        "    epsilon_budget: 8.0\n"
        "    delta: 1e-5\n"
        "  memorization:\n",
    )
    policy = parse_policy(text)
    assert policy.release.dp is not None
    assert policy.release.dp.delta == 1e-5
    assert policy.release.dp.max_epsilon_per_job == 2.0
    assert CheckName.DP in policy.release.checks


# --- errors name the line and the field ---------------------------------------------------------


def test_wrong_type_names_line_and_field() -> None:
    text = BOOKS.replace("max_gpus: 1", "max_gpus: one")
    msg = problems(text)
    assert f"line {line_of(text, 'max_gpus')}: resources.max_gpus:" in msg
    assert "integer" in msg


def test_bool_is_not_a_number() -> None:
    text = BOOKS.replace("max_gpus: 1", "max_gpus: true")
    assert f"line {line_of(text, 'max_gpus')}: resources.max_gpus:" in problems(text)


def test_unknown_field_names_line_and_field() -> None:
    text = BOOKS.replace("  max_gpus: 1\n", "  max_gpus: 1\n  max_tpus: 4\n")
    msg = problems(text)
    assert f"line {line_of(text, 'max_tpus')}: resources.max_tpus: unknown field" in msg


def test_misspelt_top_level_field_is_unknown() -> None:
    text = BOOKS.replace("base_models:", "base_model:")
    msg = problems(text)
    assert f"line {line_of(text, 'base_model:')}: base_model: unknown field" in msg
    # ...and the real field is then missing, reported where the document's mapping starts.
    assert f"line {line_of(text, 'schema:')}: base_models: missing field (required)" in msg


def test_missing_field_names_the_parent_line_and_field() -> None:
    text = BOOKS.replace("  max_timeout_s: 3600\n", "")
    msg = problems(text)
    assert f"line {line_of(text, 'resources:')}: resources.max_timeout_s: missing field" in msg


def test_bad_enum_value_names_line_field_and_choices() -> None:
    text = BOOKS.replace("mode: manual", "mode: sometimes")
    msg = problems(text)
    assert f"line {line_of(text, 'mode: sometimes')}: approval.mode:" in msg
    assert "'automatic', 'manual' or 'quorum'" in msg


def test_bad_enum_in_a_list_names_the_item() -> None:
    text = BOOKS.replace("artifacts: [weights, metrics]", "artifacts: [weights, pickles]")
    msg = problems(text)
    assert f"line {line_of(text, 'pickles')}: release.artifacts[1]:" in msg


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("2030-02-30", "not a valid date"),
        ("2030-13-01", "not a valid date"),
        ("next tuesday", "not a valid date"),
        ("2030-12-31T10:00:00", "no time zone"),
        ("20301231", "must be a date"),
    ],
)
def test_bad_date_names_line_and_field(value: str, complaint: str) -> None:
    text = BOOKS.replace("expires: 2030-12-31", f"expires: {value}")
    msg = problems(text)
    assert f"line {line_of(text, 'expires:')}: expires:" in msg
    assert complaint in msg


def test_timestamp_with_zone_is_normalised_to_utc() -> None:
    text = BOOKS.replace("expires: 2030-12-31", "expires: 2030-12-31T10:00:00+02:00")
    assert parse_policy(text).expires == dt.datetime(2030, 12, 31, 8, tzinfo=dt.UTC)


def test_every_problem_is_reported_not_only_the_first() -> None:
    text = (
        BOOKS.replace("max_gpus: 1", "max_gpus: one")
        .replace("mode: manual", "mode: sometimes")
        .replace("expires: 2030-12-31", "expires: 2030-02-30")
    )
    msg = problems(text)
    for field in ("resources.max_gpus", "approval.mode", "expires"):
        assert f": {field}:" in msg


def test_quorum_mode_needs_its_number() -> None:
    text = BOOKS.replace("mode: manual", "mode: quorum")
    msg = problems(text)
    assert f"line {line_of(text, 'approval:')}: approval: mode 'quorum' needs" in msg
    text = BOOKS.replace("mode: manual", "mode: quorum\n  quorum: 1")
    assert f"line {line_of(text, 'quorum: 1')}: approval.quorum:" in problems(text)
    ok = parse_policy(BOOKS.replace("mode: manual", "mode: quorum\n  quorum: 2"))
    assert (ok.approval.mode, ok.approval.quorum) == (ApprovalMode.QUORUM, 2)


def test_release_rule_errors_name_the_release_section() -> None:
    text = BOOKS.replace("artifacts: [weights, metrics]", "artifacts: [metrics]")
    msg = problems(text)
    assert f"line {line_of(text, 'release:')}: release:" in msg
    assert "weights must be an allowed artifact" in msg


def test_dp_per_job_above_the_budget_is_refused() -> None:
    raw = merge(
        policy_dict(),
        {"release": {"differential_privacy": {"epsilon_per_job": 5, "epsilon_budget": 1}}},
    )
    with pytest.raises(PolicyDocumentError, match="epsilon_per_job exceeds epsilon_budget"):
        policy_from_mapping(raw)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("max_cpus: 2", "max_cpus: .nan", "resources.max_cpus"),
        ("max_cpus: 2", "max_cpus: .inf", "resources.max_cpus"),
        ("threshold: 0.1 ", "threshold: .nan", "release.memorization.threshold"),
        ("threshold: 0.1 ", "threshold: 1.0 ", "release.memorization.threshold"),
        ("max_gpus: 1", "max_gpus: 99999999999999999999", "resources.max_gpus"),
        ("max_gpus: 1", "max_gpus: 1.0", "resources.max_gpus"),
    ],
)
def test_numbers_out_of_range_or_not_finite(old: str, new: str, field: str) -> None:
    text = BOOKS.replace(old, new)
    assert f"line {line_of(text, new.split(':')[0] + ':')}: {field}:" in problems(text)


def test_custom_is_not_a_builtin_trainer() -> None:
    text = BOOKS.replace("builtin: [causal-lm,", "builtin: [custom,")
    assert "use custom_code: reviewed or private" in problems(text)


def test_yaml_syntax_error_names_the_line() -> None:
    text = BOOKS.replace("  max_gpus: 1\n", "  max_gpus: [1\n")
    assert re.search(r"line \d+: policy is not valid YAML", problems(text))


# --- YAML's silent surprises --------------------------------------------------------------------


def test_duplicate_key_is_refused_not_last_one_wins() -> None:
    text = BOOKS.replace("  custom_code: false ", "  custom_code: false\n  custom_code: true  ")
    msg = problems(text)
    assert f"line {line_of(text, 'custom_code: true')}: trainers.custom_code: duplicate key" in msg


def test_anchors_and_aliases_are_refused() -> None:
    text = BOOKS.replace("teams: [model-team]", "teams: &t [model-team]\n  principals: *t")
    text = text.replace("  principals: []", "")
    assert "anchors and aliases are not allowed" in problems(text)


def test_billion_laughs_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)
    )
    assert "anchors and aliases are not allowed" in problems(bomb)


def test_merge_keys_are_refused() -> None:
    text = BOOKS.replace("resources:\n", "base: &base {max_gpus: 8}\nresources:\n  <<: *base\n")
    msg = problems(text)
    assert "keys must be plain names" in msg or "anchors and aliases" in msg


def test_python_tags_are_refused() -> None:
    text = BOOKS.replace(
        "description: >", "description: !!python/object/apply:os.system [id]\nx: >"
    )
    assert f"line {line_of(text, 'python/object')}: description: tags are not allowed" in (
        problems(text)
    )


def test_deep_nesting_is_refused() -> None:
    assert "nested too deeply" in problems("a: " + "[" * 1200 + "]" * 1200)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "the policy is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("just text", "must be a mapping"),
    ],
)
def test_not_a_mapping(text: str, complaint: str) -> None:
    assert complaint in problems(text)


def test_size_and_encoding_limits() -> None:
    with pytest.raises(PolicyDocumentError, match="limit"):
        parse_policy(b"#" * (65 * 1024))
    with pytest.raises(PolicyDocumentError, match="UTF-8"):
        parse_policy(b"schema: \xff\xfe")


def test_policy_document_error_is_invalid_input() -> None:
    assert issubclass(PolicyDocumentError, InvalidInput)


def test_from_mapping_names_the_field_without_a_line() -> None:
    raw = merge(policy_dict(), {"resources": {"max_gpus": "one"}})
    with pytest.raises(PolicyDocumentError) as info:
        policy_from_mapping(raw)
    assert "resources.max_gpus:" in str(info.value)
    assert "line" not in str(info.value)


# --- canonical hash and diff --------------------------------------------------------------------


def test_digest_ignores_comments_layout_and_list_order() -> None:
    reshuffled = (
        BOOKS.replace("teams: [model-team]", "teams:\n    - model-team\n    - model-team")
        .replace(
            "builtin: [causal-lm, causal-lm-lora, classification]",
            "builtin: [classification, causal-lm, causal-lm-lora]",
        )
        .replace("# ", "# reworded comment ")
    )
    assert reshuffled != BOOKS
    assert policy_digest(reshuffled) == policy_digest(BOOKS)
    assert diff_policies(BOOKS, reshuffled) == ""


def test_digest_changes_with_any_rule() -> None:
    stricter = BOOKS.replace("threshold: 0.1 ", "threshold: 0.05")
    assert policy_digest(stricter) != policy_digest(BOOKS)


def test_digest_does_not_depend_on_the_store_version() -> None:
    assert parse_policy(BOOKS, version=1).digest() == parse_policy(BOOKS, version=2).digest()


def test_diff_names_each_changed_field() -> None:
    new = (
        BOOKS.replace("teams: [model-team]", "teams: [model-team, red-team]")
        .replace("significant_digits: 4", "significant_digits: 2")
        .replace("  - language-model research\n", "")
        .replace("    - language-model research\n", "")
        .replace("  visible_to: data-owner", "  visible_to: model-team")
    )
    diff = diff_policies(BOOKS, new)
    assert '+ access.teams: "red-team"' in diff
    assert '- access.purposes: "language-model research"' in diff
    assert "~ release.metrics.significant_digits: 4 -> 2" in diff
    assert '~ logs.visible_to: "data-owner" -> "model-team"' in diff
    assert len(diff.splitlines()) == 4


def test_diff_of_an_added_section() -> None:
    new = BOOKS.replace(
        "  memorization:\n",
        "  differential_privacy:\n    epsilon_per_job: 1\n    epsilon_budget: 4\n  memorization:\n",
    )
    diff = diff_policies(BOOKS, new)
    assert "- release.differential_privacy: null" in diff
    assert "+ release.differential_privacy.epsilon_budget: 4.0" in diff


def test_diff_refuses_an_invalid_side() -> None:
    with pytest.raises(PolicyDocumentError, match=r"line \d+: approval.mode"):
        diff_policies(BOOKS, BOOKS.replace("mode: manual", "mode: sometimes"))
