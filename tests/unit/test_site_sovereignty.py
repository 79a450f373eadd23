"""A site trusts no gateway: attacks by a gateway that forges, replays or alters what the data
owners signed, each refused by the site before any data key is released.

The owners' signatures are real (their CA-issued ECDSA keys, signed as their client signs); the
gateway under attack is the test, which builds the run orders a hostile gateway could send. Each
class of attack is tried: approvals (forged by another owner, by another role, by another CA,
replayed from another job, a denial passed off as an approval, missing), the binding (a swapped
spec, bundle, dataset version or policy version), policies (altered, signed by someone else,
missing a signature) and ownership (an order naming another owner's dataset). Through the site
agent, a refused order ends ERROR before anything is staged, with the check named.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from enclave.agent import SiteAgent, signer_dir
from enclave.contract import RunOrder, SiteReport
from enclave.identity import IdentityFiles
from enclave.runtime.fake import FakeRuntime
from enclave.signatures import sign
from enclave.sovereignty import PolicyBook, check_order
from gateway.identity import CertificateAuthority
from policies import document
from policies.approval import ApprovalBinding
from policies.errors import InvalidInput, PolicyViolation, SignatureError, SiteError
from policies.identity import Role
from policies.lifecycle import JobState
from policies.signing import approval_message, policy_message
from policies.spec import parse_spec
from tests.integration._deployment import policy

SPEC = parse_spec("""\
name: sovereign
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}
""")
OTHER_SPEC = parse_spec(SPEC.canonical_json().decode().replace('"sovereign"', '"other"'))


@dataclasses.dataclass
class People:
    ca: CertificateAuthority
    ids: dict[str, IdentityFiles]
    foreign: IdentityFiles

    def cert(self, name: str) -> str:
        ids = self.foreign if name == "foreign-olivia" else self.ids[name]
        return ids.cert.read_text()

    def sign(self, name: str, message: bytes) -> tuple[str, str]:
        ids = self.foreign if name == "foreign-olivia" else self.ids[name]
        return self.cert(name), sign(ids.key.read_bytes(), message)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> People:
    root = tmp_path_factory.mktemp("people")
    ca = CertificateAuthority.init(root / "ca")
    ids = {
        name: ca.issue(name, role=role, out_dir=root / "ids")
        for name, role in (
            ("olivia", Role.DATA_OWNER),
            ("otto", Role.DATA_OWNER),
            ("theo", Role.MODEL_TEAM),
        )
    }
    other = CertificateAuthority.init(root / "other-ca")
    foreign = other.issue("olivia", role=Role.DATA_OWNER, out_dir=root / "foreign")
    return People(ca, ids, foreign)


def _binding(order: RunOrder) -> str:
    return ApprovalBinding.create(
        job_id=order.job_id,
        spec_digest=order.spec_sha256,
        bundle_digest=order.bundle_sha256 or None,
        dataset_versions=dict(order.datasets),
        policies=[
            document.parse_policy(order.policy_documents[n], version=order.policy_versions[n]).ref()
            for n, _ in order.datasets
        ],
    ).digest()


def signed_order(people: People, job_id: str = "job-1", *, mode: str = "manual") -> RunOrder:
    """The order an honest gateway sends: the owner's signed policy and signed approval."""
    text = policy("books", mode=mode)
    order = RunOrder(
        job_id=job_id,
        spec=SPEC,
        spec_sha256=SPEC.digest(),
        bundle=None,
        bundle_sha256="",
        datasets=(("books", 1),),
        policy_versions={"books": 1},
        policy_documents={"books": text},
        approval_binding="",
        approvals=("olivia",),
        audit_root="0" * 64,
        dataset_owners={"books": "olivia"},
        policy_signatures={"books": people.sign("olivia", policy_message("books", 1, text))},
    )
    binding = _binding(order)
    return dataclasses.replace(
        order,
        approval_binding=binding,
        approval_signatures={"olivia": people.sign("olivia", approval_message(binding, "approve"))},
    )


