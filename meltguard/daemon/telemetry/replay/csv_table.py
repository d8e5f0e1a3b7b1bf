"""CSV traces with named columns: nvidia-smi --query-gpu output in all its variants (units or
`nounits`, with or without `index`, headers repeated by `>>` appends, nvidia-smi or ISO-8601 times,
`[N/A]` cells, hex bitmasks) and the CSVs of other loggers, by the synonyms in `columns`.

A file without a header row is read only with the names given (`?columns=...`): its columns
cannot be told apart by their values (utilization and memory are both small integers).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from meltguard.daemon.telemetry.replay import columns as cols
from meltguard.daemon.telemetry.replay.cells import (
    LOST,
    RELATIVE_BELOW,
    number,
    parse_time,
    stamp,
    time_cell,
)
from meltguard.daemon.telemetry.replay.errors import FORMATS_READ, refuse, shown
from meltguard.daemon.telemetry.replay.framing import FrameBuilder
from meltguard.daemon.telemetry.replay.options import ReadOptions
from meltguard.daemon.telemetry.replay.readings import Readings
from meltguard.daemon.telemetry.replay.trace import Trace

SMI_FORMAT = "nvidia-smi --query-gpu CSV"
GENERIC_FORMAT = "CSV with named columns"


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    cells: list[str]


def sniff_delimiter(first_line: str) -> str:
    for delimiter in (",", "\t", ";"):
        if delimiter in first_line:
            return delimiter
    return ","


def _rows(text: str, delimiter: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    rows = []
    for cells in reader:
        if cells and any(cell.strip() for cell in cells):
            rows.append(_Row(reader.line_num, [cell.strip() for cell in cells]))
    return rows


def _no_header(origin: str, row: _Row) -> Exception:
    return refuse(origin, row.line,
                  f"no header row: the first line is data ({len(row.cells)} cells: "
                  f"{shown(', '.join(row.cells))}); name the columns in order by appending "
                  "?columns=timestamp,index,name,temperature.gpu,... to the file name (the "
                  "--query-gpu list it was recorded with; - skips a column)")


def _no_time_column(origin: str, row: _Row) -> Exception:
    return refuse(origin, row.line,
                  f"this looks like a CSV, but its header names no time column (saw "
                  f"{shown(', '.join(row.cells))}); formats read: {FORMATS_READ}; name the "
                  "columns with ?columns=timestamp,gpu,temp_c,...")


@dataclass(slots=True)
class _Block:
    """Rows under one header. Runs appended with `>>` repeat the header, or bring a new one
    when the query changed between runs."""

    names: list[str]
    line: int  # of the header; 0 for names given with ?columns=
    rows: list[_Row]


def _time_at(names: Sequence[str]) -> int | None:
    return next((i for i, name in enumerate(names)
                 if (column := cols.column_for(name)) is not None and column.role == cols.TIME),
                None)


def _time_named(names: Sequence[str]) -> bool:
    return _time_at(names) is not None


def _is_header(row: _Row, time_at: int) -> bool:
    """A header among data rows: no time where the time column is, and a time column named."""
    cells = row.cells
    if time_at < len(cells) and parse_time(cells[time_at]) is not None:
        return False
    return _time_named(cells) and all(parse_time(cell) is None for cell in cells)


def _blocks(rows: list[_Row], origin: str, options: ReadOptions) -> tuple[list[_Block], int]:
    """The rows split under their headers, and how many repeats of the same header were
    skipped."""
    if options.columns is not None:
        names = list(options.columns)
        if not _time_named(names):
            raise refuse(origin, 0, f"columns= names no time column (gave {', '.join(names)}; "
                                    f"use one of {', '.join(cols.names_for(cols.TIME)[:4])})")
        # A header row in the file (no time where the names put it) is skipped: the names
        # given replace it.
        time_at = _time_at(names)
        first = rows[0].cells
        header = time_at is not None and time_at < len(first) and parse_time(first[time_at]) is None
        body = rows[1:] if header else rows
        return [_Block(names, 0, list(body))], 0
    if not _time_named(rows[0].cells):
        if any(parse_time(cell) is not None for cell in rows[0].cells):
            raise _no_header(origin, rows[0])
        raise _no_time_column(origin, rows[0])
    blocks = [_Block(rows[0].cells, rows[0].line, [])]
    time_at = _time_at(rows[0].cells) or 0
    repeated = 0
    for row in rows[1:]:
        current = blocks[-1]
        if row.cells == current.names:  # `>>` appends repeat the header byte for byte
            repeated += 1
        elif _is_header(row, time_at):
            blocks.append(_Block(row.cells, row.line, []))
            time_at = _time_at(row.cells) or 0
        else:
            current.rows.append(row)
    return blocks, repeated


def _is_smi(names: Sequence[str]) -> bool:
    return any(cols.smi_property(name) in cols.SMI_PROPERTIES for name in names)


def parse_csv(text: str, origin: str, options: ReadOptions, encoding_note: str = "") -> Trace:
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    rows = _rows(text, sniff_delimiter(first_line))
    if not rows:
        raise refuse(origin, 0, "trace holds no samples")
    blocks, repeated = _blocks(rows, origin, options)
    notes = [encoding_note] if encoding_note else []
    if repeated:
        notes.append(f"{repeated} repeated header row(s) skipped")
    if len(blocks) > 1:
        notes.append(f"the header changes at line(s) {', '.join(str(b.line) for b in blocks[1:])}")
    builder = FrameBuilder(origin)
    uuid_order: dict[str, int] = {}
    for block in blocks:
        notes += _read_block(block, origin, builder, uuid_order)
    is_smi = any(_is_smi(block.names) for block in blocks)
    return Trace(origin, SMI_FORMAT if is_smi else GENERIC_FORMAT, builder.frames(),
                 tuple(dict.fromkeys(notes)), builder.started)


def _read_block(block: _Block, origin: str, builder: FrameBuilder,
                uuid_order: dict[str, int]) -> list[str]:
    names = block.names
    mapping = {i: cols.column_for(name) for i, name in enumerate(names)}
    used = {i: column for i, column in mapping.items() if column is not None}
    time_index = next(i for i, c in used.items() if c.role == cols.TIME)
    gpu_index = _choose_gpu_column(used, block.rows, time_index)
    notes = []
    if gpu_index is None:
        notes.append("no GPU column: one GPU (index 0), or GPUs told apart by uuid")
    elif sum(1 for c in used.values() if c.role == cols.GPU) > 1:
        notes.append(f"GPU index from column {names[gpu_index]!r} (the one unique per time)")
    ignored = [names[i] for i, c in mapping.items() if c is None and names[i] not in ("", "-")]
    if ignored:
        notes.append(f"columns not used: {', '.join(ignored)}")
    _frames(origin, block, used, time_index, gpu_index, builder, uuid_order,
            generic=not _is_smi(names))
    return notes


def _choose_gpu_column(used: dict[int, cols.Column], data: Sequence[_Row],
                       time_index: int) -> int | None:
    """The GPU column: the first named one whose values never repeat within one timestamp. Some
    loggers write both `gpu` and `index` with one of them meaning something else."""
    candidates = [i for i, c in used.items() if c.role == cols.GPU]
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    for i in candidates:
        seen: dict[str, set[str]] = defaultdict(set)
        clash = False
        for row in data:
            if max(i, time_index) >= len(row.cells):
                continue
            values = seen[row.cells[time_index]]
            if row.cells[i] in values:
                clash = True
                break
            values.add(row.cells[i])
        if not clash:
            return i
    return candidates[0]


def _frames(origin: str, block: _Block, used: dict[int, cols.Column], time_index: int,
            gpu_index: int | None, builder: FrameBuilder, uuid_order: dict[str, int], *,
            generic: bool) -> None:
    names, width, header_line = block.names, len(block.names), block.line
    gpu_name = "" if gpu_index is None else cols.smi_property(names[gpu_index])
    time_scale = used[time_index].scale
    for row in block.rows:
        cells = row.cells
        if len(cells) == width + 1 and not cells[-1]:
            cells = cells[:-1]  # a trailing comma
        if len(cells) != width:
            expected = (f"the header (line {header_line}) has {width} columns" if header_line
                        else f"columns= names {width}")
            raise refuse(origin, row.line,
                         f"{len(cells)} cells, {expected}: {shown(', '.join(cells))}")
        at = time_cell(cells[time_index], origin, row.line)
        if time_scale != 1.0 and at < RELATIVE_BELOW:
            at *= time_scale  # a relative time in the column's unit (elapsed_ms)
        readings = Readings(index=0)
        for i, column in used.items():
            raw = cells[i]
            if column.role in cols.TEXT_ROLES:
                if "lost" in raw.lower() and raw.startswith("["):
                    readings.lost = True
                elif not raw.startswith("["):
                    setattr(readings, column.role, raw)
                continue
            if column.role in (cols.TIME, cols.GPU):
                continue
            value = number(raw, origin, row.line, cols.smi_property(names[i]))
            if value is LOST:
                readings.lost = True
            elif isinstance(value, float) and not (generic and value == -1):
                # Loggers built on pynvml write -1 for a reading the GPU does not support.
                readings.values[column.role] = value * column.scale
        readings.index = _index(cells, gpu_index, readings, builder, at, uuid_order,
                                (origin, row.line, gpu_name))
        builder.add(at, readings.sample(), row.line,
                    stamp=None if builder.started else stamp(cells[time_index], at))


def _index(cells: list[str], gpu_index: int | None, readings: Readings, builder: FrameBuilder,
           at: float, uuid_order: dict[str, int], where: tuple[str, int, str]) -> int:
    origin, line, column = where
    if gpu_index is None:
        if readings.uuid:
            return uuid_order.setdefault(readings.uuid, len(uuid_order))
        return 0
    value = number(cells[gpu_index], origin, line, column)
    if value is LOST:
        readings.lost = True
        return builder.guess_index(at, readings.uuid)
    if isinstance(value, float) and value >= 0 and value == int(value):
        return int(value)
    raise refuse(origin, line, f"{column}: must hold a GPU index (0, 1, ...), saw "
                               f"{shown(cells[gpu_index])}")
