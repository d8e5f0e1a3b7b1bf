"""The real GPU recordings in `shared/traces/` (sources in its README), found in place and never
copied: `$MELTGUARD_TRACES`, else the first `shared/traces` above the repository."""

from __future__ import annotations

import os
from pathlib import Path

from meltguard.daemon.telemetry.replay import ReplayFrame, load_trace

# The noheader file's columns, as its values read: time, index, name, GPU and memory utilization
# (%), memory used and total (MiB), temperature (°C), power (W), graphics and memory clocks (MHz).
NOHEADER_COLUMNS = ("timestamp,index,name,utilization.gpu,utilization.memory,memory.used,"
                    "memory.total,temperature.gpu,power.draw,clocks.gr,clocks.mem")


def traces_dir() -> Path | None:
    env = os.environ.get("MELTGUARD_TRACES")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "traces"
        if candidate.is_dir():
            return candidate
    return None


def trace_files() -> list[Path]:
    root = traces_dir()
    return sorted(p for p in root.rglob("*.csv") if p.is_file()) if root else []


def spec(path: Path) -> str:
    """The replay spec that reads `path`: the one file without a header names its columns."""
    return f"{path}?columns={NOHEADER_COLUMNS}" if "noheader" in path.name else str(path)


def load_frames(path: Path) -> tuple[ReplayFrame, ...]:
    return load_trace(spec(path))
