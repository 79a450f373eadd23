"""Hostile dataset sources: every trick to get a file outside the dataset, past a cap, or a
forged name into the vault. Each must fail with an error naming the file and leave nothing."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave.vault import Vault, check_relpath, iter_tar
from policies.errors import InvalidInput, ResourceExhausted


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key", chunk_size=4096)


def assert_nothing_left(vault: Vault) -> None:
    assert list((vault.root / "datasets").iterdir()) == []
    assert list((vault.root / "tmp").iterdir()) == []


def register(vault: Vault, source: object, *, max_bytes: int = 1 << 20, max_files: int = 100):
    return vault.register("ds", source, max_bytes=max_bytes, max_files=max_files)  # type: ignore[arg-type]


def pairs(*items: tuple[str, bytes]) -> list[tuple[str, io.BytesIO]]:
    return [(p, io.BytesIO(b)) for p, b in items]


# -- names ------------------------------------------------------------------------------------

BAD_NAMES = [
    ("../escape.txt", "traversal"),
    ("a/../../escape.txt", "traversal"),
    ("a/./b.txt", "traversal"),
    ("a//b.txt", "traversal"),
    ("dir/", "traversal"),
    ("/etc/passwd", "absolute"),
    ("a\\..\\b", "backslash"),
    ("nul\0byte", "control character"),
    ("new\nline", "control character"),
    ("esc\x1b[31m", "control character"),
    ("c1\x85", "control character"),
    ("sep\u2028x", "control character"),
    ("", "empty"),
    ("x" * 256, "longer than"),
]


@pytest.mark.parametrize(("name", "why"), BAD_NAMES)
def test_bad_names_are_refused_by_name(vault: Vault, name: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why) as e:
        register(vault, pairs(("fine.txt", b"ok"), (name, b"evil")))
    if name:
        assert repr(name)[1:-1][:40] in str(e.value)
    assert_nothing_left(vault)


def test_non_string_names_and_malformed_items(vault: Vault) -> None:
    with pytest.raises(InvalidInput, match="not a string"):
        register(vault, [(b"bytes-name", io.BytesIO(b"x"))])
    with pytest.raises(InvalidInput, match="pairs"):
        register(vault, [("only-a-name",)])
    with pytest.raises(InvalidInput, match="not binary"):
        register(vault, [("text.txt", io.StringIO("text"))])
    with pytest.raises(InvalidInput, match="Path or an iterable"):
        register(vault, "/etc")
    assert_nothing_left(vault)


def test_duplicates_and_file_directory_clashes(vault: Vault) -> None:
    with pytest.raises(InvalidInput, match=r"'a.txt' appears twice"):
        register(vault, pairs(("a.txt", b"1"), ("a.txt", b"2")))
    with pytest.raises(InvalidInput, match=r"'a/b.txt' lies under 'a'"):
        register(vault, pairs(("a", b"1"), ("a/b.txt", b"2")))
    with pytest.raises(InvalidInput, match=r"'a' is also a directory"):
        register(vault, pairs(("a/b.txt", b"2"), ("a", b"1")))
    assert_nothing_left(vault)


def test_an_empty_dataset_is_refused(vault: Vault, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no files"):
        register(vault, tmp_path / "empty")
    assert_nothing_left(vault)


@given(st.text(max_size=40))
def test_any_accepted_name_stays_inside_the_dataset(name: str) -> None:
    try:
        checked = check_relpath(name)
    except InvalidInput:
        return
    base = "/base"
    joined = os.path.normpath(os.path.join(base, checked))
    assert joined.startswith(base + "/")
    assert joined == f"{base}/{checked}"  # no alias: the name is already canonical
    assert not any(ord(c) < 32 or c == "\x7f" for c in checked)


# -- caps -------------------------------------------------------------------------------------


def test_over_the_byte_cap_names_the_file(vault: Vault) -> None:
    with pytest.raises(ResourceExhausted, match=r"'b.bin'.*max_bytes=100"):
        register(vault, pairs(("a.bin", b"x" * 60), ("b.bin", b"y" * 41)), max_bytes=100)
    assert_nothing_left(vault)


def test_over_the_file_cap_names_the_file(vault: Vault) -> None:
    with pytest.raises(ResourceExhausted, match=r"'c' is one more than max_files=2"):
        register(vault, pairs(("a", b"1"), ("b", b"2"), ("c", b"3")), max_files=2)
    assert_nothing_left(vault)


def test_a_stream_that_never_ends_stops_at_the_cap(vault: Vault) -> None:
    class Endless:
        def read(self, n: int = -1) -> bytes:
            return b"z" * (n if n > 0 else 4096)

    with pytest.raises(ResourceExhausted, match=r"'endless\.bin'"):
        register(vault, [("endless.bin", Endless())], max_bytes=50_000)
    assert_nothing_left(vault)


def test_a_source_that_fails_midway_leaves_nothing(vault: Vault) -> None:
    def source() -> Iterator[tuple[str, io.BytesIO]]:
        yield "a.txt", io.BytesIO(b"a" * 10_000)
        raise OSError("upload connection dropped")

    with pytest.raises(OSError, match="dropped"):
        register(vault, source())
    assert_nothing_left(vault)


def test_a_failure_after_a_good_version_keeps_only_that_version(vault: Vault) -> None:
    v1 = register(vault, pairs(("a.txt", b"1")))
    with pytest.raises(InvalidInput):
        register(vault, pairs(("a.txt", b"2"), ("../b", b"3")))
    assert vault.versions("ds") == (v1,)
    assert [p.name for p in (vault.root / "datasets/ds").iterdir()] == ["v1"]
    assert list((vault.root / "tmp").iterdir()) == []


# -- directories ------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"fine")
    (root / "sub/also.txt").write_bytes(b"fine")


def test_symlink_to_a_file_outside(vault: Vault, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "secret").write_bytes(b"host secret")
    (tmp_path / "src/sub/link.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidInput, match=r"'sub/link.txt' is a symbolic link"):
        register(vault, tmp_path / "src")
    assert_nothing_left(vault)


def test_symlink_to_a_directory_outside(vault: Vault, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "src/etc").symlink_to("/etc")
    with pytest.raises(InvalidInput, match=r"'etc' is a symbolic link"):
        register(vault, tmp_path / "src")
    assert_nothing_left(vault)


def test_fifo_socket_and_device(vault: Vault, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    os.mkfifo(tmp_path / "src/pipe")
    with pytest.raises(InvalidInput, match=r"'pipe' is a FIFO"):
        register(vault, tmp_path / "src")
    os.unlink(tmp_path / "src/pipe")

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "src/sock"))
    try:
        with pytest.raises(InvalidInput, match=r"'sock' is a socket"):
            register(vault, tmp_path / "src")
    finally:
        s.close()
        os.unlink(tmp_path / "src/sock")

    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root; FIFO and socket were checked")
    os.mknod(tmp_path / "src/zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    with pytest.raises(InvalidInput, match=r"'zero' is a character device"):
        register(vault, tmp_path / "src")
    assert_nothing_left(vault)


def test_undecodable_file_name(vault: Vault, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    fd = os.open(os.fsencode(tmp_path / "src") + b"/bad-\xff.txt", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        register(vault, tmp_path / "src")
    assert_nothing_left(vault)


def test_control_character_in_a_directory_name(vault: Vault, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "src/evil\ndir").mkdir()
    (tmp_path / "src/evil\ndir/x.txt").write_bytes(b"x")
    with pytest.raises(InvalidInput, match="control character"):
        register(vault, tmp_path / "src")
    assert_nothing_left(vault)


def test_a_source_that_is_neither_dir_nor_file(vault: Vault, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="neither a directory nor a tar"):
        register(vault, tmp_path / "does-not-exist")


# -- tar archives -----------------------------------------------------------------------------


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (reg("../../etc/cron.d/x", b"evil"), "traversal"),
        (reg("/etc/passwd", b"evil"), "absolute"),
        (reg("a/../../x", b"evil"), "traversal"),
        (reg("ctl\x07.txt", b"evil"), "control character"),
        (special("link", tarfile.SYMTYPE, "/etc/shadow"), r"'link' is a symbolic link"),
        (special("hard", tarfile.LNKTYPE, "ok.txt"), r"'hard' is a hard link"),
        (special("dev", tarfile.CHRTYPE), r"'dev' is a character device"),
        (special("blk", tarfile.BLKTYPE), r"'blk' is a block device"),
        (special("fifo", tarfile.FIFOTYPE), r"'fifo' is a FIFO"),
        (special("../evil-dir", tarfile.DIRTYPE), "traversal"),
    ],
)
def test_hostile_tar_members(
    vault: Vault, member: tuple[tarfile.TarInfo, bytes | None], why: str
) -> None:
    archive = tar_with(reg("ok.txt", b"fine"), member)
    with pytest.raises(InvalidInput, match=why):
        register(vault, iter_tar(archive))
    assert_nothing_left(vault)


def test_tar_duplicate_member(vault: Vault) -> None:
    archive = tar_with(reg("a.txt", b"1"), reg("a.txt", b"2"))
    with pytest.raises(InvalidInput, match="appears twice"):
        register(vault, iter_tar(archive))
    assert_nothing_left(vault)


def test_tar_member_declared_over_the_cap_is_refused_before_reading(vault: Vault) -> None:
    archive = tar_with(reg("a.txt", b"1"), reg("huge.bin", b"h" * 5000))
    with pytest.raises(ResourceExhausted, match=r"'huge.bin' \(5000 bytes\)"):
        register(vault, iter_tar(archive), max_bytes=4096)
    assert_nothing_left(vault)


def test_corrupt_and_truncated_tar(vault: Vault) -> None:
    with pytest.raises(InvalidInput, match="tar"):
        register(vault, iter_tar(io.BytesIO(b"this is not a tar archive" * 40)))
    whole = tar_with(reg("a.bin", os.urandom(20_000))).getvalue()
    with pytest.raises(InvalidInput, match="tar"):
        register(vault, iter_tar(io.BytesIO(whole[:9000])))
    assert_nothing_left(vault)
