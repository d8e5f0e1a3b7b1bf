"""Turns a `--telemetry` value into a source: auto | nvml | sim | replay:FILE."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetrySpecError
from meltguard.daemon.telemetry.nvml import open_nvml
from meltguard.daemon.telemetry.replay import ReplaySource
from meltguard.daemon.telemetry.simulated import SimulatedGpu
from meltguard.protocols import Clock, TelemetrySource

SPEC_HELP = "auto, nvml, sim or replay:FILE"


def requested_label(spec: str) -> str:
    """The `requested` label of telemetry_source_info: the file of `replay:FILE` is dropped so
    the label set stays bounded."""
    kind = spec.strip().split(":", 1)[0].lower()
    return kind or "auto"


def open_source(
    spec: str,
    *,
    clock: Clock,
    busy_seconds: Callable[[], float],
    inflight: Callable[[], int],
    sim_speed: float = 1.0,
    replay_loop: bool = False,
    gpu_indices: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[TelemetrySource, str | None]:
    """Open the source `spec` names. Returns (source, fallback_reason); fallback_reason is set
    only when `auto` had to use the simulated GPU, and says why in one line.

    Raises NvmlUnavailable for `nvml` on a machine without usable NVML (the CLI exits with its
    reason) and TelemetrySpecError for a bad spec or an unreadable replay trace.
    """
    text = spec.strip()
    kind = requested_label(text)

    def simulated() -> SimulatedGpu:
        return SimulatedGpu(
            clock=clock, busy_seconds=busy_seconds, inflight=inflight, speed=sim_speed
        )

    if kind == "auto" and ":" not in text:
        try:
            return open_nvml(clock=clock, gpu_indices=gpu_indices, environ=environ), None
        except NvmlUnavailable as exc:
            return simulated(), f"NVML unavailable ({exc.reason}); using the simulated GPU"
    if kind == "nvml" and ":" not in text:
        return open_nvml(clock=clock, gpu_indices=gpu_indices, environ=environ), None
    if kind == "sim" and ":" not in text:
        return simulated(), None
    if kind == "replay":
        path = text.split(":", 1)[1].strip() if ":" in text else ""
        if not path:
            raise TelemetrySpecError("--telemetry replay needs a file: replay:FILE")
        return ReplaySource.from_file(path, clock=clock, loop=replay_loop), None
    raise TelemetrySpecError(f"--telemetry must be {SPEC_HELP}, got {spec!r}")
