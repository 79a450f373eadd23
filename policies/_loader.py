"""The one hardened reader of documents people write: policies and job specs, YAML or JSON.

It takes the text (no file I/O) and returns plain values (dicts, lists, scalars) with a map
from each field's path to its line, so the schema behind it can name the line of every problem.
It reads YAML's parser events itself rather than letting a loader build objects, and refuses
what YAML would accept silently and a reader would misread: duplicate keys (the last one would
win), anchors and aliases (shared nodes, the "billion laughs" expansion), merge keys (``<<``),
tags other than YAML's plain types (``!!python/object`` and friends), keys that are not text,
more than one document, nesting deeper than :data:`MAX_DEPTH`, documents over the caller's size
limit and bytes that are not UTF-8. JSON is read by the same parser (it is YAML's flow style),
so a JSON object with a key twice is refused the same way. Every refusal names the line, and
the field where there is one: ``line N: field.path: problem``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from policies.errors import InvalidInput

Path = tuple[str | int, ...]
"""Where a value sits: mapping keys and list indexes from the top of the document."""

MAX_DEPTH = 64
"""Nesting deeper than this is refused (no document of ours comes near it)."""

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_EXPONENT_RE = re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
"""YAML 1.1 reads ``1e-5`` (no dot) as text."""


class _Refused(Exception):
    def __init__(self, line: int, path: Path, problem: str) -> None:
        super().__init__(problem)
        self.line, self.path, self.problem = line, path, problem


def _short(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def field_name(path: Path) -> str:
    """``release.metrics.allowed[2]``; ``(document)`` for the top."""
    if not path:
        return "(document)"
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def line_for(lines: Mapping[Path, int], path: Path) -> int:
    """The line of ``path``, or of its nearest ancestor (a missing field: its parent's line)."""
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path, 1)


