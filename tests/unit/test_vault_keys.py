"""Site key handling: file modes, rotation without re-encryption, and a real crash (the process
killed with os._exit) at every write of a rotation, after which every dataset must be readable."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from enclave.vault import DatasetVersion, Vault
from enclave.vault._keys import KeyRing, load_site_key
from policies.errors import IntegrityError, SiteError

CONTENT = {
    ("alpha", "a.txt"): b"alpha v1 text",
    ("beta", "b.txt"): b"beta v1 text",
}


def make(tmp_path: Path) -> tuple[Vault, list[DatasetVersion]]:
    vault = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key", chunk_size=4096)
    versions = [
        vault.register(name, [(path, io.BytesIO(data))], max_bytes=1 << 20, max_files=10)
        for (name, path), data in CONTENT.items()
    ]
    return vault, versions


def blob_hashes(vault: Vault) -> dict[str, str]:
    return {
        str(p.relative_to(vault.root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((vault.root / "datasets").rglob("blobs/*"))
    }


def wraps(vault: Vault) -> dict[str, set[str]]:
    return {
        str(p.parent.relative_to(vault.root)): set(json.loads(p.read_bytes())["wraps"])
        for p in sorted((vault.root / "datasets").rglob("key.json"))
    }


def assert_all_readable(tmp_path: Path, versions: list[DatasetVersion]) -> Vault:
    fresh = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    for v in versions:
        (f,) = v.files
        assert fresh.read_file(v, f.path) == CONTENT[(v.name, f.path)]
    return fresh


def test_rotation_rewraps_without_touching_data(tmp_path: Path) -> None:
    vault, versions = make(tmp_path)
    old_id = vault.site_key_id
    old_key_copy = tmp_path / "old.key"
    old_key_copy.write_bytes((tmp_path / "site.key").read_bytes())
    old_key_copy.chmod(0o600)
    before = blob_hashes(vault)

    new_id = vault.rotate_site_key()

    assert new_id != old_id and vault.site_key_id == new_id
    assert load_site_key(tmp_path / "site.key").key_id == new_id
    assert not (tmp_path / "site.key.next").exists()
    assert blob_hashes(vault) == before  # no data re-encrypted
    assert set(map(frozenset, wraps(vault).values())) == {frozenset({new_id})}
    assert_all_readable(tmp_path, versions)
    # The retired key opens nothing any more.
    old_ring = KeyRing(old_key_copy)
    for v in versions:
        d = vault.root / "datasets" / v.name / f"v{v.version}"
        with pytest.raises(IntegrityError, match="wrapped under site key"):
            old_ring.unwrap(
                d / "key.json",
                name=v.name,
                version=v.version,
                manifest=(d / "manifest.json").read_bytes(),
            )


def test_site_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / "site.key").chmod(0o640)
    with pytest.raises(SiteError, match="mode 0640; it must be 0600"):
        Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")


def test_data_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    vault, _ = make(tmp_path)
    (vault.root / "datasets/alpha/v1/key.json").chmod(0o644)
    with pytest.raises(SiteError, match="mode 0644"):
        vault.get("alpha", 1)


def test_site_key_as_a_symlink_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / "site.key").rename(tmp_path / "real.key")
    (tmp_path / "site.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(SiteError, match="cannot open key file"):
        Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")


CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from enclave.vault import DatasetVersion, Vault

    tmp, crash_at, after = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "after"
    real_rename = os.rename
    calls = 0

    def rename(src, dst):
        global calls
        calls += 1
        if calls == crash_at and not after:
            os._exit(137)
        real_rename(src, dst)
        if calls == crash_at and after:
            os._exit(137)

    vault = Vault(tmp / "vault", site_key_path=tmp / "site.key")
    os.rename = rename  # every durable step of a rotation ends in a rename
    vault.rotate_site_key()
    print("completed", calls)
    """
)


def crash_rotation(tmp_path: Path, crash_at: int, when: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CRASHER, str(tmp_path), str(crash_at), when],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_a_crash_at_any_step_of_a_rotation_leaves_everything_readable(tmp_path: Path) -> None:
    crashes = 0
    for when in ("before", "after"):
        crash_at = 1
        while True:
            case = tmp_path / f"{when}-{crash_at}"
            case.mkdir()
            _, versions = make(case)
            old_id = load_site_key(case / "site.key").key_id
            r = crash_rotation(case, crash_at, when)
            if r.returncode == 0:
                assert r.stdout.startswith("completed")
                break
            assert r.returncode == 137, r.stderr
            crashes += 1
            # Readable right after the crash, by a freshly started agent...
            fresh = assert_all_readable(case, versions)
            # ...and running the rotation again finishes it under one new key.
            new_id = fresh.rotate_site_key()
            assert new_id != old_id
            assert set(map(frozenset, wraps(fresh).values())) == {frozenset({new_id})}
            assert not (case / "site.key.next").exists()
            assert not [p for p in case.rglob("*.tmp")], "half-written key files left behind"
            assert_all_readable(case, versions)
            crash_at += 1
    # 2 versions: .next, 2 added wraps, the commit, 2 dropped wraps = 6 renames, each way.
    assert crashes == 12
