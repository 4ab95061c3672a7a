"""Keyring files on disk: written atomically without following planted links, read only when
nobody else can read them.

Writing (:func:`write_private_file`): the new contents go to a temporary file in the target's
folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 under an unpredictable name,
so a link planted at any name, predictable or guessed, is never followed or reused (a taken name
is skipped for a fresh one). The file is fsynced, renamed over the target, and the folder is
fsynced so the rename itself survives a crash. The target is never open for writing: a reader
sees the old file or the new one, whole.

Reading (:func:`read_private_file`): like ssh with a private key, a keyring file that its group
or others can read is refused, with the ``chmod`` that fixes it. The mode is taken from the open
file (``fstat``), so it is the mode of the very bytes read. One exception, PostgreSQL's rule for
its key files: a file owned by root, read by a broker that is not root, may be readable by its
group (not writable, and never by others). That is how a Kubernetes Secret volume with
``fsGroup`` presents a key (owner root, group fsGroup, 0440), and only root could change it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from broker.errors import KeyringError

_ATTEMPTS = 16
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _random_suffix() -> str:
    """The unpredictable part of a temporary file's name (tests fake it to plant links)."""
    return secrets.token_hex(8)


def write_private_file(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600, following no link but ``path``'s folder.

    ``replace=False`` never overwrites: anything at ``path``, a dangling link included, raises
    FileExistsError and leaves it untouched. Raises OSError; FileExistsError also when
    ``_ATTEMPTS`` fresh temporary names were all taken (someone is planting files)."""
    folder = path.parent
    temporary, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            # rename(2) replaces the directory entry: a link at ``path`` is replaced, not followed.
            os.replace(temporary, path)
        else:
            # link(2) fails with EEXIST on any existing entry, a dangling link included.
            os.link(temporary, path, follow_symlinks=False)
            os.unlink(temporary)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)


def _create_temporary(path: Path) -> tuple[Path, int]:
    for _ in range(_ATTEMPTS):
        temporary = path.with_name(f".{path.name}.{_random_suffix()}.tmp")
        try:
            return temporary, os.open(temporary, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            continue  # taken (perhaps planted): never reused, never followed
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exposure(mode: int, owner: int, reader: int) -> str | None:
    """Who else can read a file of ``mode`` owned by uid ``owner``, read by uid ``reader``; None
    when nobody may. Pure: the rule of the module docstring."""
    if mode & 0o007:
        return "others can read or write it"
    group = mode & 0o070
    if not group:
        return None
    if owner == 0 and reader != 0 and group == 0o040:
        return None  # root's file shared with our group: only root could make it private
    return "its group can read or write it"


def refuse_if_exposed(path: Path, status: os.stat_result) -> None:
    """Raise KeyringError, with the command that fixes it, if others can read ``path``."""
    problem = exposure(status.st_mode, status.st_uid, os.geteuid())
    if problem is not None:
        raise KeyringError(
            f"the keyring {path} has mode {stat.S_IMODE(status.st_mode):04o}: {problem}; "
            f"make it private with `chmod 600 {path}`"
        )


def read_private_file(path: Path) -> bytes:
    """The bytes of ``path`` (links followed), refused if others can read it (KeyringError).
    Raises OSError (FileNotFoundError when absent)."""
    with open(path, "rb") as handle:
        status = os.fstat(handle.fileno())
        refuse_if_exposed(path, status)
        return handle.read()


def check_private_if_present(path: Path) -> None:
    """KeyringError if ``path`` exists and others can read it; nothing when it is absent."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise KeyringError(f"cannot read the keyring {path} ({exc.strerror})") from None
    refuse_if_exposed(path, status)
