"""`meltguard gpus`: one read of the selected telemetry source, printed as a table; for a replay
trace, a summary of the whole recording (format, GPUs, duration, ranges, throttle reasons)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from meltguard.clock import SystemClock
from meltguard.daemon.telemetry import (
    NvmlUnavailable,
    TelemetryError,
    TelemetrySpecError,
    format_table,
    open_source,
)
from meltguard.daemon.telemetry.replay import ReplayFormatError, ReplayFrame, load_trace_file
from meltguard.daemon.telemetry.table import format_trace_summary


def _indices(args: argparse.Namespace) -> tuple[int, ...] | None:
    return tuple(int(x) for x in str(args.gpus).split(",") if x.strip()) if args.gpus else None


def _summarise(path: str, indices: tuple[int, ...] | None) -> int:
    try:
        trace = load_trace_file(path)
    except ReplayFormatError as exc:
        print(exc, file=sys.stderr)
        return 2
    if indices is not None:
        frames = tuple(ReplayFrame(f.offset, tuple(s for s in f.samples if s.index in indices))
                       for f in trace.frames)
        trace = replace(trace, frames=tuple(f for f in frames if f.samples))
        if not trace.frames:
            print(f"{trace.origin}:0: the trace holds none of GPUs {', '.join(map(str, indices))}",
                  file=sys.stderr)
            return 2
    print(format_trace_summary(trace), end="")
    return 0


def run_gpus(args: argparse.Namespace) -> int:
    indices = _indices(args)
    kind, _, path = str(args.telemetry).strip().partition(":")
    if kind.lower() == "replay" and path.strip():
        return _summarise(path.strip(), indices)
    try:
        source, note = open_source(
            args.telemetry, clock=SystemClock(), busy_seconds=lambda: 0.0, inflight=lambda: 0,
            sim_speed=args.sim_speed, replay_loop=args.replay_loop, gpu_indices=indices,
        )
    except TelemetrySpecError as exc:
        print(f"meltguard gpus: {exc}", file=sys.stderr)
        return 2
    except NvmlUnavailable as exc:
        print(f"meltguard gpus: {exc}", file=sys.stderr)
        return 1
    try:
        if note:
            print(f"note: {note}")
        print(format_table(source.read(), source.kind))
    except TelemetryError as exc:
        print(f"meltguard gpus: telemetry read failed: {exc}", file=sys.stderr)
        return 1
    finally:
        source.close()
    return 0
