"""``python -m benchmarks.uci``: see :mod:`benchmarks.uci.cli`."""

from benchmarks.uci.cli import main

main()
