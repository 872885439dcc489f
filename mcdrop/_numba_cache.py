"""A numba cache directory that numba can use on a read-only file system.

Why: numba loads a compiled loop only from a cache directory it can also write to (it tests the
directory with a temporary file). An image carries its loops in ``NUMBA_CACHE_DIR``; under a
read-only root file system (Kubernetes' ``readOnlyRootFilesystem``, as KServe runs it) numba
rejects that directory and compiles every loop a process uses at its start, ~0.5 s each. Where a
temporary directory is writable (an ``emptyDir`` at ``/tmp``), a copy of the cache there serves.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from numba.core import config


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def use_writable_cache() -> str | None:
    """Point numba at a copy of ``NUMBA_CACHE_DIR`` in a fresh private temporary directory when
    the directory itself cannot be written and the copy can; returns the directory numba will use
    (None where none is set). Call before the first ``cache=True`` loop is defined: numba reads
    the directory when a loop is defined."""
    given: str = config.CACHE_DIR  # type: ignore[attr-defined]  # set by numba at its import
    if not given or _writable(given):
        return given or None
    try:
        copy = os.path.join(tempfile.mkdtemp(prefix="mcdrop-numba-"), "cache")
        if os.path.isdir(given):
            # Contents only: the original's modes (read-only ones too) would make numba reject
            # the copy as it rejected the original.
            shutil.copytree(given, copy, copy_function=shutil.copyfile)
            for folder, _, _ in os.walk(copy):
                os.chmod(folder, 0o700)
        else:
            os.makedirs(copy)
    except OSError:  # nothing writable: numba compiles in each process, as it would anyway
        return given
    config.CACHE_DIR = copy  # type: ignore[attr-defined]
    return copy
