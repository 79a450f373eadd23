"""The gateway's part in a round of secure aggregation: it relays, keeps track of who reached
which step, and at the end learns the weighted mean of the survivors' updates and their total
weight; no single update. Its bookkeeping follows the sites' rules exactly (which pairs masked
against each other, which secret of whom the reveals must give), since any slip shows as a sum
that does not decode, not as a leak: the sites' own checks (``_site.py``) are what keep each
update hidden, whatever the gateway does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from enclave.secagg import _crypto
from enclave.secagg._round import RoundConfig, seed_commit
from enclave.secagg._site import Advert, Reveal, pair_mask_key, pair_sign
from enclave.secagg._vector import decode
from policies.errors import IntegrityError, InvalidState


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
            seed = self._recover(site, reveals, "seeds")
            if seed_commit(ctx, site, seed) != self._adverts[site].seed_commit:
                raise IntegrityError(f"secure aggregation: {site!r}'s seed does not rebuild")
            total -= _crypto.mask(seed, len(total))
        for gone in (s for s in self._shared if s not in self._masked):
            key = self._recover(gone, reveals, "keys")
            if _crypto.public_key(key) != self._adverts[gone].mask_key:
                raise IntegrityError(f"secure aggregation: {gone!r}'s mask key does not rebuild")
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

    def _recover(self, owner: str, reveals: Mapping[str, Reveal], kind: str) -> bytes:
        shares = [
            getattr(r, kind)[owner]
            for holder, r in reveals.items()
            if holder in self._masked and owner in getattr(r, kind)
        ]
        if len(shares) < self._config.threshold:
            raise InvalidState(
                f"secure aggregation: {len(shares)} shares of {owner!r}'s secret came back, "
                f"fewer than the threshold {self._config.threshold}"
            )
        return _crypto.combine(shares)
