"""`meltguard record`: the live NVML source written as a replay trace (meltguard JSONL), every
field the controller reads included (slowdown temperature, throttle reasons, power and its
limit), so nobody has to remember a long nvidia-smi command during an incident.

Reads are scheduled on a fixed grid (start + k * interval) so the recording does not drift; a
read that overruns skips the grid points it missed rather than bunching reads together. Each
frame is flushed as written, so a recording cut short by a crash keeps what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetryError
from meltguard.daemon.telemetry.samples import throttle_known
from meltguard.protocols import Clock, TelemetrySource
from meltguard.values import THROTTLE_REASONS, GpuSample

_MIN_INTERVAL_S = 0.01
_FIELDS = ("temperature_c", "slowdown_c", "shutdown_c", "memory_used_bytes",
           "memory_total_bytes", "utilization", "power_w", "power_limit_w", "energy_j")


@dataclass(frozen=True, slots=True)
class Recorded:
    frames: int
    failed_reads: int
    gpus: frozenset[int]
    span_s: float
    last_error: str | None = None


def sample_line(t: float, sample: GpuSample) -> str:
    """One JSONL line, as the replay reader reads it back. Unreadable fields are null; a null
    `throttle` says the reasons could not be read, an empty list that nothing throttled."""
    obj: dict[str, Any] = {"t": round(t, 3), "index": sample.index, "uuid": sample.uuid,
                           "name": sample.name}
    if sample.lost:
        obj["lost"] = True
    else:
        obj.update({name: getattr(sample, name) for name in _FIELDS})
        obj["throttle"] = ([r for r in THROTTLE_REASONS if r in sample.throttle]
                           if throttle_known(sample) else None)
    return json.dumps(obj, separators=(", ", ": "), allow_nan=False)


def record(source: TelemetrySource, out: TextIO, *, clock: Clock, sleep: Callable[[float], None],
           interval: float, duration: float | None, header: str) -> Recorded:
    """Reads `source` every `interval` seconds for `duration` (None: until interrupted)."""
    out.write(f"# {header}\n")
    out.flush()
    start = clock.monotonic()
    frames = failed = tick = 0
    gpus: set[int] = set()
    last_t = 0.0
    last_error: str | None = None
    try:
        while True:
            # One time for the whole frame (the replay groups a frame's lines by equal `t`).
            at = clock.monotonic() - start
            try:
                samples = source.read()
            except TelemetryError as exc:
                failed, last_error = failed + 1, str(exc)
            else:
                if samples:
                    last_t = at
                    out.writelines(sample_line(at, s) + "\n" for s in samples)
                    out.flush()
                    frames += 1
                    gpus.update(s.index for s in samples)
            now = clock.monotonic()
            tick = max(tick + 1, math.ceil((now - start) / interval))
            if duration is not None and tick * interval >= duration - 1e-9:
                break
            sleep(start + tick * interval - now)
    except KeyboardInterrupt:
        pass
    return Recorded(frames, failed, frozenset(gpus), last_t, last_error)


def _header(source: TelemetrySource, interval: float, started: float) -> str:
    stamp = datetime.fromtimestamp(started, tz=UTC).isoformat(timespec="seconds")
    driver = getattr(source, "driver_version", None)
    return (f"meltguard record: {source.kind}"
            f"{f', driver {driver}' if driver else ''}, interval {interval:g} s, "
            f"started {stamp}")


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="trace file to write (meltguard JSONL; - for stdout)")
    parser.add_argument("--interval", default="500ms", help="time between reads (default 500ms)")
    parser.add_argument("--duration", default=None,
                        help="how long to record, e.g. 10m (default: until Ctrl-C)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU indices (default: CUDA_VISIBLE_DEVICES or all)")


def run_record(args: argparse.Namespace, *, clock: Clock | None = None,
               sleep: Callable[[float], None] | None = None) -> int:
    import time

    from meltguard.admission.policy import parse_duration
    from meltguard.clock import SystemClock
    from meltguard.daemon.telemetry.nvml import open_nvml

    try:
        interval = parse_duration(args.interval)
        duration = None if args.duration is None else parse_duration(args.duration)
        indices = (tuple(int(x) for x in str(args.gpus).split(",") if x.strip())
                   if args.gpus else None)
    except ValueError as exc:
        print(f"meltguard record: {exc}", file=sys.stderr)
        return 2
    if interval < _MIN_INTERVAL_S or (duration is not None and duration <= 0):
        # Offsets are written to the millisecond; NVML refreshes most readings far less often.
        print("meltguard record: --interval must be at least 10ms and --duration above zero",
              file=sys.stderr)
        return 2
    clock = clock or SystemClock()
    try:
        source = open_nvml(clock=clock, gpu_indices=indices)
    except NvmlUnavailable as exc:
        print(f"meltguard record: NVML unavailable: {exc.reason}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        stack.callback(source.close)
        try:
            out: TextIO = (sys.stdout if args.out == "-" else
                           stack.enter_context(Path(args.out).open("w", encoding="utf-8")))
        except OSError as exc:
            print(f"meltguard record: cannot write {args.out}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        done = record(source, out, clock=clock, sleep=sleep or time.sleep, interval=interval,
                      duration=duration, header=_header(source, interval, clock.wall()))
    where = "stdout" if args.out == "-" else args.out
    print(f"recorded {done.frames} frames of {len(done.gpus)} GPU(s) over {done.span_s:.1f} s "
          f"to {where}, {done.failed_reads} failed read(s)"
          + (f" (last: {done.last_error})" if done.last_error else "")
          + f"; replay it with --telemetry replay:{where}", file=sys.stderr)
    return 0 if done.frames else 1
