"""Replays recorded GPU telemetry, so an incident can be re-run against a policy.

Two formats, told apart by the first character of the file:

- the CSV nvidia-smi writes. Record one with
      nvidia-smi --query-gpu=timestamp,index,uuid,name,temperature.gpu,utilization.gpu,\
memory.used,memory.total,power.draw,power.limit --format=csv -lms 500 > trace.csv
  Columns are found by name, in any order; units in the header (`memory.used [MiB]`) and in the
  cells (`1024 MiB`) are understood. Optional extra columns: `clocks_event_reasons.active` (or the
  older `clocks_throttle_reasons.active`; the hex bitmask) and `temperature.gpu.tlimit` (the
  margin to slowdown, from which the slowdown temperature follows). Without a reasons column a
  row's throttle state is unknown rather than "not throttling".
  `[N/A]`, `[Not Supported]` and the like are absent fields; `[GPU is lost]` marks the GPU lost.
- JSONL: one object per line with GpuSample field names (`throttle` a list of reason names) and
  `t`, the offset in seconds. Lines with equal `t` form one frame.

Frames play at their offset from the first frame, counted from the first read on the injected
clock. After the last frame has been shown for one typical frame gap, a looping source starts over
and a non-looping one returns no samples, so the sampler goes stale as it would on a dead reader.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from meltguard.daemon.telemetry.errors import TelemetrySpecError
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, decode_throttle
from meltguard.protocols import Clock
from meltguard.values import THROTTLE_REASONS, GpuSample

_MIB = 1024 * 1024
_DEFAULT_GAP = 1.0
_SAME_PASS_S = 0.1  # rows of one nvidia-smi query pass are stamped milliseconds apart


class ReplayFormatError(TelemetrySpecError):
    """A trace that cannot be read; the message is `FILE:LINE: what is wrong`."""


@dataclass(frozen=True, slots=True)
class ReplayFrame:
    """All GPUs at one instant of the trace; `taken_at` in the samples is filled in at read."""

    offset: float
    samples: tuple[GpuSample, ...]


class ReplaySource:
    """TelemetrySource that plays frames against `clock`; build it with `from_file`."""

    def __init__(
        self,
        frames: Sequence[ReplayFrame],
        *,
        clock: Clock,
        loop: bool = False,
        origin: str = "<frames>",
    ) -> None:
        if not frames:
            raise ReplayFormatError(f"{origin}: trace holds no samples")
        self._frames = tuple(frames)
        self._offsets = [frame.offset for frame in self._frames]
        self._clock = clock
        self._loop = loop
        self._start: float | None = None
        self.origin = origin
        gaps = [b - a for a, b in zip(self._offsets, self._offsets[1:], strict=False) if b > a]
        # The last frame stays valid as long as frames usually do: one typical gap.
        self.duration = self._offsets[-1] + (statistics.median(gaps) if gaps else _DEFAULT_GAP)

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Clock, loop: bool = False) -> ReplaySource:
        return cls(load_trace(path), clock=clock, loop=loop, origin=str(path))

    @property
    def kind(self) -> str:
        return "replay"

    @property
    def frames(self) -> tuple[ReplayFrame, ...]:
        return self._frames

    def read(self) -> Sequence[GpuSample]:
        now = self._clock.monotonic()
        if self._start is None:
            self._start = now
        elapsed = now - self._start
        if elapsed >= self.duration:
            if not self._loop:
                return []
            elapsed = math.fmod(elapsed, self.duration)
        frame = self._frames[bisect.bisect_right(self._offsets, elapsed) - 1]
        return [replace(sample, taken_at=now) for sample in frame.samples]

    def close(self) -> None:
        pass


def load_trace(path: str | Path) -> tuple[ReplayFrame, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ReplayFormatError(f"{path}: cannot read replay trace: {exc.strerror}") from exc
    return parse_trace(text, origin=str(path))


def parse_trace(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    lines = (line.strip() for line in text.splitlines())
    first = next((line for line in lines if line and not line.startswith("#")), "")
    if first.startswith("{"):
        return parse_jsonl(text, origin=origin)
    return parse_nvidia_smi_csv(text, origin=origin)


# ---- nvidia-smi CSV -------------------------------------------------------------------------

_LOST = object()
_CSV_ALIASES = {
    "timestamp": "timestamp",
    "index": "index",
    "uuid": "uuid",
    "name": "name",
    "temperature.gpu": "temperature",
    "temperature.gpu.tlimit": "tlimit",
    "utilization.gpu": "utilization",
    "memory.used": "memory_used",
    "memory.total": "memory_total",
    "power.draw": "power",
    "power.draw.instant": "power",
    "power.draw.average": "power",
    "power.limit": "power_limit",
    "enforced.power.limit": "power_limit",
    "clocks_event_reasons.active": "reasons",
    "clocks_throttle_reasons.active": "reasons",
}
_TIME_FORMATS = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S")


def _column(header: str) -> str:
    # "memory.used [MiB]" -> "memory.used"
    return header.split("[", 1)[0].strip().lower()


def _cell(raw: str, where: str) -> float | object | None:
    text = raw.strip()
    if not text or text.startswith("[") or text.upper() == "N/A":
        return _LOST if "lost" in text.lower() else None
    number = text.split()[0]  # drop the unit: "45 %", "1024 MiB", "250.50 W"
    try:
        return float(int(number, 16)) if number.lower().startswith("0x") else float(number)
    except ValueError:
        raise ReplayFormatError(f"{where}: not a number: {raw.strip()!r}") from None


def _timestamp(raw: str, where: str) -> float:
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(raw.strip(), fmt).timestamp()
        except ValueError:
            continue
    raise ReplayFormatError(
        f"{where}: timestamp {raw.strip()!r} is not like 2026/11/25 07:38:44.123"
    )


def parse_nvidia_smi_csv(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    columns: dict[str, int] = {}
    builder = _FrameBuilder(origin)
    for row in rows:
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{origin}:{rows.line_num}"
        if not columns:
            columns = {
                _CSV_ALIASES[_column(h)]: i for i, h in enumerate(row) if _column(h) in _CSV_ALIASES
            }
            missing = [c for c in ("timestamp", "index") if c not in columns]
            if missing:
                raise ReplayFormatError(
                    f"{where}: nvidia-smi CSV header lacks {', '.join(missing)} "
                    "(record with --query-gpu=timestamp,index,...)"
                )
            continue
        if len(row) < len(columns) or max(columns.values()) >= len(row):
            raise ReplayFormatError(f"{where}: {len(row)} cells, the header has more columns")
        cells = {key: row[i] for key, i in columns.items()}
        at = _timestamp(cells["timestamp"], where)
        sample = _csv_sample(cells, where, builder.guess_index(at, cells.get("uuid", "").strip()))
        builder.add(at, sample, where)
    return builder.frames()


def _csv_sample(cells: dict[str, str], where: str, guessed_index: int | None) -> GpuSample:
    index_cell = _cell(cells["index"], where)
    if isinstance(index_cell, float):
        index = int(index_cell)
    elif index_cell is _LOST and guessed_index is not None:
        index = guessed_index
    else:
        raise ReplayFormatError(f"{where}: the index column must hold a GPU index")
    values = {key: _cell(raw, where) for key, raw in cells.items() if key not in _TEXT_COLUMNS}
    texts = {key: cells.get(key, "").strip() for key in ("uuid", "name")}
    identity = {key: "" if value.startswith("[") else value for key, value in texts.items()}
    lost = any(value is _LOST for value in values.values()) or any(
        "lost" in value.lower() for value in texts.values() if value.startswith("[")
    )
    if lost:
        return GpuSample(
            index=index,
            uuid=identity["uuid"],
            name=identity["name"],
            taken_at=0.0,
            lost=True,
        )

    def num(key: str) -> float | None:
        value = values.get(key)
        return value if isinstance(value, float) else None

    temperature, tlimit = num("temperature"), num("tlimit")
    used, total = num("memory_used"), num("memory_total")
    utilization = num("utilization")
    fields: dict[str, Any] = {
        "index": index,
        "taken_at": 0.0,
        "temperature_c": temperature,
        "slowdown_c": None if temperature is None or tlimit is None else temperature + tlimit,
        "memory_used_bytes": None if used is None else int(used * _MIB),
        "memory_total_bytes": None if total is None else int(total * _MIB),
        "utilization": None if utilization is None else utilization / 100.0,
        "power_w": num("power"),
        "power_limit_w": num("power_limit"),
        **identity,
    }
    reasons = num("reasons")
    if reasons is None:
        return ThrottleUnknownSample(**fields)
    return GpuSample(**fields, throttle=decode_throttle(int(reasons)))


_TEXT_COLUMNS = frozenset({"timestamp", "uuid", "name"})


# ---- JSONL ----------------------------------------------------------------------------------

_JSON_FLOATS = (
    "temperature_c",
    "slowdown_c",
    "shutdown_c",
    "utilization",
    "power_w",
    "power_limit_w",
)
_JSON_INTS = ("memory_used_bytes", "memory_total_bytes")
_JSON_KEYS = frozenset(
    {"t", "index", "uuid", "name", "taken_at", "throttle", "lost", *_JSON_FLOATS, *_JSON_INTS}
)


def parse_jsonl(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    builder = _FrameBuilder(origin)
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{origin}:{line_no}"
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ReplayFormatError(f"{where}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ReplayFormatError(f"{where}: each line must be a JSON object")
        t = obj.get("t")
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise ReplayFormatError(f"{where}: t: a number of seconds is required")
        builder.add(float(t), _json_sample(obj, where), where, group_by_time=True)
    return builder.frames()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_sample(obj: dict[str, Any], where: str) -> GpuSample:
    unknown = sorted(set(obj) - _JSON_KEYS)
    if unknown:
        raise ReplayFormatError(f"{where}: {unknown[0]}: unknown field")
    index = obj.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ReplayFormatError(f"{where}: index: a GPU index (integer >= 0) is required")
    fields: dict[str, Any] = {"index": index, "taken_at": 0.0}
    for key in ("uuid", "name"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise ReplayFormatError(f"{where}: {key}: must be a string")
        fields[key] = value
    for key in (*_JSON_FLOATS, *_JSON_INTS):
        value = obj.get(key)
        if value is None:
            continue
        if not _is_number(value):
            raise ReplayFormatError(f"{where}: {key}: must be a number or null")
        fields[key] = int(value) if key in _JSON_INTS else float(value)
    lost = obj.get("lost", False)
    if not isinstance(lost, bool):
        raise ReplayFormatError(f"{where}: lost: must be true or false")
    if lost:
        return GpuSample(
            index=index, uuid=fields["uuid"], name=fields["name"], taken_at=0.0, lost=True
        )
    throttle = obj.get("throttle")
    if throttle is None:
        return ThrottleUnknownSample(**fields)
    if not isinstance(throttle, list) or not all(isinstance(r, str) for r in throttle):
        raise ReplayFormatError(f"{where}: throttle: must be a list of reason names")
    bad = [r for r in throttle if r not in THROTTLE_REASONS]
    if bad:
        raise ReplayFormatError(
            f"{where}: throttle: unknown reason {bad[0]!r} (known: {', '.join(THROTTLE_REASONS)})"
        )
    return GpuSample(**fields, throttle=frozenset(throttle))


# ---- framing --------------------------------------------------------------------------------


class _FrameBuilder:
    """Groups per-GPU rows into frames and makes their times offsets from the first row."""

    def __init__(self, origin: str) -> None:
        self._origin = origin
        self._frames: list[tuple[float, list[GpuSample]]] = []
        self._first: float | None = None
        self._last: tuple[float, int] | None = None  # (time, index) of the latest row
        self._by_uuid: dict[str, int] = {}

    def guess_index(self, at: float, uuid: str) -> int:
        """Index for a row whose index cell reads `[GPU is lost]`: the index its UUID had earlier,
        else the one after the previous row of the same query pass (nvidia-smi prints GPUs in
        index order, milliseconds apart), else 0."""
        if uuid in self._by_uuid:
            return self._by_uuid[uuid]
        if self._last is not None and at - self._last[0] < _SAME_PASS_S:
            return self._last[1] + 1
        return 0

    def add(self, at: float, sample: GpuSample, where: str, *, group_by_time: bool = False) -> None:
        if self._first is None:
            self._first = at
        self._last = (at, sample.index)
        if sample.uuid:
            self._by_uuid.setdefault(sample.uuid, sample.index)
        offset = at - self._first
        if self._frames and offset < self._frames[-1][0]:
            raise ReplayFormatError(f"{where}: time goes backwards ({offset:.3f} s into the trace)")
        current = self._frames[-1] if self._frames else None
        # nvidia-smi stamps each GPU's row separately, so a frame ends when an index repeats.
        starts_new = (
            current is None
            or (group_by_time and offset != current[0])
            or any(s.index == sample.index for s in current[1])
        )
        if starts_new:
            if current is not None and group_by_time and offset == current[0]:
                raise ReplayFormatError(f"{where}: GPU {sample.index} appears twice at one time")
            self._frames.append((offset, [sample]))
        else:
            assert current is not None
            current[1].append(sample)

    def frames(self) -> tuple[ReplayFrame, ...]:
        if not self._frames:
            raise ReplayFormatError(f"{self._origin}: trace holds no samples")
        return tuple(
            ReplayFrame(offset, tuple(sorted(samples, key=lambda s: s.index)))
            for offset, samples in self._frames
        )


def frames_from_samples(
    timeline: Iterable[tuple[float, Sequence[GpuSample]]],
) -> tuple[ReplayFrame, ...]:
    """Frames from (offset, samples) pairs, for tests and tools that record in-process."""
    return tuple(ReplayFrame(offset, tuple(samples)) for offset, samples in timeline)
