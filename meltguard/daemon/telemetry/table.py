"""`meltguard gpus`: what the telemetry source reads now, as a short nvidia-smi-like table."""

from __future__ import annotations

from collections.abc import Sequence

from meltguard.daemon.telemetry.samples import throttle_known
from meltguard.values import GpuSample

_GIB = 1024**3
_HEADERS = ("GPU", "NAME", "TEMP/SLOW", "MEMORY", "UTIL", "POWER/LIMIT", "THROTTLE")
_NA = "-"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return _NA if value is None else fmt.format(value)


def _pair(a: float | None, b: float | None, unit: str, fmt: str = "{:.0f}") -> str:
    if a is None and b is None:
        return _NA
    return f"{_num(a, fmt)}/{_num(b, fmt)} {unit}"


def _memory(sample: GpuSample) -> str:
    used = None if sample.memory_used_bytes is None else sample.memory_used_bytes / _GIB
    total = None if sample.memory_total_bytes is None else sample.memory_total_bytes / _GIB
    return _pair(used, total, "GiB", "{:.1f}")


def _throttle(sample: GpuSample) -> str:
    if not throttle_known(sample):
        return "?"
    return ",".join(sorted(sample.throttle)) or "none"


def _row(sample: GpuSample) -> tuple[str, ...]:
    name = sample.name or "(unknown)"
    if sample.lost:
        return (str(sample.index), name, "LOST", "", "", "", "")
    util = _NA if sample.utilization is None else f"{sample.utilization * 100:.0f} %"
    return (
        str(sample.index),
        name,
        _pair(sample.temperature_c, sample.slowdown_c, "°C"),
        _memory(sample),
        util,
        _pair(sample.power_w, sample.power_limit_w, "W"),
        _throttle(sample),
    )


def format_table(samples: Sequence[GpuSample], source_kind: str) -> str:
    """One line per GPU. `-` is a field the GPU does not report, `?` unknown throttle state."""
    title = f"telemetry source: {source_kind}"
    if not samples:
        return f"{title}\nno GPUs reported\n"
    rows = [_HEADERS, *(_row(s) for s in sorted(samples, key=lambda s: s.index))]
    widths = [max(len(row[col]) for row in rows) for col in range(len(_HEADERS))]
    lines = [title]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines) + "\n"
