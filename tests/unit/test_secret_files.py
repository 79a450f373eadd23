"""Secret and key files: one writer, mode 0600, atomic across a crash, created once, no symlink
followed (:mod:`enclave.secretfile`), and every key a fresh deployment writes goes through it."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from enclave.agent import SiteAgent, _site_secret, signer_dir
from enclave.runtime import FakeRuntime
from enclave.secretfile import ensure_secret, read_secret, write_secret
from gateway.identity import CertificateAuthority
from gateway.server import _signing_key, server_identity
from policies.channels import LeakageAccount
from policies.errors import AlreadyExists, SiteError
from policies.identity import Role


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _archive() -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"a,b\n1,2\n"
        info = tarfile.TarInfo("rows.csv")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_every_secret_of_a_fresh_deployment_is_0600_in_a_private_directory(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    ca = CertificateAuthority.init(home / "ca")
    alice = ca.issue("alice", role=Role.DATA_OWNER, team="h", out_dir=home / "identities")
    gateway = server_identity(home)
    _signing_key(home / "gateway" / "audit-signing.key")
    signer = ca.site_signer("local-site", out_dir=signer_dir(home / "site"))
    site = SiteAgent.open(home / "site", signer=signer, runtime=FakeRuntime(lambda job: 0))
    site.store_dataset("books", archive=_archive())
    site._bits.charge(
        LeakageAccount({"metrics": 1.0}, 10.0), datasets=["books"], budgets={"books": 1e9}
    )
    site.rotate_key()  # writes site.key.next, renames it over site.key, rewrites key.json

    secrets = [
        ca.key_path,
        alice.key,
        gateway.key,
        home / "gateway" / "audit-signing.key",
        site.signer.key,
        home / "site" / "keys" / "site.key",
        home / "site" / "keys" / "logs.key",
        home / "site" / "keys" / "instance.id",
        home / "site" / "keys" / "channel-bits.json",
        home / "site" / "vault" / "datasets" / "books" / "v1" / "key.json",
    ]
    for path in secrets:
        assert stat.S_ISREG(path.lstat().st_mode), path
        assert _mode(path) == 0o600, path
        assert _mode(path.parent) & 0o077 == 0, path.parent
        assert _temps(path.parent) == [], path.parent
    for public in (ca.cert_path, alice.cert, gateway.cert, site.signer.cert):
        assert _mode(public) == 0o644, public
    assert _mode(home / "gateway" / "audit-signing.pub") == 0o644


def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would strip the owner's write bit
    try:
        write_secret(tmp_path / "a.key", b"k")
    finally:
        os.umask(old)
    old = os.umask(0)
    try:
        write_secret(tmp_path / "b.key", b"k")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.key") == _mode(tmp_path / "b.key") == 0o600


def test_a_crash_before_the_rename_keeps_the_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.key"
    write_secret(path, b"old")

    def crash(src: object, dst: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="power lost"):
        write_secret(path, b"new")
    assert read_secret(path) == b"old"
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    write_secret(path, b"new")
    assert read_secret(path) == b"new"


def test_a_crash_before_the_link_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="power lost"):
        write_secret(tmp_path / "logs.key", b"new", exclusive=True)
    assert list(tmp_path.iterdir()) == []


def test_exclusive_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    write_secret(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_secret(path, b"second", exclusive=True)
    assert read_secret(path) == b"first"
    assert _temps(tmp_path) == []


def test_racing_creators_get_one_winner_and_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "logs.key"
    both_made = threading.Barrier(2)  # both have found no file and made a key before writing
    results: list[bytes] = []
    made: list[bytes] = []

    def make() -> bytes:
        key = os.urandom(32)
        made.append(key)
        both_made.wait(timeout=10)
        return key

    def create() -> None:
        results.append(ensure_secret(path, make))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 2 and made[0] != made[1]  # the race really happened
    assert results[0] == results[1] == read_secret(path)
    assert results[0] in made
    assert _temps(tmp_path) == []


def test_two_agents_racing_for_the_site_secret_agree(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "instance.id"
    start = threading.Barrier(8)
    results: list[bytes] = []

    def open_site() -> None:
        start.wait(timeout=10)
        results.append(_site_secret(path))

    threads = [threading.Thread(target=open_site) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert results[0] == read_secret(path) and len(results[0]) == 32


def test_a_symlink_planted_at_the_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    path = keys / "site.key"
    path.symlink_to(victim)
    write_secret(path, b"secret")
    assert not path.is_symlink()
    assert read_secret(path) == b"secret"
    assert _mode(path) == 0o600
    assert victim.read_bytes() == b"precious"


def test_a_symlink_planted_before_a_create_once_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "logs.key"
    path.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_secret(path, b"secret", exclusive=True)
    with pytest.raises(SiteError, match="key file"):
        ensure_secret(path, lambda: b"secret")  # nor read through
    assert victim.read_bytes() == b"precious"
    assert path.is_symlink()


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "logs.key"
    write_secret(path, os.urandom(32))
    path.chmod(0o640)
    with pytest.raises(SiteError, match="must be 0600"):
        _site_secret(path)


def test_an_identity_created_meanwhile_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    out = tmp_path / "ids"
    out.mkdir(mode=0o700)
    signer = ca._signer

    def racing_issuer() -> object:  # another `ca issue bob` wins after the existence check
        write_secret(out / "bob.key", b"the other issuer's key", exclusive=True)
        return signer()

    monkeypatch.setattr(ca, "_signer", racing_issuer)
    with pytest.raises(AlreadyExists):
        ca.issue("bob", role=Role.MODEL_TEAM, out_dir=out)
    assert read_secret(out / "bob.key") == b"the other issuer's key"
    assert _temps(out) == []
