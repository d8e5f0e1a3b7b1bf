"""A loaded trace: its frames (all GPUs at one instant) and what the reader learnt about it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meltguard.values import GpuSample


@dataclass(frozen=True, slots=True)
class ReplayFrame:
    """All GPUs at one instant of the trace; `taken_at` in the samples is filled in at read."""

    offset: float
    samples: tuple[GpuSample, ...]


@dataclass(frozen=True, slots=True)
class Trace:
    origin: str
    format: str  # e.g. "nvidia-smi --query-gpu CSV"
    frames: tuple[ReplayFrame, ...]
    notes: tuple[str, ...] = ()  # how it was read: encoding, the GPU column, assumed intervals
    started: str | None = None  # the first frame's time as the file gives it, when it does


def frames_from_samples(
    timeline: Iterable[tuple[float, Sequence[GpuSample]]],
) -> tuple[ReplayFrame, ...]:
    """Frames from (offset, samples) pairs, for tests and tools that record in-process."""
    return tuple(ReplayFrame(offset, tuple(samples)) for offset, samples in timeline)
