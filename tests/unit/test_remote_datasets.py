"""Datasets kept at remote sites, as the gateway records them from a site's push: metadata only,
for a data owner of the deployment, each dataset at one site, versions in order. A hostile or
confused site cannot take another site's dataset, another owner's name, or skip a version; a bad
push records nothing (neither a dataset nor an audit record of one). A job whose datasets are
kept at different sites is refused at submission.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditLog
from enclave.contract import StoredDataset
from enclave.fake import FakeSite
from gateway.core import Gateway
from gateway.store import Store
from policies.errors import InvalidInput, PermissionDenied
from policies.identity import Principal, Role
from tests.integration._deployment import policy

SITE_A = Principal("site-a", Role.SITE)
SITE_B = Principal("site-b", Role.SITE)
OLIVIA = Principal("olivia", Role.DATA_OWNER, "library")
THEO = Principal("theo", Role.MODEL_TEAM, "model-team")
OWNERS = {"olivia", "otto"}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stored(name: str = "books", version: int = 1, *, files: int = 2) -> StoredDataset:
    listing = tuple((f"f{i}.txt", 10 + i, _sha(f"{name}{version}{i}")) for i in range(files))
    return StoredDataset(
        name=name,
        version=version,
        root_hash=_sha(f"{name}@{version}"),
        size=sum(s for _, s, _ in listing),
        files=listing,
    )


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    home = tmp_path / "gw"
    home.mkdir()
    audit = AuditLog(home / "audit.db", signing_key=ed25519.Ed25519PrivateKey.generate())
    g = Gateway(home=home, store=Store(home / "state.db"), audit=audit, site=FakeSite(tmp_path))
    yield g
    g.stop()
    g.audit.close()


def push(g: Gateway, site: Principal, owner: str, s: StoredDataset) -> object:
    return g.push_dataset(
        site=site, owner=owner, stored=s, description="", is_owner=OWNERS.__contains__
    )


def _registrations(g: Gateway) -> list[str]:
    return [r.event.dataset or "" for r in g.audit.query(action="dataset.register")]


def test_a_pushed_version_is_recorded_with_its_site_once_and_audited(gw: Gateway) -> None:
    push(gw, SITE_A, "olivia", stored())
    push(gw, SITE_A, "olivia", stored())  # repeated after a reconnect: acknowledged
    push(gw, SITE_A, "olivia", stored(version=2))
    recs = gw.store.datasets()
    assert [(r.name, r.version, r.site, r.owner) for r in recs] == [
        ("books", 1, "site-a", "olivia"),
        ("books", 2, "site-a", "olivia"),
    ]
    assert _registrations(gw) == ["books@v1", "books@v2"]
    (first, _) = gw.audit.query(action="dataset.register")
    assert first.event.principal == "site-a" and first.event.details["owner"] == "olivia"


@pytest.mark.parametrize(
    ("site", "owner", "make", "error", "words"),
    [
        (SITE_B, "olivia", lambda: stored(version=2), PermissionDenied, "kept at site-a"),
        (SITE_A, "otto", lambda: stored(version=2), PermissionDenied, "belongs to olivia"),
        (SITE_A, "olivia", lambda: stored(version=3), InvalidInput, "next version is 2"),
        (
            SITE_A,
            "olivia",
            lambda: dataclasses.replace(stored(), root_hash=_sha("another")),
            InvalidInput,
            "another root hash",
        ),
        (SITE_A, "mallory", lambda: stored("notes"), InvalidInput, "not a data owner"),
        (SITE_A, "olivia", lambda: stored("Bad Name"), InvalidInput, "dataset name"),
        (
            SITE_A,
            "olivia",
            lambda: dataclasses.replace(stored("notes"), size=1),
            InvalidInput,
            "sum of its files",
        ),
        (
            SITE_A,
            "olivia",
            lambda: dataclasses.replace(
                stored("notes"), files=(("../../etc/passwd", 1, _sha("x")),), size=1
            ),
            InvalidInput,
            "relative",
        ),
        (
            SITE_A,
            "olivia",
            lambda: dataclasses.replace(stored("notes"), root_hash="not-hex"),
            InvalidInput,
            "hex SHA-256",
        ),
        (SITE_A, "olivia", lambda: stored("notes", files=0), InvalidInput, "at least one file"),
    ],
    ids=[
        "another-sites-dataset",
        "another-owners-dataset",
        "a-skipped-version",
        "the-same-version-other-content",
        "an-owner-the-ca-never-issued",
        "a-bad-name",
        "sizes-that-do-not-add-up",
        "a-path-that-leaves",
        "a-root-hash-not-hex",
        "no-files",
    ],
)
def test_a_bad_push_is_refused_by_name_and_records_nothing(
    gw: Gateway,
    site: Principal,
    owner: str,
    make: object,
    error: type[Exception],
    words: str,
) -> None:
    push(gw, SITE_A, "olivia", stored())
    before = (gw.store.datasets(), _registrations(gw))
    with pytest.raises(error, match=words):
        push(gw, site, owner, make())  # type: ignore[operator]
    assert (gw.store.datasets(), _registrations(gw)) == before


def test_a_local_registration_cannot_take_a_remote_sites_dataset(
    gw: Gateway, tmp_path: Path
) -> None:
    import io
    import tarfile

    from gateway._spool import SealedSpool

    push(gw, SITE_A, "olivia", stored())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with SealedSpool(tmp_path) as spool:
        spool.write(buf.getvalue())
        with pytest.raises(PermissionDenied, match="kept at site site-a"):
            gw.register_dataset(
                principal=OLIVIA, name="books", description="", archive=spool, archive_sha256=""
            )
    assert [r.version for r in gw.store.datasets()] == [1]


def test_a_job_over_datasets_at_two_sites_is_refused_at_submission(gw: Gateway) -> None:
    push(gw, SITE_A, "olivia", stored("books"))
    push(gw, SITE_B, "olivia", stored("notes"))
    for name in ("books", "notes"):
        gw.put_policy(principal=OLIVIA, dataset=name, text=policy(name))
    spec = """\
name: both
datasets: [books, notes]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
resources: {cpus: 1, memory_mb: 1024, timeout_s: 60}
"""
    with pytest.raises(InvalidInput, match="books at site-a; notes at site-b"):
        gw.submit(principal=THEO, spec_text=spec, bundle=None, bundle_sha256="")
    assert gw.store.jobs() == []