def _check(people: People, order: RunOrder, owners: dict[str, str] | None = None) -> None:
    parsed = {n: document.parse_policy(order.policy_documents[n]) for n, _ in order.datasets}
    check_order(
        order,
        parsed,
        ca_cert_pem=people.ca.cert_path.read_bytes(),
        owners=(owners or {}).get,
    )


def test_what_the_owners_signed_passes(people: People) -> None:
    _check(people, signed_order(people))
    _check(people, signed_order(people), owners={"books": "olivia"})
    automatic = signed_order(people, mode="automatic")
    _check(people, dataclasses.replace(automatic, approval_signatures={}))  # none needed


def _approval_by(
    signer: str,
    *,
    of: Callable[[RunOrder], str] = lambda o: o.approval_binding,
    decision: str = "approve",
) -> Callable[[People, RunOrder], RunOrder]:
    def attack(people: People, order: RunOrder) -> RunOrder:
        sig = people.sign(signer, approval_message(of(order), decision))
        return dataclasses.replace(order, approval_signatures={"olivia": sig})

    return attack


def _other_jobs_binding(order: RunOrder) -> str:
    return _binding(dataclasses.replace(order, job_id="job-other"))


def _rebound(change: Callable[[RunOrder], RunOrder]) -> Callable[[People, RunOrder], RunOrder]:
    """A change the gateway makes after approval, keeping the binding the owner approved."""
    return lambda people, order: change(order)


def _rebound_and_binding_recomputed(
    change: Callable[[RunOrder], RunOrder],
) -> Callable[[People, RunOrder], RunOrder]:
    """A change with the binding recomputed by the gateway (the owner's approval stays)."""

    def attack(people: People, order: RunOrder) -> RunOrder:
        changed = change(order)
        return dataclasses.replace(changed, approval_binding=_binding(changed))

    return attack


def _looser_policy(order: RunOrder) -> RunOrder:
    text = order.policy_documents["books"].replace("[testing]", "[testing, anything]")
    return dataclasses.replace(order, policy_documents={"books": text})


