"""The real GPU recordings in `shared/traces/`, as frames of GpuSamples.

Every file is read with the daemon's own reader (`load_trace`) when it can; three recordings
that today's reader cannot open (a header without `index`, a pynvml logger's CSV, an NVML
collector's CSV) are read here by name with the few columns the pressure tests need, so the
controller is tested on them already. Once the reader opens a file, it is what is used.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

from meltguard.daemon.telemetry.errors import TelemetrySpecError
from meltguard.daemon.telemetry.replay import load_trace
from meltguard.values import GpuSample

Frame = tuple[float, tuple[GpuSample, ...]]  # (seconds from the start, every GPU then)


def traces_dir() -> Path | None:
    """`$MELTGUARD_TRACES`, else the first `shared/traces` found upward from this file."""
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
    if root is None:
        return []
    return sorted(p for p in root.rglob("*.csv") if p.is_file())


def load_frames(path: Path) -> list[Frame] | None:
    """The file's frames, or None when neither the daemon's reader nor a fallback opens it."""
    try:
        return [(f.offset, f.samples) for f in load_trace(path)]
    except (TelemetrySpecError, UnicodeDecodeError, ValueError):
        pass
    fallback = _FALLBACKS.get(path.name)
    return fallback(path) if fallback is not None else None


def _stamp(text: str) -> float:
    for fmt in ("%Y/%m/%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S.%f"):
        try:
            return datetime.strptime(text.strip(), fmt).timestamp()
        except ValueError:
            continue
    return float(text)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        header = [h.strip() for h in next(reader)]
        return [dict(zip(header, (c.strip() for c in row), strict=False)) for row in reader
                if row]


def _group(points: list[tuple[float, GpuSample]]) -> list[Frame]:
    start = points[0][0]
    frames: dict[float, list[GpuSample]] = {}
    for at, sample in points:
        frames.setdefault(round(at - start, 1), []).append(sample)
    return [(t, tuple(s)) for t, s in sorted(frames.items())]


def _sample(at: float, index: int, name: str, **fields: float | int | None) -> GpuSample:
    return GpuSample(index=index, uuid=f"trace-{index}", name=name, taken_at=at,
                     **fields)  # type: ignore[arg-type]


def _a100(path: Path) -> list[Frame]:
    points = []
    for row in _rows(path):
        at = _stamp(row["timestamp"])
        points.append((at, _sample(
            at, 0, "A100",
            temperature_c=float(row["temperature.gpu"]),
            utilization=float(row["utilization.gpu [%]"].rstrip(" %")) / 100,
        )))
    return _group(points)


def _rtx4060(path: Path) -> list[Frame]:
    points = []
    for row in _rows(path):
        at = _stamp(row["timestamp_ns"])
        total, used = float(row["mem_total_MB"]), float(row["mem_used_MB"])
        points.append((at, _sample(
            at, int(row["gpu_index"]), row["name"],
            temperature_c=float(row["temperature_C"]),
            utilization=float(row["util_gpu_percent"]) / 100,
            power_w=float(row["power_draw_W"]),
            memory_used_bytes=int(used * 2**20), memory_total_bytes=int(total * 2**20),
        )))
    return _group(points)


def _h100x8(path: Path) -> list[Frame]:
    points = []
    for row in _rows(path):
        at = float(row["timestamp"])
        points.append((at, _sample(
            at, int(row["gpu"]), row["gpu_model"],
            temperature_c=float(row["temp_c"]),
            utilization=float(row["gpu_util_pct"]) / 100,
            power_w=float(row["power_w"]),
            memory_used_bytes=int(float(row["mem_used_mib"]) * 2**20),
            memory_total_bytes=int(float(row["mem_total_mib"]) * 2**20),
        )))
    return _group(points)


_FALLBACKS = {
    "a100_nvsmi_noindex.csv": _a100,
    "rtx4060laptop_gpuburn_pynvml.csv": _rtx4060,
    "h100x8_nvml_collector.csv": _h100x8,
}
