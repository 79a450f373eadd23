"""The vault's registration, versions, root hash and in-memory reads (no mounts, no Docker)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from enclave.vault import DatasetVersion, FileEntry, Vault, iter_tar, parse_ref, root_hash
from enclave.vault._chunks import HEADER_SIZE, NONCE_SIZE, TAG_SIZE
from policies.errors import IntegrityError, InvalidInput, NotFound

CHUNK = 4096
MARKER = b"PLAINTEXT-MARKER-7f3a9c"


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault", site_key_path=tmp_path / "keys" / "site.key", chunk_size=CHUNK)


@pytest.fixture(autouse=True)
def _keys_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o700)


def files_of(content: dict[str, bytes]) -> list[tuple[str, io.BytesIO]]:
    return [(p, io.BytesIO(b)) for p, b in content.items()]


CONTENT = {
    "train.txt": MARKER + b" the quick brown fox\n" * 10,
    "sub/dir/big.bin": os.urandom(3 * CHUNK + 17),
    "exact.bin": os.urandom(2 * CHUNK),
    "empty.txt": b"",
}


def test_register_round_trip_from_an_iterator(vault: Vault) -> None:
    v = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    assert (v.name, v.version, v.ref) == ("corpus", 1, "corpus@v1")
    assert [f.path for f in v.files] == sorted(CONTENT)
    for f in v.files:
        assert f.size == len(CONTENT[f.path])
        assert f.sha256 == hashlib.sha256(CONTENT[f.path]).hexdigest()
        assert vault.read_file(v, f.path) == CONTENT[f.path]
    assert dict((e.path, b) for e, b in vault.iter_plaintext(v)) == CONTENT
    vault.verify(v)
    assert vault.get("corpus", 1) == v
    assert vault.versions("corpus") == (v,)
    assert vault.datasets() == ("corpus",)


def test_root_hash_is_the_documented_construction(vault: Vault) -> None:
    v = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    h = hashlib.sha256(b"sealroom-dataset-root-v1\n")
    for path in sorted(CONTENT, key=lambda p: p.encode()):
        data = CONTENT[path]
        h.update(f"{path}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert v.root_hash == h.hexdigest() == root_hash(v.files)


def test_root_hash_separates_path_size_and_content() -> None:
    a = FileEntry("a", 1, "0" * 64)
    assert root_hash([a]) != root_hash([FileEntry("b", 1, "0" * 64)])
    assert root_hash([a]) != root_hash([FileEntry("a", 2, "0" * 64)])
    assert root_hash([a]) != root_hash([FileEntry("a", 1, "1" * 64)])
    assert root_hash([a, FileEntry("b", 1, "0" * 64)]) == root_hash(
        [FileEntry("b", 1, "0" * 64), a]
    )


def test_identical_content_returns_the_existing_version(vault: Vault) -> None:
    v1 = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    again = vault.register("corpus", reversed(files_of(CONTENT)), max_bytes=1 << 20, max_files=10)
    assert again == v1
    assert len(vault.versions("corpus")) == 1
    assert list((vault.root / "tmp").iterdir()) == []


def test_changed_content_makes_a_new_immutable_version(vault: Vault) -> None:
    v1 = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    changed = dict(CONTENT, **{"train.txt": b"other text"})
    v2 = vault.register("corpus", files_of(changed), max_bytes=1 << 20, max_files=10)
    assert v2.version == 2 and v2.root_hash != v1.root_hash
    assert vault.read_file(v1, "train.txt") == CONTENT["train.txt"]
    assert vault.read_file(v2, "train.txt") == b"other text"
    # Going back to v1's content returns v1: the root hash names content.
    assert vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10) == v1
    assert vault.latest("corpus") == v2
    # A renamed file is different content.
    renamed = {("renamed.txt" if k == "train.txt" else k): b for k, b in CONTENT.items()}
    assert vault.register("corpus", files_of(renamed), max_bytes=1 << 20, max_files=10).version == 3


def test_register_from_a_directory_and_from_a_tar(vault: Vault, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for path, data in CONTENT.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    (src / "empty-dir").mkdir()  # carries no data: not recorded
    from_dir = vault.register("corpus", src, max_bytes=1 << 20, max_files=10)
    assert [f.path for f in from_dir.files] == sorted(CONTENT)

    tar_path = tmp_path / "src.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src, arcname=".")
    assert vault.register("corpus", tar_path, max_bytes=1 << 20, max_files=10) == from_dir
    with open(tar_path, "rb") as f:
        assert vault.register("corpus", iter_tar(f), max_bytes=1 << 20, max_files=10) == from_dir


def test_nothing_readable_at_rest(vault: Vault) -> None:
    vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    for p in vault.root.rglob("*"):
        if p.is_file():
            assert MARKER not in p.read_bytes(), p
            assert b"the quick brown fox" not in p.read_bytes(), p


def test_blob_layout_matches_the_format(vault: Vault) -> None:
    v = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    blobs = sorted((vault.root / "datasets/corpus/v1/blobs").iterdir())
    sizes = sorted(p.stat().st_size for p in blobs)
    expected = []
    for f in v.files:
        n = max(1, -(-f.size // CHUNK))
        expected.append(HEADER_SIZE + n * (NONCE_SIZE + TAG_SIZE) + f.size)
    assert sizes == sorted(expected)


def test_modes_keep_keys_to_the_agent(vault: Vault, tmp_path: Path) -> None:
    vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    assert stat.S_IMODE((tmp_path / "keys/site.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(vault.root.stat().st_mode) == 0o700
    key_file = vault.root / "datasets/corpus/v1/key.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((vault.root / "datasets/corpus/v1").stat().st_mode) == 0o700


def test_unknown_names_and_versions(vault: Vault) -> None:
    with pytest.raises(NotFound, match="nope"):
        vault.versions("nope")
    vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    with pytest.raises(NotFound, match="corpus@v2"):
        vault.get("corpus", 2)
    v = vault.get("corpus", 1)
    with pytest.raises(NotFound, match=r"missing\.txt"):
        vault.read_file(v, "missing.txt")
    with pytest.raises(InvalidInput, match="dataset name"):
        vault.get("../corpus", 1)


def test_a_stale_or_forged_version_is_refused(vault: Vault) -> None:
    v = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    forged = DatasetVersion(v.name, v.version, "0" * 64, v.files, v.created_at)
    with pytest.raises(IntegrityError, match="root hash"):
        vault.read_file(forged, "train.txt")


def test_refs() -> None:
    assert parse_ref("corpus@v12") == ("corpus", 12)
    for bad in ("corpus", "corpus@12", "corpus@v0", "Corpus@v1", "../x@v1", "a@v1@v2"):
        with pytest.raises(InvalidInput):
            parse_ref(bad)


def test_reopening_finds_everything(vault: Vault, tmp_path: Path) -> None:
    v = vault.register("corpus", files_of(CONTENT), max_bytes=1 << 20, max_files=10)
    again = Vault(tmp_path / "vault", site_key_path=tmp_path / "keys/site.key")
    assert again.get("corpus", 1) == v
    assert again.read_file(v, "sub/dir/big.bin") == CONTENT["sub/dir/big.bin"]
