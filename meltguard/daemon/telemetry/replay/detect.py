"""Which format a trace is in, told from its first lines, and the loaders that callers use."""

from __future__ import annotations

import re
from pathlib import Path

from meltguard.daemon.telemetry.replay import dcgm, dmon, jsonl
from meltguard.daemon.telemetry.replay.csv_table import parse_csv
from meltguard.daemon.telemetry.replay.decode import decode_trace, read_trace_bytes
from meltguard.daemon.telemetry.replay.errors import FORMATS_READ, refuse, shown
from meltguard.daemon.telemetry.replay.options import ReadOptions, split_spec
from meltguard.daemon.telemetry.replay.trace import ReplayFrame, Trace

_JSON_OBJECT = re.compile(r'^\{\s*("|\})')
# The comment `meltguard record` opens its file with (offsets in the file count from this time).
_RECORDED = re.compile(r"^# meltguard record: .*\bstarted (\S+)")


def _first_line(text: str) -> tuple[int, str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            return number, line.strip()
    return 0, ""


def _unknown(origin: str, line: int, looks_like: str) -> Exception:
    return refuse(origin, line, f"unknown trace format: this looks like {looks_like}; formats "
                                f"read: {FORMATS_READ}")


def parse_text(text: str, origin: str, options: ReadOptions | None = None,
               encoding: str = "UTF-8") -> Trace:
    options = options or ReadOptions()
    note = "" if encoding == "UTF-8" else f"read as {encoding}"
    line_no, first = _first_line(text)
    fmt = options.format
    if fmt is None:
        if not first:
            raise refuse(origin, 0, "the file is empty: trace holds no samples")
        # A JSON object opens with a quoted key; a Prometheus label set (promtool tsdb dump) with
        # a bare label name.
        if _JSON_OBJECT.match(first):
            fmt = "jsonl"
        elif dmon.looks_like_dmon(first):
            fmt = "dmon"
        elif dcgm.looks_like_dcgm(text):
            fmt = "dcgm"
        elif first.startswith("#"):
            # meltguard record's JSONL starts with a comment line.
            body_no, body = next(((n, line.strip()) for n, line in
                                  enumerate(text.splitlines(), start=1)
                                  if line.strip() and not line.strip().startswith("#")),
                                 (line_no, first))
            if _JSON_OBJECT.match(body):
                fmt = "jsonl"
            elif first.startswith(("# HELP", "# TYPE")):
                raise _unknown(origin, line_no, "Prometheus metrics without DCGM_FI_DEV_ series")
            else:
                raise _unknown(origin, body_no, f"text with '#' comments: {shown(first)}")
        elif first.startswith("<"):
            raise _unknown(origin, line_no, f"XML or HTML (nvidia-smi -q -x?): {shown(first)}")
        elif first.startswith("["):
            raise _unknown(origin, line_no, f"a JSON array, not one object per line: "
                                            f"{shown(first)}")
        elif "NVSMI LOG" in text[:400]:
            raise _unknown(origin, line_no, "an nvidia-smi -q report (one reading, not a series)")
        else:
            fmt = "csv"
    if fmt == "jsonl":
        started = _RECORDED.match(first)
        return Trace(origin, jsonl.FORMAT, jsonl.parse_jsonl(text, origin=origin),
                     (note,) if note else (), started.group(1) if started else None)
    if fmt == "dmon":
        return dmon.parse_dmon(text, origin, options, note)
    if fmt == "dcgm":
        return dcgm.parse_dcgm(text, origin, options, note)
    return parse_csv(text, origin, options, note)


def load_trace_file(spec: str | Path) -> Trace:
    """A trace named as `FILE` or `FILE?columns=...&interval=...&format=...`."""
    path, options = split_spec(str(spec))
    data = read_trace_bytes(path, path)
    decoded = decode_trace(data, path)
    return parse_text(decoded.text, path, options, decoded.encoding)


def load_trace(path: str | Path) -> tuple[ReplayFrame, ...]:
    return load_trace_file(path).frames


def parse_trace(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    return parse_text(text, origin).frames


def parse_nvidia_smi_csv(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    return parse_csv(text, origin, ReadOptions()).frames
