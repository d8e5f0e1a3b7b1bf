"""One cell of a trace: a number (with or without its unit, hex bitmasks, N/A markers) or a time.

A missing reading is None, never 0; `[GPU is lost]` is LOST. NaN and infinities are refused: a
NaN temperature compares false against every threshold and would read as a cool GPU.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Final

from meltguard.daemon.telemetry.replay.errors import refuse, shown


class _Lost:
    def __repr__(self) -> str:
        return "LOST"


LOST: Final = _Lost()
Cell = float | _Lost | None

_ABSENT_TEXT = frozenset({"", "n/a", "na", "-", "none", "null", "unknown", "not supported"})
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_HEX = re.compile(r"^0[xX][0-9a-fA-F]+$")
_NON_FINITE = re.compile(r"^[+-]?(?:nan|inf|infinity)$", re.IGNORECASE)


def number(raw: str, origin: str, line: int, column: str) -> Cell:
    """A reading: "45", "45 %", "1024 MiB", "250.50 W", "0x0000000000000004", "[N/A]"."""
    text = raw.strip()
    if text.startswith("[") or text.lower() in _ABSENT_TEXT:
        return LOST if "lost" in text.lower() else None
    value = text.split()[0]
    if _HEX.match(value):
        return float(int(value, 16))
    if _NUMBER.match(value):
        parsed = float(value)
        if math.isfinite(parsed):
            return parsed
    if _NON_FINITE.match(value) or _NUMBER.match(value):
        raise refuse(origin, line, f"{column}: {shown(text)} is not a reading (NaN and infinity "
                                   "are refused; leave the cell empty or [N/A] when unknown)")
    raise refuse(origin, line, f"{column}: not a number: {shown(text)}")


# ---- times ------------------------------------------------------------------------------------

_SMI_FORMATS = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S")
_EPOCH = re.compile(r"^\d+(?:\.\d+)?$")
RELATIVE_BELOW = 1e8  # a plain number below this is seconds from the start, not an epoch (1973)
TIME_HELP = "2026/11/25 07:38:44.123, 2026-11-25T07:38:44+00:00 or epoch seconds/ms/ns"


def _as_utc(moment: datetime) -> float:
    # A stamp without an offset is taken as UTC: only differences between rows matter, and a local
    # reading would shift by an hour across a daylight-saving change.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def epoch_seconds(value: float) -> float:
    """Epoch seconds from an epoch number in s, ms, µs or ns, told apart by size."""
    for scale in (1.0, 1e3, 1e6, 1e9):
        if value / scale < 1e11:  # year 5138: past it, the number is in a finer unit
            return value / scale
    return value / 1e9


def parse_time(raw: str) -> float | None:
    """Seconds (epoch, or relative for small numbers) or None when `raw` is not a time."""
    text = raw.strip()
    if _EPOCH.match(text):
        value = float(text)
        return epoch_seconds(value) if value >= RELATIVE_BELOW else value
    for fmt in _SMI_FORMATS:
        try:
            return _as_utc(datetime.strptime(text, fmt))
        except ValueError:
            continue
    try:
        return _as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def time_cell(raw: str, origin: str, line: int) -> float:
    at = parse_time(raw)
    if at is None:
        raise refuse(origin, line, f"timestamp {shown(raw.strip())} is not like {TIME_HELP}")
    return at


def clock_of_day(raw: str) -> float | None:
    """Seconds since midnight from "HH:MM:SS" (dmon -o T), or None."""
    try:
        moment = datetime.strptime(raw.strip(), "%H:%M:%S")
    except ValueError:
        return None
    span = timedelta(hours=moment.hour, minutes=moment.minute, seconds=moment.second)
    return span.total_seconds()


def date_and_clock(date: str, clock: str) -> float | None:
    """Epoch seconds from dmon -o DT's "YYYYMMDD" and "HH:MM:SS" columns, or None."""
    try:
        return _as_utc(datetime.strptime(f"{date.strip()} {clock.strip()}", "%Y%m%d %H:%M:%S"))
    except ValueError:
        return None


def utc_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def stamp(raw: str, at: float) -> str | None:
    """How a time cell reads to a person: as written, but an epoch number in UTC, and nothing for
    an offset from the start. A stamp without a zone stays as written: its zone is unknown."""
    text = raw.strip()
    if _EPOCH.match(text):
        return utc_text(at) if at >= RELATIVE_BELOW else None
    return text
