"""Reading a model directory's files, each error naming the file and what is wrong with it, and
writing them so that none is ever half-written (:func:`write_files`)."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from mcdrop.exceptions import CheckpointError

#: os.open's flag that opens a FIFO without waiting for a writer (POSIX; Windows has no FIFOs
#: to open).
NO_WAIT = getattr(os, "O_NONBLOCK", 0)


def is_present(path: Path, what: str) -> bool:
    """Whether ``path`` exists; raises when it does but is not a regular file (a directory, a
    device such as ``/dev/zero`` behind a symlink, a FIFO: reading one could block or never
    end)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: the file that would be read
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{path}: the {what} is not a regular file (a directory, device or pipe, perhaps "
            "behind a symlink); put the file itself there"
        )
    return True


@contextmanager
def opened(path: Path, what: str) -> Iterator[tuple[BinaryIO, str]]:
    """``path`` open for reading, checked through its descriptor to be a regular file, and a
    name that opens that same file (``/proc/self/fd/N`` where the system has it, else ``path``)
    for a reader that takes a name (safetensors).

    Why: :func:`is_present` checks the file a name leads to, and a file swapped in under the
    name after it (a FIFO, whose opening waits for a writer for good; a device) would be read.
    Opened without waiting, checked and read through one descriptor, such a file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | NO_WAIT)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(
                f"{path}: the {what} is not a regular file (a directory, device or pipe, perhaps "
                "behind a symlink); put the file itself there"
            )
        same = f"/proc/self/fd/{fd}"
        yield file, same if os.path.exists(same) else str(path)


def read_json(path: Path, what: str = "file") -> Any:
    """``path`` parsed as JSON (a regular file, checked again as it is read: :func:`opened`)."""
    try:
        with opened(path, what) as (file, _):
            text = file.read().decode()
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    except RecursionError:
        # Python's parser recurses once per nesting level; no manifest nests this deep.
        raise CheckpointError(
            f"{path}: not valid JSON: nested too deeply (arrays or objects inside one another "
            "beyond Python's recursion limit)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from exc


#: Writes a file's contents under the name it is given.
Writer = Callable[[str], object]


def write_files(files: Mapping[Path, Writer | None]) -> None:
    """Write each file of ``files`` (its writer writes it under the name it is given; None
    removes the file), in a folder that a server may be reading, so that a reader never finds a
    file half-written: each is written to a temporary file beside it, synced to disk, and
    renamed over it, in the order given once all are written (a model directory's manifest
    last), each with the mode a plain write gives it (a new file's 0o666 less the umask; over a
    file, that file's permissions and group kept besides). Where a write fails (a full disk)
    nothing is changed and no temporary file is left.

    Why renamed: a file written in place is truncated first, so a crash or a full disk leaves
    it cut short; and writing in place follows a symlink put there (``weights.safetensors ->
    /etc/...``), where a rename replaces the link itself. The temporary files are hidden
    (``.weights.safetensors.<random>.tmp``): a loader reads its files by name, never these."""
    staged: dict[Path, Path | None] = {}
    try:
        for path, write in files.items():
            staged[path] = None if write is None else _staged(path, write)
    except BaseException:
        for temp in staged.values():
            if temp is not None:
                temp.unlink(missing_ok=True)
        raise
    for path, temp in staged.items():
        if temp is None:
            path.unlink(missing_ok=True)  # (a symlink: the link, not what it leads to)
        else:
            os.replace(temp, path)
    for folder in dict.fromkeys(path.parent for path in files):
        _sync_folder(folder)


def _staged(path: Path, write: Writer) -> Path:
    """``path``'s new contents, written by ``write`` to a fresh temporary file beside it and
    synced to disk; that file, removed where the write fails."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created here, never an existing file (O_EXCL), with the mode a plain write gives: 0o666
    # less the umask.
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        mode = stat.S_IMODE(os.stat(temp).st_mode)
        replaced = _replaced(path)
        write(str(temp))
        # That mode again: safetensors (0.8) writes a file of its own in the name's place,
        # readable by its owner only, which a server running as another user cannot read.
        # Over a file, what a write in place leaves too: its permissions (a file made
        # readable by a server's group stays so when saved again under umask 077) and group.
        if replaced is not None:
            mode |= replaced.st_mode & 0o777
            with suppress(OSError):  # (a group the user is not in, an owner not theirs)
                os.chown(temp, -1, replaced.st_gid)
                os.chown(temp, replaced.st_uid, -1)
        os.chmod(temp, mode)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the contents on disk before a name leads to them
        finally:
            os.close(fd)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _cannot_write(path, exc) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _replaced(path: Path) -> os.stat_result | None:
    """The status of the regular file ``path`` names (not of what a symlink there leads to:
    the link is replaced, its target left alone), or None."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status if stat.S_ISREG(status.st_mode) else None


#: The errors of a folder a file cannot be created in, and of a full disk.
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _cannot_write(path: Path, exc: OSError) -> OSError:
    """``exc``, a failure to write ``path``'s temporary file, said of ``path`` (of the same
    type, with its errno): the temporary file's name told the user nothing, and a folder
    whose files are writable but not the folder itself needs saying (a file is renamed over)."""
    why = exc.strerror or str(exc)
    if exc.errno in _NOT_WRITABLE:
        why += (
            f": {path.parent} must be writable (each file is written beside its name and "
            "renamed over it, never in place)"
        )
    elif exc.errno in _FULL:
        why += " (the disk is full, or a quota or a limit on a file's size is reached)"
    said = f"cannot write {path}: {why}; nothing in its folder was changed"
    return type(exc)(said) if exc.errno is None else type(exc)(exc.errno, said)


def _sync_folder(folder: Path) -> None:
    """Sync ``folder``'s entries (the renames) to disk, where the system can (not Windows)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
