"""Secure aggregation, honest path: the mean that comes out of the masked round equals the plain
weighted FedAvg computed in the clear, to within the fixed-point resolution, whoever drops out
at whichever step, as long as enough stay; and fails naming the shortfall when too few do."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave.secagg import RoundConfig, decode, encode, resolution
from gateway.identity import CertificateAuthority
from policies.errors import InvalidInput, InvalidState
from tests.unit._secagg_support import Identities, fedavg, run_round

NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf")


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    root = tmp_path_factory.mktemp("secagg")
    return Identities(CertificateAuthority.init(root / "ca"), root / "ids")


def _config(n: int, **kw: object) -> RoundConfig:
    base: dict[str, object] = dict(
        job_id="job-1",
        round=0,
        members=NAMES[:n],
        threshold=n // 2 + 1,
        min_survivors=max(2, n // 2 + 1),
        length=257,
        clip=4.0,
        max_weight=10_000,
    )
    base.update(kw)
    return RoundConfig(**base)  # type: ignore[arg-type]


def _updates(config: RoundConfig, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(seed)
    updates = {m: rng.normal(0, 0.05, config.length) for m in config.members}
    weights = {m: int(rng.integers(1, config.max_weight)) for m in config.members}
    return updates, weights


def _assert_fedavg(config: RoundConfig, got: np.ndarray, weight: int, ups, ws) -> None:  # type: ignore[no-untyped-def]
    want = fedavg(ups, ws, config.clip)
    assert weight == sum(ws.values())
    bound = resolution(config, len(ws), weight) * 1.01 + 1e-15
    assert np.max(np.abs(got - want)) <= bound
    # The sum is not trivially close: the updates differ from one another far beyond it.
    assert np.max(np.abs(want - next(iter(ups.values())))) > 1000 * bound


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_site_stays_and_the_mean_is_the_plain_fedavg(ids: Identities, n: int) -> None:
    config = _config(n)
    ups, ws = _updates(config, n)
    mean, weight, _, _ = run_round(ids, config, ups, ws)
    _assert_fedavg(config, mean, weight, ups, ws)


@pytest.mark.parametrize("step", ["advert", "share", "mask", "reveal"])
def test_a_site_that_drops_at_any_step_is_left_out_and_the_rest_add_up(
    ids: Identities, step: str
) -> None:
    config = _config(5)
    ups, ws = _updates(config, 7)
    gone = "charlie"
    mean, weight, seen, _ = run_round(ids, config, ups, ws, **{f"gone_before_{step}": [gone]})
    # A site gone before it sent its masked update is not in the sum; one gone after is.
    in_sum = [m for m in config.members if step == "reveal" or m != gone]
    assert list(seen.survivors) == in_sum
    _assert_fedavg(config, mean, weight, {m: ups[m] for m in in_sum}, {m: ws[m] for m in in_sum})


def test_drops_between_masking_and_unmasking_and_before_masking_at_once(
    ids: Identities,
) -> None:
    """The issue's case: one site drops after sending its masked update, before it reveals
    (its self-mask is rebuilt from its neighbours' shares), and another after sharing, before
    masking (its pairwise masks are rebuilt from its key's shares)."""
    config = _config(5)
    ups, ws = _updates(config, 11)
    mean, weight, seen, _ = run_round(
        ids, config, ups, ws, gone_before_mask=["bravo"], gone_before_reveal=["echo"]
    )
    assert "echo" in seen.survivors and "echo" not in seen.reveals
    assert "bravo" in seen.sealed and "bravo" not in seen.survivors
    in_sum = [m for m in config.members if m != "bravo"]
    _assert_fedavg(config, mean, weight, {m: ups[m] for m in in_sum}, {m: ws[m] for m in in_sum})


def test_sparse_neighbourhoods_add_up_with_dropouts(ids: Identities) -> None:
    config = _config(7, degree=4, threshold=3, min_survivors=4)
    assert all(len(config.neighbours(m)) == 4 for m in config.members)
    assert all(a in config.neighbours(b) for b in config.members for a in config.neighbours(b))
    ups, ws = _updates(config, 3)
    mean, weight, _seen, _ = run_round(
        ids, config, ups, ws, gone_before_mask=["delta"], gone_before_reveal=["golf"]
    )
    in_sum = [m for m in config.members if m != "delta"]
    _assert_fedavg(config, mean, weight, {m: ups[m] for m in in_sum}, {m: ws[m] for m in in_sum})


def test_too_many_dropouts_fail_naming_the_shortfall(ids: Identities) -> None:
    config = _config(5)
    ups, ws = _updates(config)
    with pytest.raises(InvalidState, match="fewer than the 3 the round needs"):
        run_round(ids, config, ups, ws, gone_before_mask=["alpha", "bravo", "charlie"])
    # Survivors enough to sum, but too few stay to reveal: no site reveals anything.
    with pytest.raises(InvalidState, match="strict majority"):
        run_round(
            ids,
            config,
            ups,
            ws,
            gone_before_mask=["alpha", "bravo"],
            gone_before_reveal=["charlie"],
        )


def test_values_beyond_the_clip_are_clipped_and_counted_at_the_site(ids: Identities) -> None:
    config = _config(3, clip=0.5)
    ups, ws = _updates(config)
    ups["alpha"][:10] = 3.0
    mean, weight, _, sites = run_round(ids, config, ups, ws)
    assert sites["alpha"].clipped == 10 and sites["bravo"].clipped == 0
    _assert_fedavg(config, mean, weight, ups, ws)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(3, 6),
    data=st.data(),
)
def test_property_any_honest_round_decodes_to_the_fedavg(
    ids: Identities, n: int, data: st.DataObject
) -> None:
    config = _config(n, length=17, max_weight=1000)
    values = st.floats(-5, 5, allow_nan=False, width=32)
    ups = {
        m: np.array(data.draw(st.lists(values, min_size=17, max_size=17))) for m in config.members
    }
    ws = {m: data.draw(st.integers(1, 1000)) for m in config.members}
    spare = len(config.members) - config.min_survivors
    gone = data.draw(st.lists(st.sampled_from(config.members), max_size=spare, unique=True))
    mean, weight, _, _ = run_round(ids, config, ups, ws, gone_before_mask=gone)
    kept = [m for m in config.members if m not in gone]
    want = fedavg({m: ups[m] for m in kept}, {m: ws[m] for m in kept}, config.clip)
    assert weight == sum(ws[m] for m in kept)
    assert np.max(np.abs(mean - want)) <= resolution(config, len(kept), weight) * 1.01 + 1e-12


def test_encoding_round_trips_negative_numbers_and_refuses_bad_updates() -> None:
    config = _config(3, length=4)
    words, clipped = encode(config, np.array([-1.5, 0.0, 2.25, -4.0]), 10_000)
    mean, weight = decode(config, words)
    assert weight == 10_000 and clipped == 0
    assert np.allclose(mean, [-1.5, 0.0, 2.25, -4.0], atol=1e-9)
    for bad, why in (
        (np.array([1.0, np.nan, 0, 0]), "NaN"),
        (np.zeros(3), "shape"),
    ):
        with pytest.raises(InvalidInput, match=why):
            encode(config, bad, 1)
    with pytest.raises(InvalidInput, match="weight 0"):
        encode(config, np.zeros(4), 0)
    with pytest.raises(InvalidInput, match="weight 10001"):
        encode(config, np.zeros(4), 10_001)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (dict(members=("b", "a")), "sorted"),
        (dict(members=("a",)), "2 to 255"),
        (dict(threshold=1), "strict majority"),
        (dict(threshold=4), "strict majority"),
        (dict(min_survivors=1), "min_survivors"),
        (dict(degree=3, members=NAMES[:6], threshold=3, min_survivors=3), "degree 3"),
        (dict(clip=2.0**30), "too large"),
        (dict(max_weight=2**62), "too large"),
        (dict(length=0), "length"),
    ],
)
def test_round_settings_that_could_not_be_safe_are_refused(change: dict, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidInput, match=why):
        _config(3, **change)


def test_settings_are_bound_into_the_context() -> None:
    assert _config(3).context != _config(3, round=1).context
    assert _config(3).context != _config(3, job_id="job-2").context
    assert _config(3).context != _config(3, clip=4.5).context
    assert _config(3).context == _config(3).context
