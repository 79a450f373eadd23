"""The canonical form of a policy document: what its digest is made of and its diff compares.

A parsed document is dumped to plain values, its order-free lists (teams, principals, purposes,
models, trainers, artifacts, metric names) sorted and de-duplicated, ``expires`` written as one
UTC instant, and the whole frozen; :func:`canonical_bytes` is its sorted, compact JSON, whose
SHA-256 is :meth:`policies.document.PolicyDocument.digest`, so comments and layout change
neither. :func:`diff_canonical` compares two canonical forms field by field, the text behind
:func:`policies.document.diff_policies`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from policies._loader import Path
from policies._policy_schema import PolicySchema, parse_instant

# Lists whose order means nothing: canonically sorted and de-duplicated.
_SET_FIELDS: frozenset[Path] = frozenset(
    {
        ("access", "teams"),
        ("access", "principals"),
        ("access", "purposes"),
        ("base_models",),
        ("trainers", "builtin"),
        ("release", "artifacts"),
        ("release", "metrics", "allowed"),
    }
)


def canonicalize(model: PolicySchema) -> Mapping[str, Any]:
    raw = model.model_dump(by_alias=True, mode="python")
    for path in _SET_FIELDS:
        holder: Any = raw
        for part in path[:-1]:
            holder = holder[part]
        if holder[path[-1]] is not None:
            holder[path[-1]] = sorted(set(holder[path[-1]]))
    raw["expires"] = parse_instant(model.expires).isoformat()
    frozen: Mapping[str, Any] = _freeze(raw)
    return frozen


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def canonical_bytes(canonical: Mapping[str, Any]) -> bytes:
    return json.dumps(
        _thaw(canonical), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key in sorted(value):
            yield from _leaves(value[key], f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _show(value: Any) -> str:
    return json.dumps(_thaw(value), sort_keys=True)


def diff_canonical(old_canonical: Mapping[str, Any], new_canonical: Mapping[str, Any]) -> str:
    """What ``new_canonical`` changes from ``old_canonical``, as
    :func:`policies.document.diff_policies` writes it; "" when nothing differs."""
    old = dict(_leaves(old_canonical))
    new = dict(_leaves(new_canonical))
    lines: list[str] = []
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            lines.append(f"- {path}: {_show(old[path])}")
        elif path not in old:
            lines.append(f"+ {path}: {_show(new[path])}")
        elif old[path] != new[path]:
            a, b = old[path], new[path]
            if isinstance(a, tuple) and isinstance(b, tuple):
                lines.extend(f"- {path}: {_show(x)}" for x in a if x not in b)
                lines.extend(f"+ {path}: {_show(x)}" for x in b if x not in a)
            else:
                lines.append(f"~ {path}: {_show(a)} -> {_show(b)}")
    return "\n".join(lines) + ("\n" if lines else "")
