"""The one error of the replay reader and the list of formats it names when it refuses a file."""

from __future__ import annotations

from meltguard.daemon.telemetry.errors import TelemetrySpecError

FORMATS_READ = (
    "nvidia-smi --query-gpu CSV, nvidia-smi dmon, DCGM exporter metrics (Prometheus text with "
    "timestamps), meltguard JSONL (meltguard record), CSV with named columns"
)


class ReplayFormatError(TelemetrySpecError):
    """A trace that cannot be read; the message is one line, `FILE:LINE: what is wrong and what
    was seen`."""


def refuse(origin: str, line: int, message: str) -> ReplayFormatError:
    return ReplayFormatError(f"{origin}:{line}: {message}")


def shown(text: str, limit: int = 60) -> str:
    """A cell or line quoted for a message, cut so a refusal stays one readable line."""
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(cut)
