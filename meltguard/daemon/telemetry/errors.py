"""Errors of the telemetry layer: what the sampler counts and what the CLI says at startup."""

from __future__ import annotations


class TelemetryError(Exception):
    """A read that failed as a whole. `name` is the `error` label of telemetry_errors_total, so it
    comes from a small fixed vocabulary (e.g. `nvml_unknown`), never from free text."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine. `reason` is one line a person can act on; `auto`
    telemetry falls back to the simulated GPU with it, `--telemetry nvml` exits with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TelemetrySpecError(ValueError):
    """A `--telemetry` value or replay file that cannot be used; the message is one line."""
