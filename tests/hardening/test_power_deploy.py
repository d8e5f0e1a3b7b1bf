"""The opt-in systemd drop-in that gives the power lever its privilege, and nothing more."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process import ROOT

UNIT = ROOT / "deploy" / "meltguard.service"
DROP_IN = ROOT / "deploy" / "meltguard.service.d" / "power-lever.conf"


def _entries(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_drop_in_grants_cap_sys_admin_only() -> None:
    assert "[Service]" in DROP_IN.read_text()
    assert _entries(DROP_IN) == {
        "CapabilityBoundingSet": "CAP_SYS_ADMIN",
        "AmbientCapabilities": "CAP_SYS_ADMIN",
        "PrivateUsers": "no",
    }
    # The rest of the sandbox stays as the unit has it.
    unit = _entries(UNIT)
    assert unit["DynamicUser"] == "yes" and unit["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_with_the_drop_in_passes_systemd_analyze(tmp_path: Path) -> None:
    here = shutil.which("meltguard", path=str(Path(sys.executable).parent)) or sys.executable
    unit = tmp_path / "meltguard.service"
    unit.write_text(UNIT.read_text().replace("/opt/meltguard/venv/bin/meltguard", here))
    # systemd-analyze reads a unit's drop-in directory from beside the unit file.
    shutil.copytree(DROP_IN.parent, tmp_path / "meltguard.service.d")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0 and "meltguard" not in verify.stderr, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert "power-lever.conf" not in security.stdout + security.stderr, security.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {security.stderr[:200]}")
    # The one capability costs a little exposure; the unit stays well inside "OK".
    assert "CAP_SYS_ADMIN" in security.stdout
    assert float(match.group(1)) <= 2.5, security.stdout[-3000:]
