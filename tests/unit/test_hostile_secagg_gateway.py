"""A hostile gateway against secure aggregation. It relays every message of the round, so it
can drop, swap, replay, redirect or forge any of them, and it chooses whom to call a survivor.
Whatever it does, it must never hold any one site's update: each attack below is checked by
what the gateway ends up holding (it cannot decode a single update from it), and each active one
is refused at the site with the check named."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from enclave import secagg
from enclave.secagg import Advert, Reveal, RoundConfig, SiteRound, _crypto, encode, resolution
from enclave.secagg._site import pair_mask_key, pair_sign
from gateway.identity import CertificateAuthority
from policies.errors import IntegrityError, InvalidState, SignatureError
from policies.identity import Role
from tests.unit._secagg_support import Identities, fedavg, run_round

MEMBERS = ("alpha", "bravo", "charlie")


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    root = tmp_path_factory.mktemp("secagg-hostile")
    return Identities(CertificateAuthority.init(root / "ca"), root / "ids")


def _config(members: tuple[str, ...] = MEMBERS, **kw: object) -> RoundConfig:
    n = len(members)
    base: dict[str, object] = dict(
        job_id="job-h",
        round=3,
        members=members,
        threshold=n // 2 + 1,
        min_survivors=max(2, n // 2 + 1),
        length=64,
        clip=4.0,
        max_weight=100,
    )
    base.update(kw)
    return RoundConfig(**base)  # type: ignore[arg-type]


def _updates(config: RoundConfig) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(5)
    return (
        {m: rng.normal(0, 0.1, config.length) for m in config.members},
        {m: 50 for m in config.members},
    )


def _agreeing(words: np.ndarray, config: RoundConfig, update: np.ndarray, weight: int) -> int:
    """How many of ``words`` equal the site's encoded update: what an unmasking attempt
    recovered. Masked words are uniform over 2^64, so an honest miss agrees on none."""
    plain, _ = encode(config, update, weight)
    return int(np.count_nonzero(words == plain))


def _started(
    ids: Identities, config: RoundConfig
) -> tuple[dict[str, SiteRound], dict[str, Advert]]:
    sites = {m: ids.site_round(config, m) for m in config.members}
    return sites, {m: s.advertise() for m, s in sites.items()}


# Passive: everything an honest-but-curious gateway holds after the round.


@pytest.mark.parametrize("gone", [(), ("charlie",)])
def test_what_the_gateway_holds_unmasks_no_single_update(ids: Identities, gone: tuple) -> None:  # type: ignore[type-arg]
    members = ("alpha", "bravo", "charlie", "delta", "echo")
    config = _config(members)
    ups, ws = _updates(config)
    _, _, seen, _ = run_round(ids, config, ups, ws, gone_before_mask=gone)
    survivors = seen.survivors
    for site in survivors:
        # The best the gateway can do: rebuild the site's seed from the revealed shares (it
        # can), take its self-mask off, and take off every pairwise mask it can rebuild (those
        # with dropped sites). The masks with the other survivors stay on.
        seed = _crypto.combine([r.seeds[site] for r in seen.reveals.values() if site in r.seeds])
        words = seen.masked[site] - _crypto.mask(seed, config.length + 1)
        for dropped in gone:
            key = _crypto.combine(
                [r.keys[dropped] for r in seen.reveals.values() if dropped in r.keys]
            )
            pad = _crypto.mask(
                pair_mask_key(config, key, seen.adverts[site].mask_key), config.length + 1
            )
            words = words - pad if pair_sign(site, dropped) > 0 else words + pad
        assert _agreeing(words, config, ups[site], ws[site]) == 0
        # And no reveal carries a share of a survivor's mask key, so no pairwise mask of two
        # survivors can be rebuilt from anything the gateway holds.
        assert all(site not in r.keys for r in seen.reveals.values())
    # The sealed shares are addressed pairwise under keys the gateway cannot derive: its own
    # X25519 key agreed with the advertised keys opens none of them.
    rogue = _crypto.new_private_key()
    for _sender, boxes in seen.sealed.items():
        for receiver, box in boxes.items():
            key = _crypto.agree(
                rogue,
                seen.adverts[receiver].cipher_key,
                context=config.context,
                purpose=b"share box",
            )
            with pytest.raises(IntegrityError):
                _crypto.unseal(key, box, aad=b"", what="a share")


def test_the_masks_come_from_all_256_bits_of_the_seed() -> None:
    """Flower's generator folded the seed into 32 bits: two seeds with the same fold gave the same
    mask, so a mask could be found by search. Here seeds differing in any one bit differ."""
    seed = bytes(range(32))
    folded = bytearray(seed)
    for i in range(4):  # flip the same bit in two 4-byte words: the XOR fold is unchanged
        folded[i] ^= 0x55
        folded[4 + i] ^= 0x55
    a, b = _crypto.mask(seed, 1024), _crypto.mask(bytes(folded), 1024)
    assert np.count_nonzero(a == b) == 0
    # Uniform words: every bit is set about half the time.
    bits = np.unpackbits(a.view(np.uint8))
    assert 0.45 < bits.mean() < 0.55


# Active: the gateway changes what it relays.


def test_a_swapped_mask_key_is_refused(ids: Identities) -> None:
    config = _config()
    sites, adverts = _started(ids, config)
    forged = dict(adverts)
    forged["bravo"] = dataclasses.replace(
        adverts["bravo"], mask_key=_crypto.public_key(_crypto.new_private_key())
    )
    with pytest.raises(SignatureError, match="does not verify"):
        sites["alpha"].share(forged)


def test_an_advert_from_another_round_is_refused(ids: Identities) -> None:
    config, earlier = _config(), _config(round=2)
    sites, adverts = _started(ids, config)
    _, old = _started(ids, earlier)
    with pytest.raises(SignatureError, match="does not verify"):
        sites["alpha"].share({**adverts, "bravo": old["bravo"]})


def test_an_advert_signed_by_someone_not_that_site_is_refused(
    ids: Identities, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = _config()
    sites, adverts = _started(ids, config)
    # The gateway signs bravo's place with an identity of its own making: a data owner's
    # certificate, another site's, and one of a CA that is not the deployment's.
    other = Identities(
        CertificateAuthority.init(tmp_path_factory.mktemp("rogue-ca")),
        tmp_path_factory.mktemp("rogue-ids"),
    )
    impostors = [ids.of("olivia", Role.DATA_OWNER), ids.of("charlie"), other.of("bravo")]
    for cert, key in impostors:
        fake = SiteRound(
            config,
            site="bravo",
            cert_pem=cert,
            sign=lambda m, k=key: secagg_sign(k, m),
            verify=ids.verify,
        )
        with pytest.raises(SignatureError):
            sites["alpha"].share({**adverts, "bravo": fake.advertise()})
        sites, adverts = _started(ids, config)


def secagg_sign(key: bytes, message: bytes) -> str:
    from enclave.signatures import sign

    return sign(key, message)


def test_the_sites_own_advert_altered_and_repeated_keys_are_refused(ids: Identities) -> None:
    config = _config()
    sites, adverts = _started(ids, config)
    mine = dataclasses.replace(adverts["alpha"], cipher_key=adverts["bravo"].cipher_key)
    with pytest.raises(IntegrityError, match="own advert"):
        sites["alpha"].share({**adverts, "alpha": mine})
    sites, adverts = _started(ids, config)
    with pytest.raises(IntegrityError, match="misnamed"):
        sites["alpha"].share({**adverts, "charlie": adverts["bravo"]})


def test_shares_redirected_or_altered_do_not_open(ids: Identities) -> None:
    config = _config(("alpha", "bravo", "charlie", "delta"))
    sites, adverts = _started(ids, config)
    sealed = {m: s.share(adverts) for m, s in sites.items()}
    ups, _ws = _updates(config)
    # bravo's shares for charlie, handed to alpha as if from bravo.
    with pytest.raises(IntegrityError, match="does not open"):
        sites["alpha"].mask({"bravo": sealed["bravo"]["charlie"]}, ups["alpha"], 1)
    box = bytearray(sealed["bravo"]["delta"])
    box[-1] ^= 1
    with pytest.raises(IntegrityError, match="does not open"):
        sites["delta"].mask({"bravo": bytes(box)}, ups["delta"], 1)
    with pytest.raises(IntegrityError, match="unexpected"):
        sites["charlie"].mask({"mallory": b"x" * 80}, ups["charlie"], 1)


def test_survivor_lists_the_sites_will_not_sign(ids: Identities) -> None:
    config = _config(("alpha", "bravo", "charlie", "delta"), min_survivors=3)
    ups, ws = _updates(config)
    _, _, _, sites = _masked(ids, config, ups, ws)
    with pytest.raises(IntegrityError, match="leaves this site out"):
        sites["alpha"].confirm(("bravo", "charlie", "delta"))
    with pytest.raises(InvalidState, match="fewer than the 3"):
        sites["alpha"].confirm(("alpha", "bravo"))
    with pytest.raises(IntegrityError, match="not a set of members"):
        sites["alpha"].confirm(("alpha", "bravo", "mallory"))
    sites["alpha"].confirm(("alpha", "bravo", "charlie"))
    # Once signed, never another list for this round.
    with pytest.raises(InvalidState, match="out of order"):
        sites["alpha"].confirm(("alpha", "bravo", "charlie", "delta"))


def _masked(ids: Identities, config: RoundConfig, ups: dict, ws: dict):  # type: ignore[no-untyped-def, type-arg]
    agg = secagg.Aggregator(config)
    sites, adverts = _started(ids, config)
    agg.adverts(adverts)
    inbox = agg.route({m: s.share(adverts) for m, s in sites.items()})
    masked = {m: s.mask(inbox[m], ups[m], ws[m]) for m, s in sites.items()}
    return agg, adverts, masked, sites


@pytest.mark.parametrize("n", [3, 4, 5])
def test_two_survivor_lists_cannot_both_be_revealed_against(ids: Identities, n: int) -> None:
    """The attack the survivor signatures stop: tell some sites a target survived (they reveal
    its seed) and others it dropped (they reveal its mask key), and hold both. Every way of
    splitting the sites between two lists is tried. Two rules stop it, each on its own: a site
    signs one list and reveals one kind of share per neighbour by it, and the threshold is a
    strict majority of the holders, so no two disjoint groups reach it; and a site reveals only
    once a strict majority of the members signed its list, which only one list can have."""
    members = ("alpha", "bravo", "charlie", "delta", "echo")[:n]
    config = _config(members)
    ups, ws = _updates(config)
    target = "alpha"
    with_target = members
    without = tuple(m for m in members if m != target)
    for mask in itertools.product((0, 1), repeat=n):
        *_, sites = _masked(ids, config, ups, ws)
        lists = {
            m: (with_target if pick else without) for m, pick in zip(members, mask, strict=True)
        }
        lists[target] = with_target  # the target only ever signs a list it is in
        signed: dict[tuple[str, ...], dict[str, str]] = {with_target: {}, without: {}}
        for m, survivors in lists.items():
            if len(survivors) >= config.min_survivors:
                signed[survivors][m] = sites[m].confirm(survivors)
        seeds, keys = [], []
        for m, survivors in lists.items():
            try:
                reveal = sites[m].reveal(survivors, signed[survivors])
            except (InvalidState, IntegrityError):
                continue
            seeds += [reveal.seeds[target]] if target in reveal.seeds else []
            keys += [reveal.keys[target]] if target in reveal.keys else []
        assert not (len(seeds) >= config.threshold and len(keys) >= config.threshold)
        # Nor does gathering another list's signatures help: they are over another list.
        other = {**signed[with_target], **signed[without]}
        for m, survivors in lists.items():
            if m != target and survivors == without and sites[m]._stage.name == "CONFIRMED":
                with pytest.raises((SignatureError, IntegrityError)):
                    sites[m].reveal(survivors, other)


def test_forged_or_misattributed_confirmations_are_refused(ids: Identities) -> None:
    config = _config()
    ups, ws = _updates(config)
    agg, _adverts, masked, sites = _masked(ids, config, ups, ws)
    survivors = agg.survivors(masked)
    signed = {m: s.confirm(survivors) for m, s in sites.items()}
    # bravo's signature presented as charlie's.
    with pytest.raises(SignatureError):
        sites["alpha"].reveal(survivors, {"alpha": signed["alpha"], "charlie": signed["bravo"]})
    _, _, _, sites = _masked(ids, config, ups, ws)
    for s in sites.values():
        s.confirm(survivors)
    with pytest.raises(InvalidState, match="strict majority"):
        sites["alpha"].reveal(survivors, {"alpha": sites["alpha"].confirm(survivors)})


def test_a_site_called_dropped_keeps_its_update_hidden(ids: Identities) -> None:
    """The gateway got alpha's masked update but calls alpha dropped, to get the shares of
    alpha's mask key. It gets them, takes off every pairwise mask, and still holds only noise:
    alpha's self-mask seed is revealed only for survivors."""
    config = _config(("alpha", "bravo", "charlie", "delta"))
    ups, ws = _updates(config)
    _agg, adverts, masked, sites = _masked(ids, config, ups, ws)
    survivors = ("bravo", "charlie", "delta")
    signed = {m: sites[m].confirm(survivors) for m in survivors}
    reveals = {m: sites[m].reveal(survivors, signed) for m in survivors}
    assert all("alpha" not in r.seeds for r in reveals.values())
    key = _crypto.combine([r.keys["alpha"] for r in reveals.values()])
    words = masked["alpha"].copy()
    for other in survivors:
        pad = _crypto.mask(pair_mask_key(config, key, adverts[other].mask_key), len(words))
        words = words - pad if pair_sign("alpha", other) > 0 else words + pad
    assert _agreeing(words, config, ups["alpha"], ws["alpha"]) == 0


