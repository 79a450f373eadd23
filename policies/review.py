"""What an owner reviews before the release of reviewed custom code: the weights channel's
capacity, and the gate's check results. Pure: the gateway reads the signed release and calls
:func:`weights_capacity` and :func:`review_report`.

Under ``custom_code: reviewed`` the team's own Python writes the weights. The gate re-quantises
every float tensor to the release dtype (BF16 or F16) and rounds away its lowest ``scrub_bits``
mantissa bits; the bits left (sign, exponent, high mantissa) are whatever the code chose, and
no check can tell data written there from training. So the channel's capacity is a plain upper
bound::

    capacity_bits = sum over released tensors of elements x (bits of the dtype - scrub_bits)

``16 - scrub_bits`` per element for BF16/F16 (14 bits at the default scrub of 2). Not every
such pattern is a model the memorization probe would pass, so the true capacity is lower, but
reviewers recovered about 1.1 Mbit from one small model, and no tighter bound is claimed here.
Integer tensors (none pass the gate today) would count with all their bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from policies.errors import InvalidInput
from policies.release import DTYPE_SIZES, MAX_SCRUB_BITS, RELEASE_DTYPES

__all__ = ["CheckResult", "ReviewReport", "WeightsCapacity", "review_report", "weights_capacity"]


@dataclass(frozen=True)
class WeightsCapacity:
    """``bits``: the upper bound on what released weights can carry; ``elements``: released
    tensor elements; ``bits_per_element``: per dtype, the bits that survive the gate."""

    bits: int
    elements: int
    bits_per_element: Mapping[str, int]
    scrub_bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits_per_element", MappingProxyType(dict(self.bits_per_element)))


def surviving_bits(dtype: str, scrub_bits: int) -> int:
    """Bits per element of ``dtype`` left free to the writer after the gate: all of them, less
    the scrubbed low mantissa bits for a release dtype (BF16, F16)."""
    if dtype not in DTYPE_SIZES:
        raise InvalidInput(f"unknown dtype {dtype!r}")
    if not 0 <= scrub_bits <= MAX_SCRUB_BITS:
        raise InvalidInput(f"scrub_bits must be within 0..{MAX_SCRUB_BITS}")
    bits = 8 * DTYPE_SIZES[dtype]
    return bits - scrub_bits if dtype in RELEASE_DTYPES else bits


def weights_capacity(
    tensors: Iterable[tuple[str, tuple[int, ...]]], *, scrub_bits: int
) -> WeightsCapacity:
    """The capacity in bits of released tensors given as ``(dtype, shape)``: elements times
    :func:`surviving_bits`, summed. Raises :class:`InvalidInput` for an unknown dtype or a
    negative size."""
    bits = elements = 0
    per: dict[str, int] = {}
    for dtype, shape in tensors:
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise InvalidInput(f"shape {shape!r} is not a tuple of sizes")
        n = math.prod(shape)
        per[dtype] = surviving_bits(dtype, scrub_bits)
        elements += n
        bits += n * per[dtype]
    return WeightsCapacity(
        bits=bits, elements=elements, bits_per_element=per, scrub_bits=scrub_bits
    )


@dataclass(frozen=True)
class CheckResult:
    """One gate check of one dataset's rules, as signed into the release manifest."""

    dataset: str
    check: str
    passed: bool
    figures: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReviewReport:
    """What the owner decides on. ``reviewers``: the owners whose approval releases it;
    ``approved_by``: those who have approved so far."""

    job_id: str
    release_id: str
    capacity: WeightsCapacity
    checks: tuple[CheckResult, ...]
    reviewers: frozenset[str]
    approved_by: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the CLI's ``--json`` and the audit record)."""
        return {
            "job_id": self.job_id,
            "release_id": self.release_id,
            "weights_capacity_bits": self.capacity.bits,
            "released_elements": self.capacity.elements,
            "bits_per_element": dict(self.capacity.bits_per_element),
            "scrub_bits": self.capacity.scrub_bits,
            "checks": [
                {
                    "dataset": c.dataset,
                    "check": c.check,
                    "passed": c.passed,
                    "figures": dict(c.figures),
                }
                for c in self.checks
            ],
            "reviewers": sorted(self.reviewers),
            "approved_by": sorted(self.approved_by),
        }


def review_report(
    *,
    job_id: str,
    release_id: str,
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    scrub_bits: Iterable[int],
    checks: Iterable[CheckResult],
    reviewers: Iterable[str],
    approved_by: Iterable[str],
) -> ReviewReport:
    """The report for a release awaiting review. ``scrub_bits``: each reviewed dataset's
    policy; the smallest is used, since it leaves the most bits (an upper bound for all)."""
    scrubs = list(scrub_bits)
    if not scrubs:
        raise InvalidInput("a review needs the scrub of at least one dataset's policy")
    return ReviewReport(
        job_id=job_id,
        release_id=release_id,
        capacity=weights_capacity(tensors, scrub_bits=min(scrubs)),
        checks=tuple(checks),
        reviewers=frozenset(reviewers),
        approved_by=frozenset(approved_by),
    )
