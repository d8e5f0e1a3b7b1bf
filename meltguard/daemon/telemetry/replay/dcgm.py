"""DCGM exporter metrics in the Prometheus text format, with a timestamp (ms) on each sample, as
saved scrapes or `promtool tsdb dump` print them (that puts the name in `__name__`).

Samples are put in time order and a frame ends where a (GPU, metric) pair repeats, so a file
may list its series one after another or interleaved. Samples without timestamps are read only
from a single scrape (one frame), or with `?interval=` saying how far apart the scrapes were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meltguard.daemon.telemetry.replay.cells import LOST, number, utc_text
from meltguard.daemon.telemetry.replay.errors import refuse, shown
from meltguard.daemon.telemetry.replay.framing import FrameBuilder
from meltguard.daemon.telemetry.replay.options import ReadOptions
from meltguard.daemon.telemetry.replay.readings import Readings
from meltguard.daemon.telemetry.replay.trace import Trace

FORMAT = "DCGM exporter metrics"
# The fields of one scrape are stamped milliseconds apart; a gap longer than this is a new scrape.
_SAME_SCRAPE_S = 1.0
_METRICS = {
    "DCGM_FI_DEV_GPU_TEMP": "temperature_c",
    "DCGM_FI_DEV_SLOWDOWN_TEMP": "slowdown_c",
    "DCGM_FI_DEV_SHUTDOWN_TEMP": "shutdown_c",
    "DCGM_FI_DEV_POWER_USAGE": "power_w",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": "power_limit_w",
    "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": "power_limit_w",
    "DCGM_FI_DEV_GPU_UTIL": "utilization_pct",
    "DCGM_FI_DEV_FB_USED": "memory_used_mib",
    "DCGM_FI_DEV_FB_FREE": "memory_free_mib",
    "DCGM_FI_DEV_FB_TOTAL": "memory_total_mib",
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": "reasons",
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": "reasons",
}
_SAMPLE = re.compile(
    r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)?\s*(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)"
    r"(?:\s+(?P<ts>-?\d+))?\s*$"
)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float | None
    line: int
    gpu: int
    uuid: str
    name: str
    metric: str
    value: float | None
    lost: bool


def looks_like_dcgm(text: str) -> bool:
    """Prometheus text naming DCGM fields; a CSV whose header names them is not."""
    if "DCGM_FI_" not in text[:65536]:
        return False
    lines = (line.strip() for line in text[:65536].splitlines())
    first = next((line for line in lines if line and not line.startswith("#")), "")
    return first.startswith(("DCGM_FI_", "{")) and _SAMPLE.match(first) is not None


def _labels(raw: str, origin: str, line: int) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        match = _LABEL.match(raw, pos)
        if match is None:
            raise refuse(origin, line, f"labels not like name=\"value\": {shown(raw[pos:])}")
        labels[match.group(1)] = match.group(2)
        pos = match.end()
    return labels


def _samples(text: str, origin: str) -> list[_Sample]:
    out: list[_Sample] = []
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise refuse(origin, line_no, f"not a Prometheus sample line: {shown(line)}")
        labels = _labels(match.group("labels") or "", origin, line_no)
        metric = match.group("name") or labels.get("__name__", "")
        if metric not in _METRICS:
            continue
        if "gpu" not in labels:
            raise refuse(origin, line_no, f"{metric} sample has no gpu label: {shown(line)}")
        gpu = number(labels["gpu"], origin, line_no, "gpu label")
        if not isinstance(gpu, float) or gpu < 0 or gpu != int(gpu):
            raise refuse(origin, line_no, f"gpu label is not a GPU index: {labels['gpu']!r}")
        value = number(match.group("value"), origin, line_no, metric)
        stamp = match.group("ts")
        out.append(_Sample(
            at=None if stamp is None else float(stamp) / 1000.0,  # Prometheus stamps are ms
            line=line_no, gpu=int(gpu), uuid=labels.get("UUID", ""),
            name=labels.get("modelName", ""), metric=metric,
            value=value if isinstance(value, float) else None, lost=value is LOST,
        ))
    return out


def parse_dcgm(text: str, origin: str, options: ReadOptions, encoding_note: str = "") -> Trace:
    samples = _samples(text, origin)
    if not samples:
        raise refuse(origin, 0, f"no DCGM GPU samples (read: {', '.join(_METRICS)})")
    stamped = [s for s in samples if s.at is not None]
    notes = [encoding_note] if encoding_note else []
    if stamped and len(stamped) != len(samples):
        first = next(s for s in samples if s.at is None)
        raise refuse(origin, first.line, "a sample without a timestamp among samples with them")
    if not stamped:
        notes.append("samples carry no timestamps: "
                     + (f"scrapes taken {options.interval:g} s apart" if options.interval
                        else "read as one scrape"))
    ordered = sorted(samples, key=lambda s: s.at or 0.0) if stamped else samples
    builder = FrameBuilder(origin)
    frame: dict[int, Readings] = {}
    seen: set[tuple[int, str]] = set()
    frame_at, frame_line, scrape = 0.0, 0, 0

    def flush() -> None:
        for index in sorted(frame):
            builder.add(frame_at, frame[index].sample(), frame_line, group_by_time=True,
                        stamp=utc_text(frame_at) if stamped else None)

    for sample in ordered:
        key = (sample.gpu, _METRICS[sample.metric])
        later = sample.at is not None and sample.at - frame_at > _SAME_SCRAPE_S
        if key in seen or (frame and later):
            if key in seen and not stamped and not options.interval:
                raise refuse(origin, sample.line,
                             f"{sample.metric} for GPU {sample.gpu} repeats in samples without "
                             "timestamps; say how far apart the scrapes were with ?interval=15s")
            flush()
            frame, seen, scrape = {}, set(), scrape + 1
        if not frame:
            frame_at = sample.at if sample.at is not None else scrape * (options.interval or 0.0)
            frame_line = sample.line
        seen.add(key)
        readings = frame.setdefault(sample.gpu, Readings(index=sample.gpu))
        readings.uuid = readings.uuid or sample.uuid
        readings.name = readings.name or sample.name
        if sample.lost:
            readings.lost = True
        elif sample.value is not None:
            readings.values[_METRICS[sample.metric]] = sample.value
    flush()
    return Trace(origin, FORMAT, builder.frames(), tuple(notes), builder.started)