def test_steps_out_of_order_or_twice_are_refused(ids: Identities) -> None:
    config = _config()
    sites, _adverts = _started(ids, config)
    with pytest.raises(InvalidState, match="out of order"):
        sites["alpha"].advertise()
    with pytest.raises(InvalidState, match="out of order"):
        sites["alpha"].confirm(MEMBERS)
    ups, ws = _updates(config)
    with pytest.raises(InvalidState, match="out of order"):
        sites["alpha"].mask({}, ups["alpha"], 1)
    *_, sites = _masked(ids, config, ups, ws)
    signed = {m: s.confirm(MEMBERS) for m, s in sites.items()}
    sites["alpha"].reveal(MEMBERS, signed)
    with pytest.raises(InvalidState, match="out of order"):
        sites["alpha"].reveal(MEMBERS, signed)


def test_a_gateway_cannot_shrink_the_sum_to_one_site(ids: Identities) -> None:
    """No settings let a round sum fewer than two sites, and a site refuses to reveal for a
    survivor list below the round's minimum, so the "sum" is never one site's update."""
    with pytest.raises(Exception, match="min_survivors"):
        _config(min_survivors=1)
    config = _config()
    ups, ws = _updates(config)
    _, _, _, sites = _masked(ids, config, ups, ws)
    with pytest.raises(InvalidState, match="fewer than the 2"):
        sites["alpha"].confirm(("alpha",))