def load_document(
    text: str | bytes,
    *,
    what: str,
    max_bytes: int,
    error: type[InvalidInput],
    exponent_floats: bool = False,
    dates_as_text: bool = False,
) -> tuple[dict[str, Any], Mapping[Path, int]]:
    """Read one YAML or JSON document whose top is a mapping; return it and its lines.

    ``what`` names the document in messages ("policy", "job spec"); ``max_bytes`` caps its
    size (in bytes, or in characters for text already decoded). By default scalars read as
    PyYAML's ``safe_load`` reads them; ``exponent_floats`` also reads a plain ``1e-5`` as a
    number and ``dates_as_text`` keeps plain dates as text (for a schema that parses them).
    Raises ``error`` with ``line N: ...`` naming the problem.
    """
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            line = text[:max_bytes].count(b"\n") + 1
            raise error(f"line {line}: {what} is {len(text)} bytes; the limit is {max_bytes}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise error(
                f"line {line}: {what} is not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    if len(text) > max_bytes:
        line = text[:max_bytes].count("\n") + 1
        raise error(f"line {line}: {what} is {len(text)} characters; the limit is {max_bytes}")
    reader = _Reader(text, exponent_floats=exponent_floats, dates_as_text=dates_as_text)
    try:
        value = reader.document()
    except _Refused as e:
        raise error(f"line {e.line}: {field_name(e.path)}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise error(f"{where}{what} is not valid YAML or JSON: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise error(
            f"line {line}: {what} holds character #x{e.character:04x}, which YAML does not allow"
        ) from None
    except yaml.YAMLError as e:  # pragma: no cover - every parser error is marked or a reader's
        raise error(f"{what} is not valid YAML or JSON: {e}") from None
    if value is None:
        raise error(f"line 1: (document): the {what} is empty")
    if not isinstance(value, dict):
        raise error(f"line {reader.lines[()]}: (document): the {what} must be a mapping of fields")
    return value, reader.lines


class _Reader:
    """Plain values from the parser's events, one document, recording each path's line."""

    def __init__(self, text: str, *, exponent_floats: bool, dates_as_text: bool) -> None:
        self.lines: dict[Path, int] = {}
        self._events: Iterator[Any] = yaml.parse(text, Loader=yaml.SafeLoader)
        self._next: Any = None
        # Resolves plain scalars to YAML's types and constructs int, float, bool, null, dates.
        self._yaml = yaml.SafeLoader("")
        self._exponent_floats = exponent_floats
        self._dates_as_text = dates_as_text

    def _peek(self) -> Any:
        if self._next is None:
            self._next = next(self._events)
        return self._next

    def _take(self) -> Any:
        event = self._peek()
        self._next = None
        return event

    def document(self) -> Any:
        self._take()  # stream start
        if isinstance(self._peek(), yaml.StreamEndEvent):
            return None
        self._take()  # document start
        value = self._value((), depth=0)
        self._take()  # document end
        event = self._take()
        if not isinstance(event, yaml.StreamEndEvent):
            raise _Refused(
                event.start_mark.line + 1, (), "a second document ('---'); write only one"
            )
        return value

    def _value(self, path: Path, *, depth: int) -> Any:
        event = self._take()
        line = event.start_mark.line + 1
        self.lines.setdefault(path, line)
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            raise _Refused(line, path, "anchors and aliases are not allowed")
        if depth >= MAX_DEPTH:
            raise _Refused(line, path, f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(event, yaml.ScalarEvent):
            return self._scalar(event, path, line)
        if isinstance(event, yaml.SequenceStartEvent):
            self._tag(event, yaml.SequenceNode, _TAG + "seq", path, line)
            items: list[Any] = []
            while not isinstance(self._peek(), yaml.SequenceEndEvent):
                items.append(self._value((*path, len(items)), depth=depth + 1))
            self._take()
            return items
        assert isinstance(event, yaml.MappingStartEvent)
        self._tag(event, yaml.MappingNode, _TAG + "map", path, line)
        out: dict[str, Any] = {}
        while not isinstance(self._peek(), yaml.MappingEndEvent):
            key, key_line = self._key(path)
            if key in out:
                raise _Refused(key_line, (*path, key), "duplicate key")
            self.lines[(*path, key)] = key_line
            out[key] = self._value((*path, key), depth=depth + 1)
        self._take()
        return out

    def _key(self, path: Path) -> tuple[str, int]:
        event = self._take()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            raise _Refused(line, path, "anchors and aliases are not allowed")
        if not isinstance(event, yaml.ScalarEvent):
            raise _Refused(line, path, "keys must be plain names, not lists or mappings")
        tag = self._resolve(event, yaml.ScalarNode)
        if tag == _TAG + "merge":
            raise _Refused(line, path, "keys must be plain names ('<<' merges are not allowed)")
        if tag != _TAG + "str":
            raise _Refused(
                line, path, f"keys must be plain names ({event.value!r} is not text; quote it)"
            )
        return str(event.value), line

    def _resolve(self, event: Any, kind: type[Any]) -> str:
        """The node's tag: as written, or as YAML resolves an untagged (or ``!``) node."""
        if event.tag is None or event.tag == "!":
            value = event.value if kind is yaml.ScalarNode else None
            return str(self._yaml.resolve(kind, value, event.implicit))
        return str(event.tag)

    def _tag(self, event: Any, kind: type[Any], expected: str, path: Path, line: int) -> None:
        tag = self._resolve(event, kind)
        if tag != expected:
            raise _Refused(line, path, f"tags are not allowed ({_short(tag)})")

    def _scalar(self, event: Any, path: Path, line: int) -> Any:
        tag = self._resolve(event, yaml.ScalarNode)
        if tag not in _SCALAR_TAGS:
            raise _Refused(line, path, f"tags are not allowed ({_short(tag)})")
        if tag == _TAG + "str":
            if self._exponent_floats and event.style is None and _EXPONENT_RE.match(event.value):
                return float(event.value.replace("_", ""))
            return str(event.value)
        if tag == _TAG + "timestamp" and self._dates_as_text:
            return str(event.value)
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return self._yaml.construct_object(node, deep=True)
        except (ValueError, OverflowError, yaml.YAMLError) as e:
            raise _Refused(line, path, str(e)) from None
