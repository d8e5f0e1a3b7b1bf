"""meltguard's own trace format, what `meltguard record` writes: one JSON object per line with
GpuSample field names, `throttle` a list of reason names (null: not readable) and `t`, the offset
in seconds. Lines with equal `t` form one frame; `#` lines are comments."""

from __future__ import annotations

import json
import math
from typing import Any

from meltguard.daemon.telemetry.replay.errors import refuse
from meltguard.daemon.telemetry.replay.framing import FrameBuilder
from meltguard.daemon.telemetry.replay.trace import ReplayFrame
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample
from meltguard.values import THROTTLE_REASONS, GpuSample

FORMAT = "meltguard JSONL"

_FLOATS = ("temperature_c", "slowdown_c", "shutdown_c", "utilization", "power_w", "power_limit_w",
           "energy_j")
_INTS = ("memory_used_bytes", "memory_total_bytes")
KEYS = frozenset({"t", "index", "uuid", "name", "taken_at", "throttle", "lost", *_FLOATS, *_INTS})


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def parse_jsonl(text: str, *, origin: str = "<string>") -> tuple[ReplayFrame, ...]:
    builder = FrameBuilder(origin)
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            obj = json.loads(stripped, parse_constant=_refuse_constant)
        except _NonFinite as exc:
            raise refuse(origin, line_no, f"{exc} is not a reading (NaN and infinity are "
                                          "refused; write null when unknown)") from None
        except json.JSONDecodeError as exc:
            raise refuse(origin, line_no, f"not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise refuse(origin, line_no, "each line must be a JSON object")
        t = obj.get("t")
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
            raise refuse(origin, line_no, "t: a number of seconds is required")
        builder.add(float(t), _sample(obj, origin, line_no), line_no, group_by_time=True)
    return builder.frames()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sample(obj: dict[str, Any], origin: str, line: int) -> GpuSample:
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise refuse(origin, line, f"{unknown[0]}: unknown field")
    index = obj.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise refuse(origin, line, "index: a GPU index (integer >= 0) is required")
    fields: dict[str, Any] = {"index": index, "taken_at": 0.0}
    for key in ("uuid", "name"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise refuse(origin, line, f"{key}: must be a string")
        fields[key] = value
    for key in (*_FLOATS, *_INTS):
        value = obj.get(key)
        if value is None:
            continue
        if not _is_number(value):
            raise refuse(origin, line, f"{key}: must be a number or null")
        if not math.isfinite(value):
            raise refuse(origin, line, f"{key}: {value!r} is not a reading")
        fields[key] = int(value) if key in _INTS else float(value)
    lost = obj.get("lost", False)
    if not isinstance(lost, bool):
        raise refuse(origin, line, "lost: must be true or false")
    if lost:
        return GpuSample(
            index=index, uuid=fields["uuid"], name=fields["name"], taken_at=0.0, lost=True
        )
    throttle = obj.get("throttle")
    if throttle is None:
        return ThrottleUnknownSample(**fields)
    if not isinstance(throttle, list) or not all(isinstance(r, str) for r in throttle):
        raise refuse(origin, line, "throttle: must be a list of reason names")
    bad = [r for r in throttle if r not in THROTTLE_REASONS]
    if bad:
        raise refuse(origin, line,
                     f"throttle: unknown reason {bad[0]!r} (known: {', '.join(THROTTLE_REASONS)})")
    return GpuSample(**fields, throttle=frozenset(throttle))
