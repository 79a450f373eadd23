"""What a round of secure aggregation is (its public settings, fixed by the gateway and checked
by every site before it takes part) and what each signature in it covers.

Every statement a site signs starts with the round's *context*: a SHA-256 over the settings, so a
key, a survivor list or a share made for one round means nothing in another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from policies.errors import InvalidInput

_DOMAIN = b"sealroom/secagg/v1\n"
_WORD_BITS = 64  # every sum is taken modulo 2^64


@dataclass(frozen=True)
class RoundConfig:
    """One round's settings.

    ``members`` are the sites asked to take part (sorted); each shares its secrets with its
    ``degree`` neighbours on a ring of the members (``degree = len(members) - 1`` is every other
    member, the SecAgg case; less is SecAgg+'s sparse graph). Any ``threshold`` of a site's share
    holders (its neighbours and itself) recover what the sum needs of it, and no fewer can; the
    sum is only ever taken over ``min_survivors`` or more sites. An update has ``length``
    numbers, each clipped to ±``clip``, weighted by at most ``max_weight`` and sent as a
    fixed-point integer with ``frac_bits`` fractional bits.
    """

    job_id: str
    round: int
    members: tuple[str, ...]
    threshold: int
    min_survivors: int
    length: int
    clip: float
    max_weight: int
    degree: int = 0  # 0: every other member
    frac_bits: int = 40
    attempt: int = 0  # a round tried again (too few sites the first time) is a new aggregation

    def __post_init__(self) -> None:
        n = len(self.members)
        if list(self.members) != sorted(set(self.members)) or not all(self.members):
            raise InvalidInput("secure aggregation: members must be distinct names, sorted")
        if not 2 <= n <= 255:
            raise InvalidInput(f"secure aggregation: {n} members (2 to 255 take part)")
        k = self.neighbour_count
        if not 1 <= k <= n - 1 or (k != n - 1 and k % 2):
            raise InvalidInput(f"secure aggregation: degree {k} on {n} members")
        # A strict majority of a site's k+1 share holders: no two disjoint groups of holders can
        # each recover a secret, and the gateway needs that many to recover anything.
        if not (2 * self.threshold > k + 1 and self.threshold <= k + 1):
            raise InvalidInput(
                f"secure aggregation: threshold {self.threshold} must be a strict majority of "
                f"the {k + 1} holders of each site's shares"
            )
        if not max(2, self.threshold) <= self.min_survivors <= n:
            raise InvalidInput(
                f"secure aggregation: min_survivors {self.min_survivors} must be at least 2 and "
                f"the threshold {self.threshold}, and at most the {n} members"
            )
        if self.length < 1 or self.max_weight < 1 or not self.clip > 0 or self.frac_bits < 8:
            raise InvalidInput("secure aggregation: length, max_weight, clip, frac_bits")
        # The true sum of every member's numbers and weights must fit in a signed 64-bit word.
        if n * self.clip * 2**self.frac_bits >= 2 ** (_WORD_BITS - 1) or (
            n * self.max_weight >= 2 ** (_WORD_BITS - 1)
        ):
            raise InvalidInput("secure aggregation: clip or max_weight too large to sum")
        if self.round < 0 or self.attempt < 0 or not self.job_id:
            raise InvalidInput("secure aggregation: a job id and a round number")

    @property
    def neighbour_count(self) -> int:
        return self.degree or len(self.members) - 1

    @property
    def context(self) -> bytes:
        """The round's digest: what every signature and key derivation of it is bound to."""
        settings = asdict(self)
        settings["members"] = list(self.members)
        return hashlib.sha256(_DOMAIN + json.dumps(settings, sort_keys=True).encode()).digest()

    def neighbours(self, site: str) -> tuple[str, ...]:
        """The members ``site`` shares with and masks against: ``degree/2`` either side of it on
        a ring ordered by a hash of the context (public, so the gateway and every site agree)."""
        if site not in self.members:
            raise InvalidInput(f"secure aggregation: {site!r} is not a member of the round")
        n, k = len(self.members), self.neighbour_count
        if k == n - 1:
            return tuple(m for m in self.members if m != site)
        ctx = self.context
        ring = sorted(self.members, key=lambda m: hashlib.sha256(ctx + m.encode()).digest())
        at = ring.index(site)
        near = {ring[(at + d) % n] for d in range(-k // 2, k // 2 + 1) if d}
        return tuple(sorted(near))

    def holders(self, site: str) -> tuple[str, ...]:
        """Who holds a share of ``site``'s secrets: its neighbours and itself, sorted."""
        return tuple(sorted((*self.neighbours(site), site)))

    def holder_number(self, site: str) -> int:
        """A member's Shamir x-coordinate (1-based, by sorted name)."""
        return self.members.index(site) + 1


def advert_message(
    context: bytes, site: str, cipher_key: bytes, mask_key: bytes, seed_commit: bytes
) -> bytes:
    """What a site signs when it announces its round keys."""
    return b"".join((_DOMAIN, b"advert\n", context, _name(site), cipher_key, mask_key, seed_commit))


def survivors_message(context: bytes, survivors: tuple[str, ...]) -> bytes:
    """What a site signs to agree on who is in the sum, before anyone reveals a share."""
    return b"".join((_DOMAIN, b"survivors\n", context, *(_name(s) for s in sorted(survivors))))


def share_aad(context: bytes, sender: str, receiver: str) -> bytes:
    """The associated data of a share sealed from ``sender`` to ``receiver``."""
    return b"".join((_DOMAIN, b"share\n", context, _name(sender), _name(receiver)))


def seed_commit(context: bytes, site: str, seed: bytes) -> bytes:
    """A commitment to a site's self-mask seed (the seed is 256 random bits; the hash shows
    nothing of it), so the seed rebuilt from shares can be checked."""
    return hashlib.sha256(b"".join((_DOMAIN, b"seed\n", context, _name(site), seed))).digest()


def _name(site: str) -> bytes:
    raw = site.encode()
    return len(raw).to_bytes(2, "big") + raw
