"""Interleaved runs and the figures taken from them: a median and a spread, never one lucky run.

Every entry measures its figure and its limit in turns (limit, figure, limit, figure, ...), so
that a busy minute on a shared machine lands on both sides of a pair rather than deciding the
result. A pair gives one ratio (or one overhead, for limits of the form "at most bare + x s");
the entry reports the median of those per-pair ratios and their spread (lowest and highest),
beside the medians of each side.

``Paired.result`` builds the dict every entry returns (see :mod:`tests.bench.__main__`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Paired:
    """Measurements taken in turns. ``higher_is_better`` says whether a value is a rate (steps/s,
    MB/s: higher is better) or a cost (seconds: lower is better)."""

    higher_is_better: bool = True
    ours: list[float] = field(default_factory=list)
    limits: list[float] = field(default_factory=list)

    def add(self, ours: float, limit: float) -> None:
        if ours <= 0 or limit <= 0:
            raise ValueError(f"a measurement must be positive: ours={ours}, limit={limit}")
        self.ours.append(ours)
        self.limits.append(limit)

    @property
    def ratios(self) -> list[float]:
        """Per pair, ours over the limit (a rate's fraction of the limit, or a cost's multiple)."""
        return [o / lim for o, lim in zip(self.ours, self.limits, strict=True)]

    @property
    def overheads(self) -> list[float]:
        """Per pair, ours minus the limit (for costs judged as "at most bare + x")."""
        return [o - lim for o, lim in zip(self.ours, self.limits, strict=True)]

    def result(
        self,
        name: str,
        *,
        unit: str,
        goal: float | None = None,
        max_overhead: float | None = None,
        digits: int = 3,
        **extra: Any,
    ) -> dict[str, Any]:
        """The entry's result: medians, the median per-pair ratio, and each one's spread.

        ``goal`` judges the median ratio; ``max_overhead`` (a cost at most the limit plus this
        much) judges the median per-pair overhead instead."""
        if not self.ours:
            raise ValueError(f"{name}: no runs were measured")
        ratios, overheads = self.ratios, self.overheads
        out: dict[str, Any] = {
            "name": name,
            "value": round(statistics.median(self.ours), digits),
            "limit": round(statistics.median(self.limits), digits),
            "unit": unit,
            "ratio": round(statistics.median(ratios), 3),
            "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "higher_is_better": self.higher_is_better,
            "runs": len(self.ours),
            "values": [round(v, digits) for v in self.ours],
            "limits": [round(v, digits) for v in self.limits],
        }
        if goal is not None:
            out["goal"] = goal
        if max_overhead is not None:
            out["max_overhead"] = max_overhead
            out["overhead"] = round(statistics.median(overheads), digits)
            out["overhead_spread"] = [round(min(overheads), digits), round(max(overheads), digits)]
        out.update(extra)
        return out


def interleave(
    ours: Callable[[], float],
    limit: Callable[[], float],
    *,
    runs: int,
    higher_is_better: bool = True,
    warmup: int = 0,
) -> Paired:
    """Measure ``limit`` then ``ours``, ``runs`` times in turns (after ``warmup`` unrecorded
    turns), and return the pairs."""
    for _ in range(warmup):
        limit()
        ours()
    paired = Paired(higher_is_better=higher_is_better)
    for _ in range(runs):
        lim = limit()
        paired.add(ours(), lim)
    return paired


def fixed_limit(values: list[float], limit: float, *, higher_is_better: bool = True) -> Paired:
    """Runs judged against a fixed target (the audit's 20k events/s): each run is a pair."""
    paired = Paired(higher_is_better=higher_is_better)
    for v in values:
        paired.add(v, limit)
    return paired


__all__ = ["Paired", "fixed_limit", "interleave"]
