"""`python -m service.ray_app` where Ray Serve is not installed (tests/service/test_ray_app.py
runs it where it is)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# Runs the module as the command does, with `import ray` failing whether or not Ray is installed.
WITHOUT_RAY = (
    "import runpy, sys; sys.modules['ray'] = None; "
    "runpy.run_module('service.ray_app', run_name='__main__', alter_sys=True)"
)


def test_the_command_without_ray_says_what_to_install_in_one_line() -> None:
    # It was two tracebacks, ending in "pip install 'mcdrop[ray]'" where README.md says
    # pip install -e '.[ray]'.
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "--replicas", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "python -m service.ray_app: error: Ray Serve is not installed: pip install -e '.[ray]' "
        "in a clone of mcdrop\n"
    )
