"""Reading a model directory's files: each error names the file and what is wrong with it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
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