ATTACKS: dict[str, tuple[Callable[[People, RunOrder], RunOrder], type[Exception], str]] = {
    "approval-forged-by-another-owner": (_approval_by("otto"), SignatureError, "not by olivia"),
    "approval-signed-by-the-team": (_approval_by("theo"), SignatureError, "not by olivia"),
    "approval-from-another-ca": (
        _approval_by("foreign-olivia"),
        SignatureError,
        "not issued by the deployment CA",
    ),
    "approval-replayed-from-another-job": (
        _approval_by("olivia", of=_other_jobs_binding),
        SignatureError,
        "does not verify",
    ),
    "a-denial-passed-as-an-approval": (
        _approval_by("olivia", decision="deny"),
        SignatureError,
        "does not verify",
    ),
    "no-approval": (
        lambda p, o: dataclasses.replace(o, approval_signatures={}),
        SignatureError,
        "not signed",
    ),
    "approval-signature-garbled": (
        lambda p, o: dataclasses.replace(
            o, approval_signatures={"olivia": (p.cert("olivia"), "bm90IGEgc2lnbmF0dXJl")}
        ),
        SignatureError,
        "does not verify",
    ),
    "spec-swapped": (
        _rebound(
            lambda o: dataclasses.replace(o, spec=OTHER_SPEC, spec_sha256=OTHER_SPEC.digest())
        ),
        PolicyViolation,
        "binding",
    ),
    "bundle-swapped": (
        _rebound(lambda o: dataclasses.replace(o, bundle_sha256=hashlib.sha256(b"x").hexdigest())),
        PolicyViolation,
        "binding",
    ),
    "dataset-version-swapped": (
        _rebound(lambda o: dataclasses.replace(o, datasets=(("books", 2),))),
        PolicyViolation,
        "binding",
    ),
    # The owner signs the version with the text: a renumbered policy no longer verifies.
    "policy-version-swapped": (
        _rebound(lambda o: dataclasses.replace(o, policy_versions={"books": 7})),
        SignatureError,
        "does not verify",
    ),
    "policy-version-swapped-and-binding-recomputed": (
        _rebound_and_binding_recomputed(
            lambda o: dataclasses.replace(o, policy_versions={"books": 7})
        ),
        SignatureError,
        "does not verify",
    ),
    "spec-swapped-and-binding-recomputed": (
        _rebound_and_binding_recomputed(
            lambda o: dataclasses.replace(o, spec=OTHER_SPEC, spec_sha256=OTHER_SPEC.digest())
        ),
        SignatureError,
        "does not verify",
    ),
    "policy-loosened-unsigned": (_rebound(_looser_policy), SignatureError, "does not verify"),
    "policy-loosened-and-signed-by-another-owner": (
        lambda p, o: dataclasses.replace(
            _looser_policy(o),
            policy_signatures={
                "books": p.sign(
                    "otto", policy_message("books", 1, _looser_policy(o).policy_documents["books"])
                )
            },
        ),
        SignatureError,
        "not by olivia",
    ),
    "policy-without-a-signature": (
        lambda p, o: dataclasses.replace(o, policy_signatures={}),
        SignatureError,
        "not signed",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_hostile_gateways_order_is_refused_with_the_check_named(
    people: People, attack: str
) -> None:
    change, error, words = ATTACKS[attack]
    with pytest.raises(error, match=words):
        _check(people, change(people, signed_order(people)))


def test_an_order_for_another_owners_dataset_is_judged_by_the_sites_record(
    people: People,
) -> None:
    """The gateway says olivia owns books and carries olivia's signatures; the site registered
    books for otto, so it is otto's signatures that count."""
    with pytest.raises(SignatureError, match="not by otto"):
        _check(people, signed_order(people), owners={"books": "otto"})


def _under(
    people: People, job_id: str, version: int, text: str, *, signed_as: int | None = None
) -> RunOrder:
    """An order under policy ``text`` as version ``version``, the policy signed by its owner
    as version ``signed_as`` (default: the same), approved by the owner where it needs it."""
    order = dataclasses.replace(
        signed_order(people, job_id),
        policy_versions={"books": version},
        policy_documents={"books": text},
        policy_signatures={
            "books": people.sign("olivia", policy_message("books", signed_as or version, text))
        },
    )
    binding = _binding(order)
    return dataclasses.replace(
        order,
        approval_binding=binding,
        approval_signatures={"olivia": people.sign("olivia", approval_message(binding, "approve"))},
    )


def test_a_policy_its_owner_replaced_is_never_run_under_again(
    people: People, tmp_path: Path
) -> None:
    """Policy replay: a gateway that keeps an owner's older policy (here automatic approval,
    which the owner replaced by manual) and sends new jobs under it. Both versions carry the
    owner's true signature; the site's own record of the versions it ran under refuses it."""
    book = PolicyBook(tmp_path / "policy-versions.json")
    loose = policy("books", mode="automatic")
    strict = policy("books", mode="manual")

    def check(order: RunOrder, at: PolicyBook = book) -> None:
        parsed = {"books": document.parse_policy(order.policy_documents["books"])}
        check_order(
            order, parsed, ca_cert_pem=people.ca.cert_path.read_bytes(), owners={}.get, book=at
        )

    automatic = dataclasses.replace(_under(people, "job-1", 1, loose), approval_signatures={})
    check(automatic)  # version 1 needs no approval
    check(_under(people, "job-2", 2, strict))
    assert book.held()["books"][0] == 2
    replayed = dataclasses.replace(_under(people, "job-3", 1, loose), approval_signatures={})
    with pytest.raises(PolicyViolation, match="version 1, but this site has run under version 2"):
        check(replayed)
    # The same version number with another text (both signed by the owner as version 2).
    with pytest.raises(PolicyViolation, match="not the text"):
        check(_under(people, "job-4", 2, loose))
    # The old text presented as a newer version: its signature names version 1.
    relabelled = _under(people, "job-5", 3, loose, signed_as=1)
    with pytest.raises(SignatureError, match="does not verify"):
        check(relabelled)
    # A refused order never advances the record: version 3, but its binding is not its own.
    unbound = dataclasses.replace(_under(people, "job-6", 3, loose), approval_binding="0" * 64)
    with pytest.raises(PolicyViolation, match="binding"):
        check(unbound)
    assert book.held()["books"] == (2, hashlib.sha256(strict.encode()).hexdigest())
    # The record is the site's file: a site restarted refuses the replay as well.
    with pytest.raises(PolicyViolation, match="older policy is never used again"):
        check(replayed, PolicyBook(tmp_path / "policy-versions.json"))
    check(_under(people, "job-7", 3, loose))  # the owner's own newer version runs
    (tmp_path / "policy-versions.json").write_text('{"books": 2}')
    with pytest.raises(SiteError, match="malformed"):
        check(_under(people, "job-8", 4, strict))


def test_an_owner_pins_a_version_at_the_site_and_a_gateway_cannot_hold_it_back(
    people: People, tmp_path: Path
) -> None:
    """The site never saw an order under version 2 (the gateway keeps sending version 1); the
    owner tells the site directly. Orders under version 1 are refused from then on; the first
    under version 2 records its text; the pin never goes back."""
    book = PolicyBook.of_site(tmp_path)
    (tmp_path / "keys").mkdir()
    loose = policy("books", mode="automatic")
    strict = policy("books", mode="manual")

    def check(order: RunOrder) -> None:
        parsed = {"books": document.parse_policy(order.policy_documents["books"])}
        check_order(
            order, parsed, ca_cert_pem=people.ca.cert_path.read_bytes(), owners={}.get, book=book
        )

    def automatic(job_id: str) -> RunOrder:
        return dataclasses.replace(_under(people, job_id, 1, loose), approval_signatures={})

    check(automatic("job-1"))
    assert book.pin("books", 2) == 2
    with pytest.raises(PolicyViolation, match="owner told this site to run under version 2"):
        check(automatic("job-2"))
    check(_under(people, "job-3", 2, strict))
    assert book.held()["books"] == (2, hashlib.sha256(strict.encode()).hexdigest())
    with pytest.raises(PolicyViolation, match="not the text"):
        check(_under(people, "job-4", 2, loose))
    with pytest.raises(InvalidInput, match="already runs under policy version 2"):
        book.pin("books", 1)
    with pytest.raises(InvalidInput, match="numbered from 1"):
        book.pin("books", 0)
    assert book.pin("books", 2) == 2 and book.held()["books"][1]  # the same again: kept


def test_a_site_agent_ends_a_refused_order_error_before_anything_is_staged(
    people: People, tmp_path: Path
) -> None:
    import io
    import tarfile

    root = tmp_path / "site"
    signer = people.ca.site_signer("local-site", out_dir=signer_dir(root))
    site = SiteAgent.open(root, signer=signer, runtime=FakeRuntime(lambda job: 0))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    buf.seek(0)
    site.store_dataset("books", archive=buf)
    forged, _, _ = ATTACKS["approval-forged-by-another-owner"]
    reports: list[SiteReport] = []
    site.run(forged(people, signed_order(people, "job-forged")), reports.append)
    states = [r.state for r in reports if r.state is not None]
    assert states == [JobState.ERROR]
    assert "not by olivia" in reports[-1].detail
    assert not any(r.audit_action.startswith("data.") for r in reports)  # nothing staged
    (error,) = [r for r in reports if r.audit_action == "run.error"]
    assert error.details["error"] == "SignatureError"
