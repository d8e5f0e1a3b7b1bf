"""The refusal and delivery benchmark end to end, at its smallest: one round of one second per
case on each event loop, every refusal answered as one, and the report written with both
targets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_one_round_writes_a_report_with_every_case_and_target(tmp_path: Path) -> None:
    out = tmp_path / "admission.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.admission", "--rounds", "1", "--seconds", "1",
         "--images", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    rows = re.findall(r"^\| (uvloop|asyncio) \| ([a-z ]+?) \| [\d,]+ \| [\d, ]+ \| "
                      r"(?:[\d.]+x)? \| ((?:[\d.]+x)?) \| (\d+) \| (\d+) \|$", text, re.M)
    assert {(loop, case) for loop, case, _, _, _ in rows} == {
        (loop, case) for loop in ("uvloop", "asyncio")
        for case in ("trivial", "floor", "memory refusal", "sqlite refusal", "redis refusal")}
    # Each refusal is also read against the floor (a POST the edge refuses before the gate).
    assert all(bool(over_floor) == case.endswith("refusal")
               for _, case, over_floor, _, _ in rows), rows
    # The trivial route answered only 2xx, the floor only its 405; a refused tenant got an
    # image only when the store failed and the policy admitted it uncounted
    # (on_store_error: open).
    assert all(int(wrong) <= int(errors) for _, _, _, wrong, errors in rows), rows
    assert re.search(r"^Lowest refusal / trivial ratio: [\d.]+x \(target >= 0\.6x: "
                     r"(met|\*\*NOT met\*\*)\)\.$", text, re.M)
    assert re.search(r"^Daemon / engine images/s: [\d.]+x \(target >= 0\.95x: "
                     r"(met|\*\*NOT met\*\*)\)\.$", text, re.M)
    assert "Traceback" not in done.stderr
