"""The policy document's schema: strict pydantic models of the owner's YAML, used only at this edge.

:func:`policies.document.parse_policy` reads the text with the hardened loader and validates the
plain values against :class:`PolicySchema` here; every model forbids unknown fields, coerces
nothing and is frozen. The field bounds (caps, budgets, memorization and DP settings, channel
limits) and the cross-field checks (a quorum needs its N, a metric range must be a range, the
per-job epsilon must fit the budget) live here, so an owner's mistake is named by field before
any domain value exists. :func:`parse_instant` is the one reading of ``expires``; ``MESSAGES``
rewords pydantic's error types the owner would not recognise.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies.channels import MAX_PROGRESS_POINTS
from policies.release import MAX_PASSAGE_TOKENS
from policies.spec import NAME_RE

PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
"""Team and principal names as they appear in client certificates (subject O and CN)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Access(_Strict):
    teams: list[str] = Field(default_factory=list, max_length=256)
    principals: list[str] = Field(default_factory=list, max_length=256)
    purposes: list[str] | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("teams", "principals")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not PRINCIPAL_RE.match(name):
                raise ValueError(f"{name!r} is not a team or principal name")
        return v

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, v: list[str] | None) -> list[str] | None:
        for purpose in v or ():
            if not purpose.strip() or len(purpose) > 500:
                raise ValueError("a purpose is a non-empty text of at most 500 characters")
        return v


class _Trainers(_Strict):
    builtin: list[str] = Field(default_factory=list, max_length=64)
    # ``true`` is kept as written (not rewritten to "reviewed") so the digest of a policy stored
    # before the modes existed does not change, and neither do approvals bound to it.
    custom_code: bool | Literal["reviewed", "private"] = False

    @field_validator("builtin")
    @classmethod
    def _builtin(cls, v: list[str]) -> list[str]:
        for name in v:
            if name in ("custom", "private"):
                raise ValueError(
                    f"{name!r} is not a built-in trainer: use custom_code: reviewed or private"
                )
            if not NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a trainer name")
        return v


class _Resources(_Strict):
    max_gpus: int = Field(ge=0, le=64)
    max_cpus: float = Field(gt=0, le=1024)
    max_memory_mb: int = Field(ge=256, le=16 * 1024 * 1024)
    max_timeout_s: int = Field(ge=10, le=30 * 24 * 3600)


class _Approval(_Strict):
    mode: Literal["automatic", "manual", "quorum"]
    quorum: int | None = Field(default=None, ge=2, le=64)
    valid_for_hours: int = Field(default=168, ge=1, le=24 * 366)

    @model_validator(mode="after")
    def _quorum(self) -> _Approval:
        if self.mode == "quorum" and self.quorum is None:
            raise ValueError("mode 'quorum' needs 'quorum: N' (N >= 2)")
        if self.mode != "quorum" and self.quorum is not None:
            raise ValueError(f"'quorum' only goes with mode 'quorum', not {self.mode!r}")
        return self


class _Metrics(_Strict):
    allowed: list[str] = Field(max_length=1024)
    significant_digits: int = Field(default=4, ge=1, le=9)
    max_count: int = Field(default=32, ge=0, le=1024)
    max_abs: float = Field(default=1e12, gt=0, allow_inf_nan=False)
    min_abs: float = Field(default=1e-6, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _range(self) -> _Metrics:
        if self.min_abs >= self.max_abs:
            raise ValueError("min_abs must be below max_abs")
        return self


class _Memorization(_Strict):
    samples: int = Field(ge=1, le=100_000)
    prefix_tokens: int = Field(ge=1, le=4096)
    suffix_tokens: int = Field(ge=1, le=4096)
    threshold: float = Field(ge=0, lt=1)
    near_verbatim_ratio: float = Field(default=0.1, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    passage_tokens: int = Field(default=50, ge=2, le=MAX_PASSAGE_TOKENS)
    """The whole-data scan refuses a release that recites any passage this long."""


class _DP(_Strict):
    epsilon_per_job: float = Field(gt=0, allow_inf_nan=False)
    epsilon_budget: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _budgets(self) -> _DP:
        if self.epsilon_per_job > self.epsilon_budget:
            raise ValueError("epsilon_per_job exceeds epsilon_budget: no job could run")
        return self


class _Release(_Strict):
    artifacts: list[Literal["weights", "metrics"]] = Field(min_length=1)
    adapter_only: bool = False
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    scrub_bits: int = Field(default=2, ge=0, le=4)
    metrics: _Metrics
    memorization: _Memorization | None = None
    differential_privacy: _DP | None = None


class _Channels(_Strict):
    """What the model team observes of a job (see :mod:`policies.channels`)."""

    job_budget_bits: float = Field(default=512, gt=0, le=1e9, allow_inf_nan=False)
    dataset_budget_bits: float = Field(default=262_144, gt=0, le=1e12, allow_inf_nan=False)
    progress_points: int = Field(default=10, ge=0, le=MAX_PROGRESS_POINTS)
    loss_digits: int = Field(default=2, ge=1, le=4)
    time_quantum_s: float = Field(default=30, ge=1, le=3600, allow_inf_nan=False)
    gate_timeout_s: float = Field(default=1800, ge=10, le=24 * 3600, allow_inf_nan=False)


class _Logs(_Strict):
    visible_to: Literal["data-owner", "model-team"] = "data-owner"


class PolicySchema(_Strict):
    """The whole document as the owner writes it (``schema: sealroom.policy/v1``)."""

    schema_: Literal["sealroom.policy/v1"] = Field(alias="schema")
    dataset: str
    description: str = Field(default="", max_length=2000)
    expires: str
    access: _Access
    base_models: list[str] = Field(max_length=256)
    trainers: _Trainers
    resources: _Resources
    approval: _Approval
    release: _Release
    logs: _Logs = Field(default_factory=_Logs)
    channels: _Channels = Field(default_factory=_Channels)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a dataset name: lowercase letters, digits, '.', '_', '-'")
        return v

    @field_validator("base_models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a model name")
        return v

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, v: object) -> str:
        if not isinstance(v, str):
            raise ValueError(_DATE_HELP)
        parse_instant(v)  # raises ValueError naming the problem
        return v


_DATE_HELP = "must be a date (YYYY-MM-DD) or an ISO 8601 timestamp with a time zone"
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def parse_instant(text: str) -> dt.datetime:
    """A date means "expires at 00:00 UTC that day"; a timestamp must carry its time zone."""
    text = text.strip()
    try:
        if _DATE_RE.match(text):
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        instant = dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a valid date ({e}); {_DATE_HELP}") from None
    if instant.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; {_DATE_HELP}")
    return instant.astimezone(dt.UTC)


MESSAGES = {
    "missing": "missing field (required)",
    "extra_forbidden": "unknown field",
}