# A hostile site: it cannot spoil a round that a threshold of honest holders can complete.


def _spoilt(reveal: Reveal, kind: str) -> Reveal:
    """Each share's number kept, its value replaced by random bytes (a constant pattern would
    cancel out of some interpolations: Shamir's sharing is linear)."""
    bad = {k: v[:1] + os.urandom(len(v) - 1) for k, v in getattr(reveal, kind).items()}
    return dataclasses.replace(reveal, **{kind: bad})


@pytest.mark.parametrize("kind", ["seeds", "keys"])
def test_a_site_revealing_bad_shares_cannot_spoil_the_sum(ids: Identities, kind: str) -> None:
    """With five sites (threshold 3) a holder answers the reveal with altered shares (and, for
    the seeds, another with shares under another holder's number): the gateway tries sets of a
    threshold of shares until one rebuilds the committed secret (or the advertised key), and
    the round decodes to the plain FedAvg."""
    members = ("alpha", "bravo", "charlie", "delta", "echo")
    config = _config(members)
    ups, ws = _updates(config)
    agg, _, masked, sites = _masked(ids, config, ups, ws)
    gone = "echo" if kind == "keys" else None  # a dropped site, so that keys are revealed
    if gone:
        masked = {m: w for m, w in masked.items() if m != gone}
    survivors = agg.survivors(masked)
    signed = {m: sites[m].confirm(survivors) for m in survivors}
    reveals = {m: sites[m].reveal(survivors, signed) for m in survivors}
    reveals["bravo"] = _spoilt(reveals["bravo"], kind)
    if kind == "seeds":  # five holders: a second bad one still leaves three honest
        renumbered = {k: bytes([1]) + v[1:] for k, v in reveals["charlie"].seeds.items()}
        reveals["charlie"] = dataclasses.replace(reveals["charlie"], seeds=renumbered)
    mean, weight = agg.unmask(reveals)
    kept = [m for m in members if m != gone]
    want = fedavg({m: ups[m] for m in kept}, {m: ws[m] for m in kept}, config.clip)
    assert weight == sum(ws[m] for m in kept)
    assert np.max(np.abs(mean - want)) <= resolution(config, len(kept), weight) * 1.01


def test_too_many_bad_shares_fail_the_round_naming_whose_secret(ids: Identities) -> None:
    members = ("alpha", "bravo", "charlie", "delta", "echo")
    config = _config(members)
    ups, ws = _updates(config)
    agg, _, masked, sites = _masked(ids, config, ups, ws)
    survivors = agg.survivors(masked)
    signed = {m: sites[m].confirm(survivors) for m in survivors}
    reveals = {m: sites[m].reveal(survivors, signed) for m in survivors}
    for m in ("bravo", "charlie", "delta"):  # three of five: no threshold of honest ones left
        reveals[m] = _spoilt(reveals[m], "seeds")
    with pytest.raises(IntegrityError, match="no 3 of the 5 shares of 'alpha'"):
        agg.unmask(reveals)
