"""Secret and key files: one durable, atomic writer, and a reader that refuses loose modes.

Every key the deployment keeps on disk goes through :func:`write_secret`: the CA's and each
identity's private key, the site's release-signing key, the vault's site key and wrapped data
keys, the site's log key and instance id, the channel-bits ledger, the gateway's audit-signing
key. The content is written to a temporary file in the target's directory (created ``O_EXCL |
O_NOFOLLOW`` with the final mode, so it is never readable by others, not even for an instant),
fsynced, then put in place by ``rename`` (replace) or ``link`` (create once), and the directory
is fsynced so the new name survives a crash as well. After a crash the path holds the old
content or the new one, never a mix or an empty file; a symlink planted at the path is replaced
(``rename``) or refused (``link``), never followed. Creating once with ``link`` means two racing
creators cannot both win: the second gets :class:`FileExistsError` and :func:`ensure_secret`
hands it the winner's key.

Temporary files are named ``.<name>.<random>.tmp`` next to the target; a crash can leave one
behind (whole, mode 0600), which owners of a directory may sweep at start-up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from policies.errors import SiteError

SECRET_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_secret(
    path: Path, data: bytes, *, mode: int = SECRET_MODE, exclusive: bool = False
) -> None:
    """Put ``data`` at ``path`` atomically and durably, with exactly ``mode`` (default 0600).

    ``exclusive=False`` replaces whatever is at ``path`` (a planted symlink included, which is
    replaced, not followed). ``exclusive=True`` creates the file once: raises
    :class:`FileExistsError` when anything (a file, a symlink) is already there, leaving it
    untouched. Raises :class:`OSError` when the directory cannot be written; no temporary file
    is left behind on any error.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _CREATE, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # fails on anything already at ``path``; never follows it
            os.unlink(tmp)
        else:
            os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (a rename, link or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret(path: Path) -> bytes:
    """Read a key file, refusing one that anyone but this process's user could read or write.

    Raises :class:`FileNotFoundError` when it is absent, :class:`SiteError` when it is a
    symlink or not a regular file, belongs to another user, or has a mode looser than 0600.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SiteError(f"cannot open key file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SiteError(f"key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SiteError(f"key file {path} is owned by uid {st.st_uid}, not the agent's user")
        if st.st_mode & 0o077:
            raise SiteError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
                "(readable by the agent alone)"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def ensure_secret(path: Path, make: Callable[[], bytes]) -> bytes:
    """The content of the key file at ``path``, created from ``make()`` on first use.

    Creation is exclusive: when several processes or threads race, one file wins and every
    caller gets its content. Raises as :func:`read_secret` does for a file that is there.
    """
    with contextlib.suppress(FileNotFoundError):
        return read_secret(path)
    data = make()
    try:
        write_secret(path, data, exclusive=True)
    except FileExistsError:
        return read_secret(path)
    return data
