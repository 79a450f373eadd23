"""One site's part in one round of secure aggregation (Bonawitz et al., CCS 2017, with the
sparse neighbourhoods of Bell et al., CCS 2020), against a gateway it does not trust.

The gateway relays every message; sites never talk to each other. A site:

1. **advertises** two fresh X25519 public keys (one to seal shares with, one to agree masks
   with) and a commitment to a fresh self-mask seed, signed with its CA-issued key;
2. **shares**: checks every member's advert (signature under a site certificate named for that
   member, bound to this round; all keys distinct), then Shamir-splits its seed and its mask key
   among its holders and seals each holder's pair to that holder;
3. **masks**: opens the shares sent to it, then sends its encoded update plus the seed's mask
   plus one pairwise mask per neighbour that shared with it (added towards a later name,
   subtracted towards an earlier one, so each pair cancels in the sum);
4. **confirms** the survivor list (who sent a masked update), signing it once: a site never
   signs two lists for one round;
5. **reveals**, only when a strict majority of the members signed that same list and it holds at
   least ``min_survivors``: for each neighbour that shared with it, its share of the seed if the
   neighbour survived, of the mask key if not; never both for one neighbour, since it derives
   which from the one list itself (the gateway sends no "dropped" list).

So the gateway can remove a survivor's self-mask but never its pairwise masks, and a dropped
site's pairwise masks but never its self-mask: no single update is ever open to it, unless it
holds a threshold of a site's holders (collusion the threshold is chosen against). Each method
may be called once, in order, and counts only when it returns: anything out of order or not as
the protocol says raises and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from enclave.secagg import _crypto
from enclave.secagg._round import (
    RoundConfig,
    advert_message,
    seed_commit,
    share_aad,
    survivors_message,
)
from enclave.secagg._vector import encode
from policies.errors import IntegrityError, InvalidState

# sign(message) -> base64 signature by this site's key.
Sign = Callable[[bytes], str]
# verify(site, cert_pem, message, signature): raises SignatureError unless ``cert_pem`` is a site
# certificate of the deployment CA named ``site`` and ``signature`` is its key's over ``message``.
Verify = Callable[[str, str, bytes, str], None]

_SHARE = 1 + _crypto.SECRET_BYTES


@dataclass(frozen=True)
class Advert:
    """A site's signed round keys, relayed to every member."""

    site: str
    cipher_key: bytes
    mask_key: bytes
    seed_commit: bytes
    cert_pem: str
    signature: str


@dataclass(frozen=True)
class Reveal:
    """A site's shares for the unmasking: seed shares of survivors, mask-key shares of
    neighbours that dropped after sharing, each by the site whose secret it is."""

    site: str
    seeds: Mapping[str, bytes]
    keys: Mapping[str, bytes]


