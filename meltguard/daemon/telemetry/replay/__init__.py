"""Replay of recorded GPU telemetry: the formats operators have on disk, detected from the file
(nvidia-smi --query-gpu CSV, nvidia-smi dmon, DCGM exporter metrics, meltguard JSONL, CSV with
named columns), and a TelemetrySource that plays a trace against a clock."""

from meltguard.daemon.telemetry.replay.detect import (
    load_trace,
    load_trace_file,
    parse_nvidia_smi_csv,
    parse_text,
    parse_trace,
)
from meltguard.daemon.telemetry.replay.errors import FORMATS_READ, ReplayFormatError
from meltguard.daemon.telemetry.replay.jsonl import parse_jsonl
from meltguard.daemon.telemetry.replay.options import ReadOptions, split_spec
from meltguard.daemon.telemetry.replay.source import ReplaySource
from meltguard.daemon.telemetry.replay.trace import ReplayFrame, Trace, frames_from_samples

__all__ = [
    "FORMATS_READ",
    "ReadOptions",
    "ReplayFormatError",
    "ReplayFrame",
    "ReplaySource",
    "Trace",
    "frames_from_samples",
    "load_trace",
    "load_trace_file",
    "parse_jsonl",
    "parse_nvidia_smi_csv",
    "parse_text",
    "parse_trace",
    "split_spec",
]
