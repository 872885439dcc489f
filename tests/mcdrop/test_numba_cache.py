"""numba's cache of the mask loops on a read-only file system (mcdrop._numba_cache): a copy in a
temporary directory serves, so a process loads the loops instead of compiling them."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba is not installed"
)

#: Compiles (or loads) every loop, then says how many it compiled and loaded, and from where.
WARM_UP = """
import json
from numba.core import config
from mcdrop import cpu_masks
cpu_masks.warm_up()
compiled = sum(sum(loop.stats.cache_misses.values()) for loop in cpu_masks.LOOPS)
loaded = sum(len(loop.stats.cache_hits) for loop in cpu_masks.LOOPS)
print(json.dumps({"compiled": compiled, "loaded": loaded, "dir": config.CACHE_DIR}))
"""


def cpu_masks_file() -> str:
    spec = importlib.util.find_spec("mcdrop.cpu_masks")
    assert spec is not None
    assert spec.origin is not None
    return spec.origin


@functools.cache
def _can_mount_read_only() -> bool:
    """Whether this process may bind a directory read-only in a mount namespace of its own (as
    root here; a container without that privilege skips, and the image test covers it)."""
    if shutil.which("unshare") is None:
        return False
    probe = "mount --bind / /mnt 2>/dev/null || exit 1; mount -o remount,bind,ro /mnt"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def _warm_up(cache: Path, tmp: Path, read_only: tuple[Path, ...] = ()) -> dict[str, object]:
    """Runs WARM_UP in a fresh process with ``read_only`` mounted read-only (as a container's
    read-only root file system would leave them: even root cannot write there)."""
    mounts = "".join(
        f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
        f"mount -o remount,bind,ro {shlex.quote(str(p))} && "
        for p in read_only
    )
    script = f"{mounts}exec {shlex.quote(sys.executable)} -c {shlex.quote(WARM_UP)}"
    command = ["unshare", "-m", "sh", "-c", script] if read_only else ["sh", "-c", script]
    # numba's other cache directories (beside the sources, the user's) are tried after the
    # given one: the user's is kept in ``tmp``, the sources' made read-only below.
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(cache),
        "TMPDIR": str(tmp),
        "XDG_CACHE_HOME": str(tmp / "user-cache"),
    }
    # In the temporary directory: tempfile falls back to the working directory.
    out = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not _can_mount_read_only(), reason="cannot mount a directory read-only here")
def test_a_read_only_cache_is_copied_and_loaded_not_compiled(tmp_path: Path) -> None:
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    first = _warm_up(cache, scratch)
    loops = first["compiled"]
    assert isinstance(loops, int)
    assert loops >= 1
    assert first == {"compiled": loops, "loaded": 0, "dir": str(cache)}
    # The cache read-only (an image's, under a read-only root): every loop is loaded from a copy
    # of it in the temporary directory, none compiled.
    sources = Path(cpu_masks_file()).parent
    second = _warm_up(cache, scratch, read_only=(cache, sources))
    assert {"compiled": second["compiled"], "loaded": second["loaded"]} == {
        "compiled": 0,
        "loaded": loops,
    }
    assert str(second["dir"]).startswith(str(scratch))
    # No temporary directory writable either: the cache stays as given, and numba finds the
    # loops where it can (beside the sources, or compiled in the process), which still run.
    tmp_dirs = tuple(Path(d) for d in ("/tmp", "/var/tmp") if Path(d).is_dir())
    third = _warm_up(cache, scratch, read_only=(cache, sources, scratch, *tmp_dirs))
    assert third["dir"] == str(cache)
    assert third["compiled"] + third["loaded"] == loops  # type: ignore[operator]
