"""`nvidia-smi dmon` output: whitespace columns under `#` header lines that dmon repeats every
screenful, `-` for a reading it has not got, and with `-o DT` (or `-o T`) date and time columns.

Without time columns the rows carry no time at all; a pass over the GPUs is then taken to be
`interval` apart (dmon's own `-d` default, 1 s, unless `?interval=` says otherwise).
"""

from __future__ import annotations

from meltguard.daemon.telemetry.replay.cells import LOST, clock_of_day, date_and_clock, number
from meltguard.daemon.telemetry.replay.errors import refuse, shown
from meltguard.daemon.telemetry.replay.framing import FrameBuilder
from meltguard.daemon.telemetry.replay.options import ReadOptions
from meltguard.daemon.telemetry.replay.readings import Readings
from meltguard.daemon.telemetry.replay.trace import Trace

FORMAT = "nvidia-smi dmon"
DEFAULT_INTERVAL_S = 1.0
_DAY = 86_400.0
# dmon's column names (-s p u c v m e t) for the readings the controller uses.
_READINGS = {
    "pwr": "power_w",
    "gtemp": "temperature_c",
    "temp": "temperature_c",
    "sm": "utilization_pct",
    "fb": "memory_used_mib",
}
_SIGNATURE = frozenset({"pwr", "gtemp", "temp", "sm", "mem", "fb", "mclk", "pclk", "enc"})


def _names(line: str) -> list[str]:
    return line.lstrip("#").lower().split()


def looks_like_dmon(first_line: str) -> bool:
    names = _names(first_line)
    return first_line.startswith("#") and "gpu" in names and bool(_SIGNATURE & set(names))


def parse_dmon(text: str, origin: str, options: ReadOptions, encoding_note: str = "") -> Trace:
    names: list[str] = []
    builder = FrameBuilder(origin)
    interval = options.interval or DEFAULT_INTERVAL_S
    passes, in_pass = -1, set[int]()
    day, last_clock = 0.0, None
    has_time = False
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith("#"):
            if "gpu" in _names(line):
                names = _names(line)
                has_time = "time" in names
            continue  # the units line (# Idx W C ...) and repeats of the header
        if not names:
            raise refuse(origin, line_no, f"dmon data before its '# gpu ...' header: {shown(line)}")
        cells = line.split()
        if len(cells) != len(names):
            raise refuse(origin, line_no, f"{len(cells)} columns, the dmon header has "
                                          f"{len(names)}: {shown(line)}")
        row = dict(zip(names, cells, strict=True))
        index_cell = number(row["gpu"], origin, line_no, "gpu")
        if not isinstance(index_cell, float) or index_cell < 0 or index_cell != int(index_cell):
            raise refuse(origin, line_no, f"gpu: not a GPU index: {shown(row['gpu'])}")
        readings = Readings(index=int(index_cell))
        for name, field in _READINGS.items():
            if name in row:
                value = number(row[name], origin, line_no, name)
                if value is LOST:
                    readings.lost = True
                elif isinstance(value, float):
                    readings.values[field] = value
        if readings.index in in_pass or passes < 0:
            passes, in_pass = passes + 1, set()
        in_pass.add(readings.index)
        if "date" in row and has_time:
            at = date_and_clock(row["date"], row["time"])
            if at is None:
                raise refuse(origin, line_no, f"date/time {shown(row['date'] + ' ' + row['time'])}"
                                              " is not like 20260125 07:38:44 (dmon -o DT)")
        elif has_time:
            clock = clock_of_day(row["time"])
            if clock is None:
                raise refuse(origin, line_no, f"time {shown(row['time'])} is not like 07:38:44")
            if last_clock is not None and clock < last_clock - _DAY / 2:
                day += _DAY  # -o T has no date: a time far below the last one is past midnight
            last_clock = clock
            at = day + clock
        else:
            at = passes * interval
        when = None
        if has_time:
            when = f"{row['date']} {row['time']}" if "date" in row else row["time"]
        builder.add(at, readings.sample(), line_no, stamp=when)
    if not names:
        raise refuse(origin, 0, "no '# gpu ...' header line: not nvidia-smi dmon output")
    notes = [encoding_note] if encoding_note else []
    if not has_time:
        notes.append(f"no time columns (dmon without -o DT): passes taken {interval:g} s apart")
    notes.append("throttle reasons not recorded by dmon")
    return Trace(origin, FORMAT, builder.frames(), tuple(notes), builder.started)
