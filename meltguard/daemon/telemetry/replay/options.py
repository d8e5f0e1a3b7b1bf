"""`FILE?columns=...&interval=...&format=...`: how a trace is named where only a path fits
(`--telemetry replay:FILE`, `simulate --trace FILE`), with the few facts a file may not say."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meltguard.daemon.telemetry.replay.errors import ReplayFormatError

FORMAT_NAMES = ("nvidia-smi", "csv", "dmon", "dcgm", "jsonl")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)?$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class ReadOptions:
    columns: tuple[str, ...] | None = None  # names for the CSV columns, in order
    interval: float | None = None  # seconds between samples of a file without timestamps
    format: str | None = None  # skip detection


def split_spec(spec: str) -> tuple[str, ReadOptions]:
    """(path, options). A path that exists as written is taken whole, even with a '?' in it."""
    if "?" not in spec or os.path.exists(spec):
        return spec, ReadOptions()
    path, _, query = spec.rpartition("?")
    columns: tuple[str, ...] | None = None
    interval: float | None = None
    fmt: str | None = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "columns":
            columns = tuple(name.strip() for name in value.split(","))
            if not any(columns):
                raise ReplayFormatError(f"{path}:0: columns= names no column")
        elif key == "interval":
            match = _DURATION.match(value.strip())
            if not match or float(match.group(1)) <= 0:
                raise ReplayFormatError(
                    f"{path}:0: interval={value!r} is not a duration like 500ms, 1s or 2m")
            interval = float(match.group(1)) * _UNITS[match.group(2)]
        elif key == "format":
            if value not in FORMAT_NAMES:
                raise ReplayFormatError(
                    f"{path}:0: format={value!r} is not one of {', '.join(FORMAT_NAMES)}")
            fmt = value
        else:
            raise ReplayFormatError(
                f"{path}:0: unknown trace option {key!r} after '?' (known: columns, interval, "
                "format)")
    return path, ReadOptions(columns=columns, interval=interval, format=fmt)
