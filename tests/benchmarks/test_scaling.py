"""The scaling benchmark's quick mode, so it cannot rot (no timing assertions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import scaling


@pytest.mark.slow
def test_scaling_quick_writes_the_plot_and_every_point(tmp_path: Path) -> None:
    out = tmp_path / "scaling.png"
    text = scaling.run(quick=True, out=out)
    assert out.read_bytes().startswith(b"\x89PNG")
    points = sum(len(g.samples) + len(g.rows) for g in scaling.QUICK_GRIDS)
    rows = re.findall(r"^\| (UCI|wide)[^|]*\|", text, re.M)
    assert len(rows) == points
    numbers = re.findall(r"^\|[^|]+\| \d+ \| \d+ \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
    assert all(float(a) > 0 and float(b) > 0 for a, b in numbers)
    # memory: a growth, or under 0.1 MiB (never a negative growth)
    memory = re.findall(
        r"^\|[^|]+\| \d+ \| \d+ \| [^|]+ \| [^|]+ \| ([^|]+) \| ([^|]+) \|$", text, re.M
    )
    assert len(memory) == points
    assert all(re.fullmatch(r"< 0\.1|\d+\.\d", cell.strip()) for row in memory for cell in row)
