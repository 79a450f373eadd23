"""Tampering with the vault at rest: flipped bytes, swapped, reordered, cut or added chunks, moved
blobs and keys, edited manifests. Each must raise IntegrityError naming dataset, file and chunk."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from enclave.vault import DatasetVersion, Vault
from enclave.vault._chunks import HEADER_SIZE, NONCE_SIZE, TAG_SIZE
from policies.errors import IntegrityError, SiteError

CHUNK = 4096
STRIDE = NONCE_SIZE + CHUNK + TAG_SIZE


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key", chunk_size=CHUNK)


@pytest.fixture
def version(vault: Vault) -> DatasetVersion:
    files = {
        "a.bin": os.urandom(3 * CHUNK + 100),
        "b.bin": os.urandom(3 * CHUNK + 100),
        "small.txt": b"short",
    }
    return vault.register(
        "ds", [(p, io.BytesIO(b)) for p, b in files.items()], max_bytes=1 << 20, max_files=10
    )


def vdir(vault: Vault, v: DatasetVersion) -> Path:
    return vault.root / "datasets" / v.name / f"v{v.version}"


def blob(vault: Vault, v: DatasetVersion, path: str) -> Path:
    manifest = json.loads((vdir(vault, v) / "manifest.json").read_bytes())
    (entry,) = [f for f in manifest["files"] if f["path"] == path]
    return vdir(vault, v) / "blobs" / str(entry["blob"])


def chunk_at(i: int) -> slice:
    return slice(HEADER_SIZE + i * STRIDE, HEADER_SIZE + (i + 1) * STRIDE)


def edit(p: Path, fn) -> None:
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(fn(data)))


def expect(vault: Vault, v: DatasetVersion, path: str, where: str) -> None:
    pattern = rf"ds@v1, file '{path}', {where}"
    with pytest.raises(IntegrityError, match=pattern):
        vault.read_file(v, path)
    with pytest.raises(IntegrityError, match=pattern):
        vault.verify(v)


def test_untampered_reads(vault: Vault, version: DatasetVersion) -> None:
    vault.verify(version)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_flipped_byte(vault: Vault, version: DatasetVersion, where: str) -> None:
    offset = {"nonce": 3, "ciphertext": NONCE_SIZE + 1000, "tag": STRIDE - 5}[where]

    def flip(d: bytearray) -> bytearray:
        d[chunk_at(1).start + offset] ^= 0x01
        return d

    edit(blob(vault, version, "a.bin"), flip)
    expect(vault, version, "a.bin", "chunk 1")


def test_flipped_byte_in_the_last_chunk(vault: Vault, version: DatasetVersion) -> None:
    def flip(d: bytearray) -> bytearray:
        d[-1] ^= 0x80
        return d

    edit(blob(vault, version, "a.bin"), flip)
    expect(vault, version, "a.bin", "chunk 3")


def test_swapped_chunks_within_a_file(vault: Vault, version: DatasetVersion) -> None:
    def swap(d: bytearray) -> bytearray:
        c0, c1 = d[chunk_at(0)], d[chunk_at(1)]
        d[chunk_at(0)], d[chunk_at(1)] = c1, c0
        return d

    edit(blob(vault, version, "a.bin"), swap)
    expect(vault, version, "a.bin", "chunk 0")


def test_chunk_swapped_in_from_another_file(vault: Vault, version: DatasetVersion) -> None:
    other = blob(vault, version, "b.bin").read_bytes()[chunk_at(2)]

    def graft(d: bytearray) -> bytearray:
        d[chunk_at(2)] = other
        return d

    edit(blob(vault, version, "a.bin"), graft)
    expect(vault, version, "a.bin", "chunk 2")


def test_truncated_to_whole_chunks(vault: Vault, version: DatasetVersion) -> None:
    # Cutting the final chunk and growing the file back would still fail: the last chunk kept
    # is not flagged final. Here: the blob is simply short.
    edit(blob(vault, version, "a.bin"), lambda d: d[: chunk_at(2).stop])
    expect(vault, version, "a.bin", "blob: blob is .* expected")


def test_appended_bytes(vault: Vault, version: DatasetVersion) -> None:
    edit(blob(vault, version, "a.bin"), lambda d: d + b"\0" * 32)
    expect(vault, version, "a.bin", "blob: blob is .* expected")


def test_final_chunk_dropped_and_manifest_shortened_to_match(
    vault: Vault, version: DatasetVersion
) -> None:
    """Cutting the stream at a chunk boundary and editing the size in the manifest to match:
    the manifest no longer authenticates (it is bound into the key wrap)."""
    p = blob(vault, version, "a.bin")
    edit(p, lambda d: d[: chunk_at(2).stop])
    m = vdir(vault, version) / "manifest.json"
    assert m.read_bytes().count(b'"size":12388') == 2  # a.bin and b.bin
    edit(m, lambda d: d.replace(b'"size":12388', b'"size":12288', 1))
    with pytest.raises(IntegrityError, match="ds@v1: the data key does not unwrap"):
        vault.read_file(version, "a.bin")


def test_blobs_swapped_between_files(vault: Vault, version: DatasetVersion) -> None:
    a, b = blob(vault, version, "a.bin"), blob(vault, version, "b.bin")
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    expect(vault, version, "a.bin", "chunk 0")


def test_blob_removed(vault: Vault, version: DatasetVersion) -> None:
    blob(vault, version, "small.txt").unlink()
    with pytest.raises(IntegrityError, match=r"ds@v1, file 'small\.txt': its blob is missing"):
        vault.read_file(version, "small.txt")


def test_blob_from_another_version_with_the_same_path(
    vault: Vault, version: DatasetVersion
) -> None:
    v2 = vault.register(
        "ds",
        [("a.bin", io.BytesIO(os.urandom(3 * CHUNK + 100))), ("z", io.BytesIO(b"z"))],
        max_bytes=1 << 20,
        max_files=10,
    )
    shutil.copyfile(blob(vault, v2, "a.bin"), blob(vault, version, "a.bin"))
    expect(vault, version, "a.bin", "chunk 0")


@pytest.mark.parametrize(
    "change",
    [
        (b'"path":"small.txt"', b'"path":"other.txt"'),
        (b'"size":5', b'"size":4'),
    ],
)
def test_edited_manifest(
    vault: Vault, version: DatasetVersion, change: tuple[bytes, bytes]
) -> None:
    m = vdir(vault, version) / "manifest.json"
    assert change[0] in m.read_bytes()
    edit(m, lambda d: d.replace(*change))
    with pytest.raises(IntegrityError, match="ds@v1"):
        vault.get("ds", 1)


def test_manifest_with_a_consistent_forged_hash(vault: Vault, version: DatasetVersion) -> None:
    """Rewrite a file hash and the root hash so the manifest is self-consistent: the key wrap
    still binds the original manifest bytes."""
    from enclave.vault import FileEntry, root_hash

    m = vdir(vault, version) / "manifest.json"
    body = json.loads(m.read_bytes())
    for f in body["files"]:
        if f["path"] == "small.txt":
            f["sha256"] = "f" * 64
    body["root_hash"] = root_hash(
        FileEntry(f["path"], f["size"], f["sha256"]) for f in body["files"]
    )
    m.write_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(IntegrityError, match="does not unwrap"):
        vault.get("ds", 1)


def test_key_file_moved_between_versions(vault: Vault, version: DatasetVersion) -> None:
    v2 = vault.register("ds", [("x", io.BytesIO(b"x"))], max_bytes=1 << 20, max_files=10)
    shutil.copyfile(vdir(vault, v2) / "key.json", vdir(vault, version) / "key.json")
    with pytest.raises(IntegrityError, match="ds@v1: the data key does not unwrap"):
        vault.get("ds", 1)


def test_a_different_site_key_reads_nothing(
    vault: Vault, version: DatasetVersion, tmp_path: Path
) -> None:
    (tmp_path / "site.key").unlink()
    # Refuses to mint a new key over existing datasets...
    with pytest.raises(SiteError, match="missing"):
        Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    # ...and a foreign key (from another vault) opens none of them.
    Vault(tmp_path / "other", site_key_path=tmp_path / "other.key")
    foreign = Vault(tmp_path / "vault", site_key_path=tmp_path / "other.key")
    with pytest.raises(IntegrityError, match="wrapped under site key"):
        foreign.get("ds", 1)
