"""The gateway's copy of a site's audit log, and the offline check of the two logs together,
attacked: a site that rewrites, drops, reorders, renumbers or pads what it pushed, signs with
another key, or pushes more or fewer records than it vouches for gets a refusal that leaves
the copy exactly as it was (then an honest push still extends it); an export of either log that
was edited, or a site log that lost what the gateway recorded, fails the cross-check, naming
what does not hold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import (
    AuditEvent,
    AuditLog,
    AuditMirror,
    CheckpointError,
    ProofError,
    SignedCheckpoint,
    _merkle,
    cross_check,
    verify_export,
)
from enclave.audit._model import decode_leaf, encode_leaf
from policies.errors import AuditLogError, IntegrityError, InvalidInput

SITE_KEY = ed25519.Ed25519PrivateKey.generate()
GATEWAY_KEY = ed25519.Ed25519PrivateKey.generate()


def _event(i: int, action: str = "data.read") -> AuditEvent:
    return AuditEvent(
        "site-a", "site", action, "ok", job_id=f"job-{i % 7}", dataset="books@v1",
        file=f"f{i}.txt", details={"n": i},
    )  # fmt: skip


@pytest.fixture
def site(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "site.db", signing_key=SITE_KEY, checkpoint_interval_s=0)
    yield log
    log.close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[AuditMirror]:
    m = AuditMirror(tmp_path / "copy.db", public_key=SITE_KEY.public_key())
    yield m
    m.close()


def _grow(log: AuditLog, n: int, start: int = 0) -> SignedCheckpoint:
    for i in range(start, start + n):
        log.append(_event(i))
    return log.checkpoint()


def _push(mirror: AuditMirror, log: AuditLog, cp: SignedCheckpoint) -> int:
    return mirror.extend(cp, log.leaves(mirror.size(), cp.size))


def _unchanged(mirror: AuditMirror, size: int, root: bytes) -> None:
    held = mirror.held()
    assert mirror.size() == size and (held.size if held else 0) == size
    assert mirror.root(size) == root
    if size:
        assert mirror.verify().size == size


def test_the_copy_grows_by_signed_stretches_and_reads_as_the_log_it_copies(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    for n in (1, 700, 3, 1100):
        cp = _grow(site, n, site.size())
        assert _push(mirror, site, cp) == cp.size
    assert mirror.size() == site.size() == 1804
    assert mirror.root() == site.root()
    assert _push(mirror, site, site.checkpoint()) == 1804  # the same checkpoint: acknowledged
    # Queries, proofs and records are the site's own.
    assert [r.seq for r in mirror.query(file="f5.txt")] == [
        r.seq for r in site.query(file="f5.txt")
    ]
    assert mirror.record(1000) == site.record(1000)
    assert mirror.consistency_proof(701, 1804) == site.consistency_proof(701, 1804)
    # Its export verifies offline under the site's key alone, with every stretch's checkpoint.
    mirror.export(tmp_path / "copy.jsonl")
    result = verify_export(tmp_path / "copy.jsonl", public_key=SITE_KEY.public_key())
    assert (result.size, result.root) == (1804, site.root())
    # Closed and opened again, it is the same copy, and grows on.
    held = mirror.held()
    mirror.close()
    again = AuditMirror(tmp_path / "copy.db", public_key=SITE_KEY.public_key())
    try:
        assert again.size() == 1804 and again.held() == held
        cp = _grow(site, 5, 1804)
        assert _push(again, site, cp) == 1809
    finally:
        again.close()


def test_a_copy_whose_query_index_lost_rows_fills_it_again_on_open(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    import sqlite3

    _push(mirror, site, _grow(site, 40))
    mirror.close()
    db = sqlite3.connect(tmp_path / "copy.db")
    with db:
        db.execute("DELETE FROM lookup WHERE seq >= 10")
    db.close()
    again = AuditMirror(tmp_path / "copy.db", public_key=SITE_KEY.public_key())
    try:
        assert [r.seq for r in again.query(file="f33.txt")] == [33]
        assert again.verify().size == 40  # the index checked against the records, whole
    finally:
        again.close()


def _other_log(tmp_path: Path, name: str, events: list[AuditEvent]) -> AuditLog:
    log = AuditLog(tmp_path / f"{name}.db", signing_key=SITE_KEY, checkpoint_interval_s=0)
    for e in events:
        log.append(e)
    return log


def test_a_site_that_rewrites_drops_or_reorders_what_it_pushed_is_refused_and_nothing_changes(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    first = _grow(site, 300)
    _push(mirror, site, first)
    root = mirror.root()
    events = [site.record(i).event for i in range(300)]
    # The same key, a history that differs in one pushed record, one dropped, two swapped.
    edited = [*events[:10], _event(10, "data.read.edited"), *events[11:]]
    dropped = events[:150] + events[151:]
    swapped = [*events[:20], events[21], events[20], *events[22:]]
    for name, history in (("edited", edited), ("dropped", dropped), ("swapped", swapped)):
        forged = _other_log(tmp_path, name, [*history, *(_event(1000 + i) for i in range(5))])
        cp = forged.checkpoint()
        with pytest.raises(IntegrityError, match="root"):
            mirror.extend(cp, forged.leaves(300, cp.size))
        _unchanged(mirror, 300, root)
        forged.close()
    # A log that shrank below what it vouched for before.
    small = _other_log(tmp_path, "small", events[:100])
    with pytest.raises(IntegrityError, match="vouches for 100"):
        mirror.extend(small.checkpoint(), iter(()))
    small.close()
    _unchanged(mirror, 300, root)
    # The honest log still extends the copy.
    cp = _grow(site, 20, 300)
    assert _push(mirror, site, cp) == 320


def test_records_that_are_not_the_next_ones_or_not_what_the_checkpoint_vouches_for(
    site: AuditLog, mirror: AuditMirror
) -> None:
    _push(mirror, site, _grow(site, 50))
    root = mirror.root()
    cp = _grow(site, 10, 50)
    leaves = list(site.leaves(50, 60))
    cases = {
        "fewer": (leaves[:-1], "vouches for 60 records; 59 were sent"),
        "more": ([*leaves, leaves[-1]], "more records than the checkpoint vouches for"),
        "skips one": ([leaves[0], *leaves[2:], leaves[1]], "record 51 is numbered 52"),
        "from the start": (list(site.leaves(0, 10)), "record 50 is numbered 0"),
        "not canonical": (
            [leaves[0].replace(b'"action":', b'"action": '), *leaves[1:]],
            "canonical",
        ),
        "not a record": ([b"{}", *leaves[1:]], "not an event|keys"),
        "not json": ([b"\xff" * 40, *leaves[1:]], "not an event"),
    }
    for name, (sent, reason) in cases.items():
        with pytest.raises(InvalidInput, match=reason):
            mirror.extend(cp, iter(sent))
        _unchanged(mirror, 50, root)
        assert name  # each case named in a failure's traceback
    # Records the site did write, but under a checkpoint signed by another key.
    other = ed25519.Ed25519PrivateKey.generate()
    forged = SignedCheckpoint(cp.size, cp.root, cp.time, b"")
    forged = SignedCheckpoint(cp.size, cp.root, cp.time, other.sign(forged.note()))
    with pytest.raises(CheckpointError):
        mirror.extend(forged, iter(leaves))
    _unchanged(mirror, 50, root)
    assert mirror.extend(cp, iter(leaves)) == 60


def test_a_proof_or_read_past_the_records_kept_is_refused(
    site: AuditLog, mirror: AuditMirror
) -> None:
    _push(mirror, site, _grow(site, 8))
    with pytest.raises(InvalidInput):
        mirror.consistency_proof(4, 9)
    with pytest.raises(InvalidInput):
        list(mirror.leaves(0, 9))


# -- the two logs together, offline ---------------------------------------------------------------


def _recorded(cp: SignedCheckpoint) -> AuditEvent:
    """The event the gateway appends for a site checkpoint it copied."""
    return AuditEvent("site-a", "site", "site.checkpoint", "ok", details=cp.to_dict())


def _gateway_log(tmp_path: Path, site: AuditLog, mirror: AuditMirror) -> AuditLog:
    """A gateway log that records, as the gateway does, each site checkpoint it copied."""
    gw = AuditLog(tmp_path / "gateway.db", signing_key=GATEWAY_KEY, checkpoint_interval_s=0)
    for n in (40, 25, 60):
        cp = _grow(site, n, site.size())
        _push(mirror, site, cp)
        gw.append(AuditEvent("gateway", "operator", "rpc.SubmitJob", "allowed", job_id="j"))
        gw.append(_recorded(cp))
    return gw


def test_the_sites_log_and_the_gateways_tell_one_story(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    gw = _gateway_log(tmp_path, site, mirror)
    _grow(site, 7, site.size())  # the site has moved on since its last push: still the story
    gw_export = gw.export(tmp_path / "gw.jsonl")
    assert gw_export.size == 6
    own = site.export(tmp_path / "own.jsonl")
    copied = mirror.export(tmp_path / "copy.jsonl")
    for export in ("own.jsonl", "copy.jsonl"):
        both = cross_check(
            tmp_path / export,
            tmp_path / "gw.jsonl",
            site="site-a",
            site_key=SITE_KEY.public_key(),
            gateway_key=GATEWAY_KEY.public_key(),
        )
        assert [c.size for c in both.recorded] == [40, 65, 125]
        assert both.latest == 125 and both.gateway.size == 6
    assert (own.size, copied.size) == (132, 125)
    # Another site's name finds none of these checkpoints: nothing to hold it to.
    none = cross_check(
        tmp_path / "own.jsonl",
        tmp_path / "gw.jsonl",
        site="site-b",
        site_key=SITE_KEY.public_key(),
        gateway_key=GATEWAY_KEY.public_key(),
    )
    assert none.recorded == ()
    gw.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_site_log_that_lost_what_the_gateway_recorded_or_an_edited_export_fails(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    gw = _gateway_log(tmp_path, site, mirror)
    gw.export(tmp_path / "gw.jsonl")

    def check(site_export: Path, gw_export: Path = tmp_path / "gw.jsonl") -> None:
        cross_check(
            site_export,
            gw_export,
            site="site-a",
            site_key=SITE_KEY.public_key(),
            gateway_key=GATEWAY_KEY.public_key(),
        )

    # The site re-signs a history without record 50 (after the gateway recorded sizes 40 and
    # 65): the same first 50 records, every later one renumbered, new checkpoints under its own
    # key. Its export verifies on its own, yet it no longer holds what the gateway recorded.
    kept = [leaf for i, leaf in enumerate(site.leaves(0, site.size())) if i != 50]
    renumbered = [encode_leaf(i, *decode_leaf(leaf)[1:]) for i, leaf in enumerate(kept)]
    hashes = [_merkle.leaf_hash(leaf) for leaf in renumbered]
    unsigned = SignedCheckpoint(len(hashes), _merkle.root(hashes), site.checkpoint().time, b"")
    resigned = SignedCheckpoint(
        unsigned.size, unsigned.root, unsigned.time, SITE_KEY.sign(unsigned.note())
    )
    rewritten = AuditMirror(tmp_path / "rewritten.db", public_key=SITE_KEY.public_key())
    rewritten.extend(resigned, iter(renumbered))
    rewritten.export(tmp_path / "rewritten.jsonl")
    rewritten.close()
    verify_export(tmp_path / "rewritten.jsonl", public_key=SITE_KEY.public_key())
    with pytest.raises(ProofError, match="its first 65 records"):
        check(tmp_path / "rewritten.jsonl")
    # An export of the site's log taken before its last recorded checkpoint (size 125): the
    # records and checkpoints of the log at size 65, as an export then would have held them.
    site.export(tmp_path / "own.jsonl")
    lines = _lines(tmp_path / "own.jsonl")
    older = [raw for raw in lines if b'"checkpoint"' not in raw][:65] + [
        raw
        for raw in lines
        if b'"checkpoint"' in raw and json.loads(raw)["checkpoint"]["size"] <= 65
    ]
    (tmp_path / "older.jsonl").write_bytes(b"".join(older))
    assert verify_export(tmp_path / "older.jsonl", public_key=SITE_KEY.public_key()).size == 65
    with pytest.raises(ProofError, match="vouches for 125"):
        check(tmp_path / "older.jsonl")
    # A record of the site's export edited in place: named.
    lines[30] = lines[30].replace(b"data.read", b"data.redd")
    (tmp_path / "edited.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(AuditLogError, match="30"):
        check(tmp_path / "edited.jsonl")
    # The gateway's export with a site checkpoint's root changed, or one removed: its own
    # chain and checkpoints fail first.
    gw_lines = _lines(tmp_path / "gw.jsonl")
    i = next(i for i, raw in enumerate(gw_lines) if b"site.checkpoint" in raw)
    obj = json.loads(gw_lines[i])
    obj["leaf"]["details"]["root"] = "00" * 32
    tampered = [*gw_lines[:i], json.dumps(obj).encode() + b"\n", *gw_lines[i + 1 :]]
    (tmp_path / "gw-edited.jsonl").write_bytes(b"".join(tampered))
    with pytest.raises(AuditLogError):
        check(tmp_path / "own.jsonl", tmp_path / "gw-edited.jsonl")
    (tmp_path / "gw-dropped.jsonl").write_bytes(b"".join(gw_lines[:i] + gw_lines[i + 1 :]))
    with pytest.raises(AuditLogError):
        check(tmp_path / "own.jsonl", tmp_path / "gw-dropped.jsonl")
    check(tmp_path / "own.jsonl")  # and the untouched pair still tells one story
    gw.close()


def test_a_recorded_checkpoint_the_site_did_not_sign_fails(
    site: AuditLog, mirror: AuditMirror, tmp_path: Path
) -> None:
    """A gateway that records a checkpoint of its own making for the site (its log signed by
    the gateway, so it verifies on its own) is caught: the site's key did not sign it."""
    gw = AuditLog(tmp_path / "gateway.db", signing_key=GATEWAY_KEY, checkpoint_interval_s=0)
    cp = _grow(site, 10)
    fake = SignedCheckpoint(cp.size, cp.root, cp.time, GATEWAY_KEY.sign(cp.note()))
    gw.append(_recorded(fake))
    gw.export(tmp_path / "gw.jsonl")
    site.export(tmp_path / "own.jsonl")
    with pytest.raises(CheckpointError):
        cross_check(
            tmp_path / "own.jsonl",
            tmp_path / "gw.jsonl",
            site="site-a",
            site_key=SITE_KEY.public_key(),
            gateway_key=GATEWAY_KEY.public_key(),
        )
    gw.close()
