"""A hostile gateway against a site's part in federated rounds. The plan every owner approved is
in the order; whatever round settings the gateway sends, a site takes part only in an
aggregation of that plan (at least its ``min_sites`` in the sum, its clip, this job and round),
never sends a second masked update for a round (two sums differing by one site give that site's
update), and never trains beyond the plan's rounds or its ε (enclave.federated.RoundBook,
tested in test_federated_site_record.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from enclave.contract import Report, RoundOrder, RoundUpdate, RunOrder
from enclave.federated import Participant, RoundBook
from enclave.provenance.federated import Countersign
from enclave.secagg import Aggregator, RoundConfig
from gateway.identity import CertificateAuthority
from policies.errors import PolicyViolation, SignatureError
from policies.spec import parse_spec

SPEC = parse_spec("""\
name: fed
datasets: [books-a, books-b, books-c]
base_model: tiny-lm
trainer: causal-lm-lora
purpose: testing
federation: {rounds: 2, local_steps: 3, min_sites: 3, update_clip: 0.5}
""")
MEMBERS = ("site-a", "site-b", "site-c")


def _no_finish(order: RunOrder, final: Path, report: Report, dest: Path) -> Countersign:
    raise AssertionError("no release in these tests")


@pytest.fixture
def world(tmp_path: Path) -> tuple[dict[str, Participant], RoundOrder]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    start = tmp_path / "start.safetensors"
    save_file({"w.lora_A.weight": np.zeros((2, 4), np.float32)}, str(start))
    order = RunOrder(
        job_id="job-1",
        spec=SPEC,
        spec_sha256=SPEC.digest(),
        bundle=None,
        bundle_sha256="",
        datasets=(("books-a", 1), ("books-b", 1), ("books-c", 1)),
        policy_versions={},
        policy_documents={},
        approval_binding="",
        approvals=(),
        audit_root="0" * 64,
    )
    rnd = RoundOrder(order, 0, start, "")

    def sites() -> dict[str, Participant]:
        out = {}
        for i, name in enumerate(MEMBERS):
            book = RoundBook.of_site(tmp_path / name)

            def train(
                r: RoundOrder, report: Report, book: RoundBook = book, i: int = i
            ) -> RoundUpdate:
                book.train(
                    r.order.job_id,
                    r.round,
                    local_steps=3,
                    planned_rounds=2,
                    dp=None,
                    max_epsilon=float("inf"),
                    delta=1e-5,
                )
                return RoundUpdate(vector=np.full(9, 0.1 * (i + 1)), weight=10 * (i + 1))

            out[name] = Participant(
                name=name,
                train=train,
                layout=lambda o: ({}, b""),
                finish=_no_finish,
                rounds=book,
                identity=ca.site_signer(name, out_dir=tmp_path / name / "identity"),
            )
        return out

    return sites(), rnd


def _config(**change: object) -> RoundConfig:
    base: dict[str, object] = dict(
        job_id="job-1",
        round=0,
        members=MEMBERS,
        threshold=2,
        min_survivors=3,
        length=9,
        clip=0.5,
        max_weight=2**20,
    )
    base.update(change)
    return RoundConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (dict(min_survivors=2), "fewer than the plan's 3 sites"),
        (dict(clip=4.0), "clips at 4.0, the plan at 0.5"),
        (dict(job_id="job-2"), "another job's or another round's"),
        (dict(round=1), "another job's or another round's"),
        (dict(length=8), "its length"),
        (dict(members=("site-b", "site-c", "site-d")), "not among its members"),
    ],
)
def test_settings_outside_the_plan_are_refused_before_training(
    world: tuple[dict[str, Participant], RoundOrder],
    change: dict,
    why: str,  # type: ignore[type-arg]
) -> None:
    sites, rnd = world
    with pytest.raises(PolicyViolation, match=why):
        sites["site-a"].join(rnd, _config(**change), lambda r: None)
    assert RoundBook.of_site(rnd.start.parent / "site-a").job("job-1") is None  # not trained


def test_a_retried_round_gets_no_second_masked_update(
    world: tuple[dict[str, Participant], RoundOrder],
) -> None:
    """Attempt 0 gets every site's masked update, then the gateway calls it failed and retries
    with a different survivor set: every site that masked sits the retry out, so no two sums
    of one round ever exist."""
    sites, rnd = world
    agg = Aggregator(_config())
    adverts = agg.adverts({m: s.join(rnd, _config(), lambda r: None) for m, s in sites.items()})
    inbox = agg.route({m: s.share("job-1", 0, adverts) for m, s in sites.items()})
    for m, s in sites.items():
        s.mask("job-1", 0, inbox[m])
    retry = _config(attempt=1)
    agg2 = Aggregator(retry)
    adverts2 = agg2.adverts({m: s.join(rnd, retry, lambda r: None) for m, s in sites.items()})
    inbox2 = agg2.route({m: s.share("job-1", 0, adverts2) for m, s in sites.items()})
    for m, s in sites.items():
        with pytest.raises(PolicyViolation, match="no second one"):
            s.mask("job-1", 0, inbox2[m])


def test_a_round_run_honestly_gives_the_weighted_mean(
    world: tuple[dict[str, Participant], RoundOrder],
) -> None:
    sites, rnd = world
    config = _config()
    agg = Aggregator(config)
    adverts = agg.adverts({m: s.join(rnd, config, lambda r: None) for m, s in sites.items()})
    inbox = agg.route({m: s.share("job-1", 0, adverts) for m, s in sites.items()})
    survivors = agg.survivors({m: s.mask("job-1", 0, inbox[m]) for m, s in sites.items()})
    signed = {m: s.confirm("job-1", 0, survivors) for m, s in sites.items()}
    mean, weight = agg.unmask(
        {m: s.reveal("job-1", 0, survivors, signed) for m, s in sites.items()}
    )
    assert weight == 60
    assert np.allclose(mean, (0.1 * 10 + 0.2 * 20 + 0.3 * 30) / 60, atol=1e-9)


def test_an_advert_from_a_site_of_another_deployment_is_refused(
    world: tuple[dict[str, Participant], RoundOrder], tmp_path: Path
) -> None:
    sites, rnd = world
    rogue_ca = CertificateAuthority.init(tmp_path / "rogue-ca")
    rogue = Participant(
        name="site-c",
        train=lambda r, rep: RoundUpdate(vector=np.zeros(9), weight=1),
        layout=lambda o: ({}, b""),
        finish=_no_finish,
        rounds=RoundBook.of_site(tmp_path / "rogue"),
        identity=rogue_ca.site_signer("site-c", out_dir=tmp_path / "rogue" / "identity"),
    )
    config = _config()
    adverts = {m: sites[m].join(rnd, config, lambda r: None) for m in ("site-a", "site-b")}
    adverts["site-c"] = rogue.join(rnd, config, lambda r: None)
    with pytest.raises(SignatureError, match="not issued by the deployment CA"):
        sites["site-a"].share("job-1", 0, adverts)  # type: ignore[arg-type]
