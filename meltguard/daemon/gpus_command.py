"""`meltguard gpus`: one read of the selected telemetry source, printed as a table."""

from __future__ import annotations

import argparse
import sys

from meltguard.clock import SystemClock
from meltguard.daemon.telemetry import (
    NvmlUnavailable,
    TelemetryError,
    TelemetrySpecError,
    format_table,
    open_source,
)


def run_gpus(args: argparse.Namespace) -> int:
    indices = tuple(int(x) for x in str(args.gpus).split(",") if x.strip()) if args.gpus else None
    try:
        source, note = open_source(
            args.telemetry, clock=SystemClock(), busy_seconds=lambda: 0.0, inflight=lambda: 0,
            sim_speed=args.sim_speed, replay_loop=args.replay_loop, gpu_indices=indices,
        )
    except (NvmlUnavailable, TelemetrySpecError) as exc:
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
