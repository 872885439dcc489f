"""Reading a model directory's files: each error names the file and what is wrong with it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mcdrop.exceptions import CheckpointError


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


def read_json(path: Path) -> Any:
    """``path`` parsed as JSON (a regular file, checked by the caller)."""
    try:
        return json.loads(path.read_text())
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
