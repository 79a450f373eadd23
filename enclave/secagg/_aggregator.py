"""The gateway's part in a round of secure aggregation: it relays, keeps track of who reached
which step, and at the end learns the weighted mean of the survivors' updates and their total
weight; no single update. Its bookkeeping follows the sites' rules exactly (which pairs masked
against each other, which secret of whom the reveals must give), since any slip shows as a sum
that does not decode, not as a leak: the sites' own checks (``_site.py``) are what keep each
update hidden, whatever the gateway does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import numpy as np

from enclave.secagg import _crypto
from enclave.secagg._round import RoundConfig, seed_commit
from enclave.secagg._site import Advert, Reveal, pair_mask_key, pair_sign
from enclave.secagg._vector import decode
from policies.errors import IntegrityError, InvalidState

MAX_SUBSETS = 5000
"""How many threshold-sized sets of shares the gateway tries before it gives up on a secret."""


class Aggregator:
    """One round, from the adverts to the mean. Call the steps in order."""

    def __init__(self, config: RoundConfig) -> None:
        self._config = config
        self._adverts: dict[str, Advert] = {}
        self._shared: tuple[str, ...] = ()
        self._masked: dict[str, np.ndarray] = {}

    @property
    def config(self) -> RoundConfig:
        return self._config

    def adverts(self, adverts: Mapping[str, Advert]) -> dict[str, Advert]:
        """The adverts every member is sent: those of the members that answered."""
        self._adverts = {s: a for s, a in adverts.items() if s in self._config.members}
        return dict(self._adverts)

    def route(self, sealed: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Each site's inbox, from what each sharing site sealed for whom. Only shares between
        two sites that both shared are delivered, so a pair masks against each other from
        both ends or from neither."""
        shared = {s for s in sealed if s in self._adverts}
        self._shared = tuple(sorted(shared))
        inbox: dict[str, dict[str, bytes]] = {s: {} for s in self._shared}
        for sender in self._shared:
            for receiver, box in sealed[sender].items():
                if receiver in shared and receiver in self._config.neighbours(sender):
                    inbox[receiver][sender] = box
        return inbox

    def survivors(self, masked: Mapping[str, np.ndarray]) -> tuple[str, ...]:
        """The survivor list to confirm: the sharing sites whose masked update arrived."""
        want = self._config.length + 1
        for site, words in masked.items():
            if words.dtype != np.uint64 or words.shape != (want,):
                raise IntegrityError(f"secure aggregation: {site!r} sent a malformed update")
        self._masked = {s: w for s, w in masked.items() if s in self._shared}
        survivors = tuple(sorted(self._masked))
        if len(survivors) < self._config.min_survivors:
            raise InvalidState(
                f"secure aggregation: {len(survivors)} sites sent an update, fewer than the "
                f"{self._config.min_survivors} the round needs"
            )
        return survivors

    def unmask(self, reveals: Mapping[str, Reveal]) -> tuple[np.ndarray, int]:
        """The weighted mean of the survivors' updates and their total weight."""
        cfg, ctx = self._config, self._config.context
        survivors = sorted(self._masked)
        total = np.zeros(cfg.length + 1, dtype=np.uint64)
        for words in self._masked.values():
            total += words
        for site in survivors:
            seed = self._recover(site, reveals, "seeds", _commits(ctx, self._adverts[site]))
            total -= _crypto.mask(seed, len(total))
        for gone in (s for s in self._shared if s not in self._masked):
            key = self._recover(gone, reveals, "keys", _opens(self._adverts[gone]))
            for site in survivors:
                if site in cfg.neighbours(gone):
                    pad = _crypto.mask(
                        pair_mask_key(cfg, key, self._adverts[site].mask_key), len(total)
                    )
                    # ``site`` added (or took away) the pad it shares with ``gone``: undo it.
                    if pair_sign(site, gone) > 0:
                        total -= pad
                    else:
                        total += pad
        return decode(cfg, total)

    def _recover(
        self,
        owner: str,
        reveals: Mapping[str, Reveal],
        kind: str,
        fits: Callable[[bytes], bool],
    ) -> bytes:
        """``owner``'s secret from the holders' shares, checked by ``fits`` (its commitment, or
        its public key). A share that is not its holder's (wrong x-coordinate) is set aside, and
        when all of them together do not rebuild it, every set of a threshold of them is tried
        (up to :data:`MAX_SUBSETS`): a malicious site's bad share cannot spoil a round that a
        threshold of honest holders can complete. Raises :class:`InvalidState` for fewer shares
        than the threshold, :class:`IntegrityError` when no set of them rebuilds the secret."""
        cfg = self._config
        shares = []
        for holder, r in sorted(reveals.items()):
            share = getattr(r, kind).get(owner)
            if holder not in self._masked or share is None:
                continue
            if len(share) == 1 + _crypto.SECRET_BYTES and share[0] == cfg.holder_number(holder):
                shares.append(share)
        if len(shares) < cfg.threshold:
            raise InvalidState(
                f"secure aggregation: {len(shares)} shares of {owner!r}'s secret came back, "
                f"fewer than the threshold {cfg.threshold}"
            )
        tries = itertools.chain(
            [shares], itertools.islice(itertools.combinations(shares, cfg.threshold), MAX_SUBSETS)
        )
        for subset in tries:
            try:
                secret = _crypto.combine(list(subset))
            except IntegrityError:
                continue
            if fits(secret):
                return secret
        raise IntegrityError(
            f"secure aggregation: no {cfg.threshold} of the {len(shares)} shares of {owner!r}'s "
            "secret rebuild it"
        )


def _commits(context: bytes, advert: Advert) -> Callable[[bytes], bool]:
    """Whether a rebuilt seed is the one ``advert`` committed to."""
    return lambda seed: seed_commit(context, advert.site, seed) == advert.seed_commit


def _opens(advert: Advert) -> Callable[[bytes], bool]:
    """Whether a rebuilt mask key is the private key of ``advert``'s mask key."""
    return lambda key: _crypto.public_key(key) == advert.mask_key