class _Stage(enum.IntEnum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    CONFIRMED = 4
    REVEALED = 5


def pair_sign(site: str, other: str) -> int:
    """+1 when ``site`` adds the mask it shares with ``other``, -1 when it subtracts it."""
    return 1 if site < other else -1


def pair_mask_key(config: RoundConfig, private: bytes, peer_public: bytes) -> bytes:
    return _crypto.agree(private, peer_public, context=config.context, purpose=b"pair mask")


class SiteRound:
    """This site's state for one round; it holds the round's secrets in memory only."""

    def __init__(
        self, config: RoundConfig, *, site: str, cert_pem: str, sign: Sign, verify: Verify
    ) -> None:
        if site not in config.members:
            raise InvalidState(f"secure aggregation: {site!r} is not a member of this round")
        self._config, self._site, self._cert = config, site, cert_pem
        self._sign, self._verify = sign, verify
        self._stage = _Stage.NEW
        self._cipher_sk = _crypto.new_private_key()
        self._mask_sk = _crypto.new_private_key()
        self._seed = _crypto.new_secret()
        self._mine: Advert | None = None
        self._adverts: dict[str, Advert] = {}
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._held: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (seed share, key share)
        self._survivors: tuple[str, ...] = ()
        self._confirmation = ""
        self.clipped = 0  # numbers of this site's update beyond ±clip (recorded at the site)

    def advertise(self) -> Advert:
        self._expect(_Stage.NEW)
        ctx = self._config.context
        cipher_pk = _crypto.public_key(self._cipher_sk)
        mask_pk = _crypto.public_key(self._mask_sk)
        commit = seed_commit(ctx, self._site, self._seed)
        signature = self._sign(advert_message(ctx, self._site, cipher_pk, mask_pk, commit))
        self._mine = Advert(self._site, cipher_pk, mask_pk, commit, self._cert, signature)
        self._stage = _Stage.ADVERTISED
        return self._mine

    def share(self, adverts: Mapping[str, Advert]) -> dict[str, bytes]:
        """Check every relayed advert; return the sealed shares, by holder."""
        self._expect(_Stage.ADVERTISED)
        cfg, ctx = self._config, self._config.context
        if adverts.get(self._site) != self._mine:
            raise IntegrityError("secure aggregation: this site's own advert came back altered")
        keys: set[bytes] = set()
        for name, ad in adverts.items():
            if name != ad.site or name not in cfg.members:
                raise IntegrityError(f"secure aggregation: an advert for {name!r} misnamed")
            message = advert_message(ctx, ad.site, ad.cipher_key, ad.mask_key, ad.seed_commit)
            self._verify(ad.site, ad.cert_pem, message, ad.signature)
            if {ad.cipher_key, ad.mask_key} & keys or ad.cipher_key == ad.mask_key:
                raise IntegrityError(f"secure aggregation: {name!r} repeats a public key")
            keys |= {ad.cipher_key, ad.mask_key}
        holders = [h for h in cfg.holders(self._site) if h in adverts]
        if len(holders) < cfg.threshold:
            raise InvalidState(
                f"secure aggregation: {len(holders)} of this site's share holders are in the "
                f"round, fewer than the threshold {cfg.threshold}"
            )
        self._adverts = dict(adverts)
        n = len(cfg.members)
        seeds = _crypto.split(self._seed, threshold=cfg.threshold, holders=n)
        masks = _crypto.split(self._mask_sk, threshold=cfg.threshold, holders=n)
        sealed: dict[str, bytes] = {}
        for holder in holders:
            x = cfg.holder_number(holder) - 1
            if holder == self._site:
                self._own_shares = (seeds[x], masks[x])
                continue
            key = self._box_key(holder)
            aad = share_aad(ctx, self._site, holder)
            sealed[holder] = _crypto.seal(key, seeds[x] + masks[x], aad=aad)
        self._stage = _Stage.SHARED
        return sealed

    def mask(self, inbox: Mapping[str, bytes], update: np.ndarray, weight: int) -> np.ndarray:
        """Open the shares the neighbours in ``inbox`` sent; return the masked update."""
        self._expect(_Stage.SHARED)
        cfg, ctx = self._config, self._config.context
        mine = cfg.holder_number(self._site)
        neighbours = set(cfg.neighbours(self._site))
        held: dict[str, tuple[bytes, bytes]] = {}
        for sender, sealed in inbox.items():
            if sender not in neighbours or sender not in self._adverts:
                raise IntegrityError(f"secure aggregation: shares from {sender!r} unexpected")
            plain = _crypto.unseal(
                self._box_key(sender),
                sealed,
                aad=share_aad(ctx, sender, self._site),
                what=f"the shares from {sender!r}",
            )
            seed_share, key_share = plain[:_SHARE], plain[_SHARE:]
            if len(key_share) != _SHARE or seed_share[0] != mine or key_share[0] != mine:
                raise IntegrityError(f"secure aggregation: shares from {sender!r} malformed")
            held[sender] = (seed_share, key_share)
        if len(held) + 1 < cfg.threshold:
            raise InvalidState(
                f"secure aggregation: {len(held) + 1} sites shared with this one, fewer "
                f"than the threshold {cfg.threshold}"
            )
        words, clipped = encode(cfg, update, weight)
        words += _crypto.mask(self._seed, len(words))
        for other in held:
            key = pair_mask_key(cfg, self._mask_sk, self._adverts[other].mask_key)
            pad = _crypto.mask(key, len(words))
            if pair_sign(self._site, other) > 0:
                words += pad
            else:
                words -= pad
        self._held, self.clipped, self._stage = held, clipped, _Stage.MASKED
        return words

    def confirm(self, survivors: tuple[str, ...]) -> str:
        """Sign the survivor list: once per round, and never a second, different one."""
        if self._stage == _Stage.CONFIRMED and survivors == self._survivors:
            return self._confirmation
        self._expect(_Stage.MASKED)
        cfg = self._config
        if list(survivors) != sorted(set(survivors)) or not set(survivors) <= set(cfg.members):
            raise IntegrityError("secure aggregation: the survivor list is not a set of members")
        if self._site not in survivors:
            raise IntegrityError("secure aggregation: the survivor list leaves this site out")
        if len(survivors) < cfg.min_survivors:
            raise InvalidState(
                f"secure aggregation: {len(survivors)} survivors, fewer than the "
                f"{cfg.min_survivors} the round needs"
            )
        self._survivors = survivors
        self._confirmation = self._sign(survivors_message(cfg.context, survivors))
        self._stage = _Stage.CONFIRMED
        return self._confirmation

    def reveal(self, survivors: tuple[str, ...], confirmations: Mapping[str, str]) -> Reveal:
        """This site's shares for the unmasking, once a strict majority of the members has
        signed ``survivors`` (the list this site signed)."""
        self._expect(_Stage.CONFIRMED)
        cfg = self._config
        if survivors != self._survivors:
            raise IntegrityError("secure aggregation: not the survivor list this site signed")
        message = survivors_message(cfg.context, survivors)
        for name, signature in confirmations.items():
            ad = self._adverts.get(name)
            if name not in survivors or ad is None:
                raise IntegrityError(f"secure aggregation: {name!r} confirmed but not a survivor")
            self._verify(name, ad.cert_pem, message, signature)
        if 2 * len(confirmations) <= len(cfg.members):
            raise InvalidState(
                f"secure aggregation: {len(confirmations)} of {len(cfg.members)} members "
                "confirmed the survivors; a strict majority must before any share is revealed"
            )
        seeds = {self._site: self._own_shares[0]}
        keys: dict[str, bytes] = {}
        for other, (seed_share, key_share) in self._held.items():
            if other in survivors:
                seeds[other] = seed_share
            else:
                keys[other] = key_share
        self._held.clear()
        self._stage = _Stage.REVEALED
        return Reveal(self._site, seeds, keys)

    def _box_key(self, other: str) -> bytes:
        peer = self._adverts[other].cipher_key
        return _crypto.agree(
            self._cipher_sk, peer, context=self._config.context, purpose=b"share box"
        )

    def _expect(self, stage: _Stage) -> None:
        if self._stage != stage:
            raise InvalidState(
                f"secure aggregation: step out of order (at {self._stage.name.lower()}, "
                f"expected {stage.name.lower()})"
            )
