"""`meltguard gpus`: what the telemetry source reads now, as a short nvidia-smi-like table, and
for a replay trace a summary of the whole recording."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from meltguard.daemon.telemetry.replay.trace import Trace
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


# ---- a whole replay trace ---------------------------------------------------------------------

_TRACE_HEADERS = ("GPU", "NAME", "TEMP °C (HOTTEST AT)", "SLOWDOWN °C", "POWER W", "LIMIT W",
                  "MEMORY GiB (PEAK)", "UTIL %", "THROTTLE SEEN (FRAMES)", "LOST")


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _span(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return _NA
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def _seconds(value: float) -> str:
    minutes, seconds = divmod(value, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:04.1f}s"
    return f"{minutes}m {seconds:04.1f}s" if minutes else f"{seconds:.1f}s"


def _trace_row(index: int, timeline: Sequence[tuple[float, GpuSample]]) -> tuple[str, ...]:
    live = [(t, s) for t, s in timeline if not s.lost]
    names = [s.name for _, s in timeline if s.name]
    temps = [(s.temperature_c, t) for t, s in live if s.temperature_c is not None]
    temp = _NA
    if temps:
        hottest, at = max(temps, key=lambda pair: (pair[0], -pair[1]))
        temp = f"{_span([c for c, _ in temps])} ({hottest:.0f} at {_seconds(at)})"
    used = [s.memory_used_bytes / _GIB for _, s in live if s.memory_used_bytes is not None]
    totals = [s.memory_total_bytes / _GIB for _, s in live if s.memory_total_bytes]
    memory = _NA
    if used:
        peak = max(used)
        memory = f"{peak:.1f}" + (f"/{max(totals):.1f} ({peak / max(totals):.0%})" if totals
                                  else "")
    known = [s for _, s in live if throttle_known(s)]
    counts: dict[str, int] = {}
    for sample in known:
        for reason in sample.throttle:
            counts[reason] = counts.get(reason, 0) + 1
    if not known:
        throttle = "not recorded"
    else:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        throttle = ", ".join(f"{r} ({n})" for r, n in ranked) or "none"
    lost = sum(1 for _, s in timeline if s.lost)
    return (
        str(index),
        names[0] if names else "(unknown)",
        temp,
        _span([s.slowdown_c for _, s in live if s.slowdown_c is not None]),
        _span([s.power_w for _, s in live if s.power_w is not None]),
        _span([s.power_limit_w for _, s in live if s.power_limit_w is not None]),
        memory,
        _span([s.utilization * 100 for _, s in live if s.utilization is not None]),
        throttle,
        f"{lost} frame{'s' if lost > 1 else ''}" if lost else "-",
    )


def format_trace_summary(trace: Trace) -> str:
    """What a replay trace holds, whole: `meltguard gpus --telemetry replay:FILE`."""
    frames = trace.frames
    offsets = [f.offset for f in frames]
    gaps = sorted(b - a for a, b in itertools.pairwise(offsets) if b > a)
    by_gpu: dict[int, list[tuple[float, GpuSample]]] = {}
    for frame in frames:
        for sample in frame.samples:
            by_gpu.setdefault(sample.index, []).append((frame.offset, sample))
    indices = sorted(by_gpu)
    if gaps:
        median = statistics.median(gaps)
        interval = f"every {median:.2f} s (median"
        interval += f"; {gaps[0]:.2f}-{gaps[-1]:.2f} s)" if gaps[-1] - gaps[0] > 0.05 else ")"
    else:
        interval = "one frame"
    started = "" if trace.started is None else f"   started: {trace.started}"
    lines = [
        f"trace: {trace.origin}",
        f"format: {trace.format}{started}",
        f"GPUs: {len(indices)} ({', '.join(map(str, indices))})   "
        f"duration: {_seconds(offsets[-1] - offsets[0])}   frames: {len(frames)}, {interval}",
        *_columns([_TRACE_HEADERS, *(_trace_row(i, by_gpu[i]) for i in indices)]),
    ]
    lines += [f"note: {note}" for note in trace.notes]
    return "\n".join(lines) + "\n"
