"""Shared builders for the policy tests: a permissive-but-valid policy, a spec that satisfies
it, the principals and owners, and a fixed clock. Not a test module."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from policies.document import PolicyDocument, policy_from_mapping
from policies.identity import Principal, Role
from policies.spec import JobSpec, spec_from_mapping

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
ALICE = Principal("alice", Role.MODEL_TEAM, "model-team")
MALLORY = Principal("mallory", Role.MODEL_TEAM, "red-team")
OLIVIA = Principal("olivia", Role.DATA_OWNER, "books-owners")
OSCAR = Principal("oscar", Role.DATA_OWNER, "books-owners")
OWNERS: dict[str, frozenset[str]] = {
    "books": frozenset({"olivia", "oscar"}),
    "medical": frozenset({"mona"}),
}


def policy_dict(dataset: str = "books") -> dict[str, Any]:
    return {
        "schema": "sealroom.policy/v1",
        "dataset": dataset,
        "expires": "2027-01-01",
        "access": {"teams": ["model-team"], "principals": [], "purposes": ["research"]},
        "base_models": ["tiny-lm"],
        "trainers": {"builtin": ["causal-lm", "classification"], "custom_code": False},
        "resources": {
            "max_gpus": 1,
            "max_cpus": 4,
            "max_memory_mb": 8192,
            "max_timeout_s": 3600,
        },
        "approval": {"mode": "automatic"},
        "release": {
            "artifacts": ["weights", "metrics"],
            "metrics": {"allowed": ["train_loss"], "significant_digits": 4},
        },
        "logs": {"visible_to": "data-owner"},
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (copies, never mutates)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_policy(dataset: str = "books", *, version: int = 1, **changes: Any) -> PolicyDocument:
    return policy_from_mapping(merge(policy_dict(dataset), changes), version=version)


def spec_dict() -> dict[str, Any]:
    return {
        "name": "tune-books",
        "datasets": ["books"],
        "base_model": "tiny-lm",
        "trainer": "causal-lm",
        "purpose": "research",
        "hyperparameters": {"max_steps": 10},
        "resources": {"gpus": 0, "cpus": 2, "memory_mb": 4096, "timeout_s": 600},
    }


def make_spec(**changes: Any) -> JobSpec:
    return spec_from_mapping(merge(spec_dict(), changes))
