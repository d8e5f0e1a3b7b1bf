"""The admission hot-path benchmark end to end, at its smallest: one round of one second per
case, every case answered as it should be, and the report written with its targets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_one_round_writes_a_report_with_every_case_and_target(tmp_path: Path) -> None:
    out = tmp_path / "admission.md"
    done = subprocess.run(
        [sys.executable, "-m", "meltguard.daemon.bench_admission", "--rounds", "1",
         "--seconds", "1", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    rows = dict(re.findall(r"^\| ([a-z ,]+?) \| [\d,]+ \| [\d.]+ \| (\d+) \|$", text, re.M))
    assert set(rows) == {
        "bare", "raw aiohttp", "memory admit", "memory reject", "sqlite admit",
        "sqlite reject", "redis admit", "redis reject", "memory, no events admit",
        "memory, no events reject"}
    # An admit case answered only 2xx, a reject case never did.
    assert all(wrong == "0" for wrong in rows.values()), rows
    for target in ("memory admit / bare", "memory reject / bare",
                   "redis reject / memory reject", "sqlite admit / memory admit"):
        assert re.search(rf"^\| {re.escape(target)} \| [\d.]+x \|.*\| (met|\*\*NOT met\*\*) \|$",
                         text, re.M), target
    assert "Traceback" not in done.stderr
    assert re.search(r"tight loop on this event loop \(`warm_costs`\) cost [\d.]+ µs", text)
    picture = out.with_suffix(".png")
    assert f"]({picture.name})" in text
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
