"""Transfers: files written behind a window (:mod:`enclave.writebehind`), and what a release
download sends (:func:`gateway._releases.release_files`): the signed manifest's digests, so a
copy damaged on the gateway's disk is caught by the client rather than re-hashed and passed on."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
from pathlib import Path

import pytest

from enclave.gate import RELEASED_METRICS, RELEASED_WEIGHTS
from enclave.provenance import MANIFEST, SIGNATURE, SITE_CERT, SiteSigner, sign_release
from enclave.writebehind import WriteBehind
from gateway._releases import release_files
from tests.unit._release_support import key_pem, make_ca, make_site_cert
from tests.unit.test_provenance import _context, _gate

PAGE = 4096


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path``."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) over a map of the whole file."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    vec = (ctypes.c_ubyte * -(-size // PAGE))()
    with path.open("rb") as f:
        p = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert p is not None and p != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(p, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(p, size)
    return sum(b & 1 for b in vec)


# -- write behind -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * PAGE - 1, 4 * PAGE, 4 * PAGE + 1, 37 * PAGE + 123])
def test_what_is_written_is_what_the_file_holds(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "out.bin"
    with WriteBehind.create(path, window=4 * PAGE) as w:
        for i in range(0, size, 5000):  # pieces that straddle every window boundary
            assert w.write(data[i : i + 5000]) == len(data[i : i + 5000])
        assert w.size == size
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o600


def test_memoryviews_and_bytearrays_are_written_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * PAGE + 7)
    path = tmp_path / "out.bin"
    with WriteBehind.create(path, window=PAGE) as w:
        w.write(memoryview(data)[:PAGE])
        w.write(bytearray(data[PAGE : 2 * PAGE]))
        w.write(data[2 * PAGE :])
    assert path.read_bytes() == data


def test_an_existing_file_or_a_link_in_its_place_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        WriteBehind.create(victim)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        WriteBehind.create(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        WriteBehind.create(dangling)
    assert victim.read_bytes() == b"keep me"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("window", [0, -PAGE, PAGE + 1])
def test_a_window_that_is_not_whole_pages_is_refused(tmp_path: Path, window: int) -> None:
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            WriteBehind(fd, window=window)
    finally:
        os.close(fd)


def test_the_page_cache_holds_about_two_windows_not_the_file(tmp_path: Path) -> None:
    """The point of the window: a large file leaves only its last windows cached. On a file
    system whose pages cannot be written back (tmpfs: they are the file), the pages stay, and
    what is checked there is only that the writes were not refused."""
    window = 64 * PAGE
    path = tmp_path / "big.bin"
    block = os.urandom(window)
    with WriteBehind.create(path, window=window) as w:
        for _ in range(64):
            w.write(block)
    total = 64 * window // PAGE
    resident = _resident_pages(path)
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        assert resident == total
    else:
        assert resident <= 3 * window // PAGE, (resident, total)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(block * 64).digest()


# -- what a release download sends ------------------------------------------------------------


@pytest.fixture
def release(tmp_path: Path) -> Path:
    cert, key = make_site_cert(*make_ca(), site="site-a")
    signer = SiteSigner.from_pem(cert_pem=cert, key_pem=key_pem(key))
    return sign_release(
        {"clinical-notes": _gate(tmp_path)}, context=_context(), signer=signer
    ).directory


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_file_is_listed_with_its_size_and_hash(release: Path) -> None:
    files = release_files(release)
    assert [f.rel for f in files] == sorted(
        [MANIFEST, SIGNATURE, SITE_CERT, RELEASED_METRICS, RELEASED_WEIGHTS]
    )
    for f in files:
        assert f.path == release / f.rel
        assert f.size == f.path.stat().st_size
        assert f.sha256 == _sha(f.path)


def test_a_damaged_artifact_is_sent_with_the_signed_hash_not_its_own(release: Path) -> None:
    weights = release / RELEASED_WEIGHTS
    signed = _sha(weights)
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    sent = {f.rel: f for f in release_files(release)}[RELEASED_WEIGHTS]
    assert sent.sha256 == signed != _sha(weights)  # the client's check then fails


def test_an_unlisted_file_is_sent_hashed_from_its_bytes(release: Path) -> None:
    (release / "weights" / "extra.bin").write_bytes(b"not in the manifest")
    sent = {f.rel: f for f in release_files(release)}
    extra = sent["weights/extra.bin"]
    assert extra.sha256 == hashlib.sha256(b"not in the manifest").hexdigest()
    assert extra.size == len(b"not in the manifest")


def test_a_manifest_that_does_not_parse_leaves_every_file_hashed(release: Path) -> None:
    (release / MANIFEST).write_bytes(b'{"not": "a manifest"}')
    for f in release_files(release):
        assert f.sha256 == _sha(f.path) and f.size == f.path.stat().st_size


def test_links_in_a_release_are_not_followed(release: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host file")
    (release / "weights" / "link").symlink_to(secret)
    assert "weights/link" not in {f.rel for f in release_files(release)}
