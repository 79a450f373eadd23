"""Hostile YAML and JSON documents: every attack on the shared loader is refused with the line.

Policies (data owners) and job specs (model teams) go through one hardened loader
(:mod:`policies._loader`). Each test here runs against both kinds of document, in YAML and in
JSON where the attack can be written in JSON: duplicate keys (the last one would silently win),
anchors and aliases, alias expansion ("billion laughs"), tags that would construct objects,
merge keys, oversized text, several documents in one stream and bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from policies.document import MAX_POLICY_BYTES, parse_policy
from policies.errors import InvalidInput, PolicyDocumentError, SpecError
from policies.spec import MAX_SPEC_BYTES, parse_spec
from tests.unit._policy_factory import policy_dict, spec_dict


@dataclass(frozen=True)
class Kind:
    name: str
    parse: Callable[[str | bytes], object]
    error: type[InvalidInput]
    fields: dict[str, Any]
    top: str
    """A top-level text field."""
    nested: tuple[str, str]
    """A field inside a mapping: (section, key)."""
    max_bytes: int

    def yaml(self) -> str:
        return str(yaml.safe_dump(self.fields, sort_keys=False, default_flow_style=False))

    def json(self) -> str:
        return json.dumps(self.fields, indent=2)

    def text(self, syntax: str) -> str:
        return self.yaml() if syntax == "yaml" else self.json()


POLICY = Kind(
    name="policy",
    parse=parse_policy,
    error=PolicyDocumentError,
    fields=policy_dict(),
    top="dataset",
    nested=("resources", "max_gpus"),
    max_bytes=MAX_POLICY_BYTES,
)
SPEC = Kind(
    name="spec",
    parse=parse_spec,
    error=SpecError,
    fields=spec_dict(),
    top="purpose",
    nested=("resources", "gpus"),
    max_bytes=MAX_SPEC_BYTES,
)

kinds = pytest.mark.parametrize("kind", [POLICY, SPEC], ids=lambda k: k.name)
syntaxes = pytest.mark.parametrize("syntax", ["yaml", "json"])


def refusal(kind: Kind, text: str | bytes) -> str:
    with pytest.raises(kind.error) as info:
        kind.parse(text)
    return str(info.value)


def lines_with(text: str | bytes, needle: str | bytes) -> list[int]:
    """1-based numbers of the lines containing ``needle``."""
    parts = text.splitlines()
    return [i for i, line in enumerate(parts, 1) if needle in line]


def after_line(text: str, needle: str, insert: str) -> str:
    """``text`` with ``insert`` (whole lines) added after the only line containing ``needle``."""
    (number,) = lines_with(text, needle)
    parts = text.splitlines(keepends=True)
    return "".join(parts[:number]) + insert + "".join(parts[number:])


@kinds
@syntaxes
def test_the_clean_document_parses(kind: Kind, syntax: str) -> None:
    kind.parse(kind.text(syntax))


# --- duplicate keys -------------------------------------------------------------------------


@kinds
@syntaxes
def test_duplicate_top_level_key_is_refused_not_last_one_wins(kind: Kind, syntax: str) -> None:
    text = kind.text(syntax)
    if syntax == "yaml":
        text += f"{kind.top}: other\n"
    else:
        text = text.replace("{\n", '{\n  "' + kind.top + '": "other",\n', 1)
    second = lines_with(text, kind.top)[-1]
    assert f"line {second}: {kind.top}: duplicate key" in refusal(kind, text)


@kinds
@syntaxes
def test_duplicate_nested_key_is_refused(kind: Kind, syntax: str) -> None:
    section, key = kind.nested
    text = kind.text(syntax)
    if syntax == "yaml":
        text = after_line(text, f"{section}:", f"  {key}: 0\n")
    else:
        text = after_line(text, f'"{section}": {{', f'    "{key}": 0,\n')
    second = lines_with(text, f"{key}")[-1]
    assert f"line {second}: {section}.{key}: duplicate key" in refusal(kind, text)


@kinds
def test_duplicate_key_spelled_two_ways_is_refused(kind: Kind) -> None:
    text = kind.yaml() + f'"{kind.top}": other\n'
    second = lines_with(text, kind.top)[-1]
    assert f"line {second}: {kind.top}: duplicate key" in refusal(kind, text)


# --- anchors, aliases, tags, merge keys --------------------------------------------------------


@kinds
def test_anchor_is_refused_where_it_is_set(kind: Kind) -> None:
    text = kind.yaml().replace(f"{kind.top}: ", f"{kind.top}: &shared ", 1)
    text += "again: *shared\n"
    (line,) = lines_with(text, "&shared")
    assert f"line {line}: {kind.top}: anchors and aliases are not allowed" in refusal(kind, text)


@kinds
def test_alias_is_refused(kind: Kind) -> None:
    text = kind.yaml() + "again: *nowhere\n"
    (line,) = lines_with(text, "*nowhere")
    assert f"line {line}: again: anchors and aliases are not allowed" in refusal(kind, text)


@kinds
def test_billion_laughs_is_refused_at_the_first_anchor_and_quickly(kind: Kind) -> None:
    bomb = "lol0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 30)
    )
    text = kind.yaml() + bomb
    started = time.monotonic()
    message = refusal(kind, text)
    assert time.monotonic() - started < 5
    (line,) = lines_with(text, "&a0")
    assert f"line {line}: lol0: anchors and aliases are not allowed" in message


@kinds
@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!python/object/apply:os.system [id]", "!!python/object/apply:os.system"),
        ("!!python/object:builtins.dict {}", "!!python/object:builtins.dict"),
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!!binary aGk=", "!!binary"),
        ("!!set {a, b}", "!!set"),
        ("!local text", "!local"),
    ],
)
def test_tags_other_than_plain_types_are_refused(kind: Kind, value: str, tag: str) -> None:
    text = kind.yaml().replace(f"{kind.top}: ", f"{kind.top}: {value} #", 1)
    (line,) = lines_with(text, value)
    assert f"line {line}: {kind.top}: tags are not allowed ({tag})" in refusal(kind, text)


@kinds
def test_merge_key_is_refused(kind: Kind) -> None:
    section, key = kind.nested
    text = after_line(kind.yaml(), f"{section}:", f"  <<: {{{key}: 8}}\n")
    (line,) = lines_with(text, "<<")
    message = refusal(kind, text)
    assert f"line {line}: {section}: keys must be plain names ('<<' merges" in message


@kinds
def test_key_that_is_not_text_is_refused(kind: Kind) -> None:
    section, _ = kind.nested
    text = after_line(kind.yaml(), f"{section}:", "  on: 1\n")
    (line,) = lines_with(text, "on: 1")
    assert f"line {line}: {section}: keys must be plain names ('on' is not text" in (
        refusal(kind, text)
    )


@kinds
def test_deep_nesting_is_refused_with_its_line(kind: Kind) -> None:
    text = kind.yaml() + "deep:\n" + "".join("  " * i + f"- # {i}\n" for i in range(200))
    assert "nested too deeply" in refusal(kind, text)
    assert "line " in refusal(kind, text)
    flow = kind.yaml() + "deep: " + "[" * 2000 + "]" * 2000 + "\n"
    (line,) = lines_with(flow, "deep:")
    assert f"line {line}: deep" in refusal(kind, flow)


# --- size, streams, encoding -------------------------------------------------------------------


@kinds
@syntaxes
def test_huge_document_is_refused_naming_the_line_that_passes_the_limit(
    kind: Kind, syntax: str
) -> None:
    filler = "x" * 100
    if syntax == "yaml":
        text = kind.yaml() + "".join(f"# {filler}\n" for _ in range(1000))
    else:
        pad = ",\n".join(f'  "pad{i}": "{filler}"' for i in range(1000))
        text = kind.json().replace("{\n", "{\n" + pad + ",\n", 1)
    data = text.encode()
    line = data[: kind.max_bytes].count(b"\n") + 1
    assert line > 100
    for form, unit in ((data, "bytes"), (text, "characters")):
        message = refusal(kind, form)
        assert f"line {line}: " in message
        assert f"is {len(form)} {unit}; the limit is {kind.max_bytes}" in message


@kinds
@syntaxes
def test_two_documents_in_one_stream_are_refused(kind: Kind, syntax: str) -> None:
    text = kind.text(syntax) + "\n---\n" + kind.text(syntax)
    (line,) = lines_with(text, "---")
    assert f"line {line}: (document): a second document" in refusal(kind, text)


@kinds
@syntaxes
def test_invalid_utf8_is_refused_naming_the_line(kind: Kind, syntax: str) -> None:
    text = kind.text(syntax).encode()
    value = b"research" if kind is SPEC else b"books"
    (line,) = lines_with(text, b": " + (b'"' if syntax == "json" else b"") + value)
    data = text.replace(value, b"\xff\xfe" + value, 1)
    message = refusal(kind, data)
    assert f"line {line}: " in message
    assert "is not UTF-8" in message


@kinds
def test_control_character_is_refused_naming_the_line(kind: Kind) -> None:
    text = kind.yaml()
    (line,) = lines_with(text, f"{kind.top}:")
    text = text.replace(f"{kind.top}: ", f"{kind.top}: \x00", 1)
    assert f"line {line}: " in refusal(kind, text)
    assert "#x0000" in refusal(kind, text)


@kinds
def test_syntax_error_names_the_line(kind: Kind) -> None:
    text = kind.json().replace('",\n', '"\n', 1)
    message = refusal(kind, text)
    assert "is not valid YAML or JSON" in message
    assert message.startswith("line ")
