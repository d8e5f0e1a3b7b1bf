"""Replays a recorded trace against a clock, so an incident can be re-run against a policy.

Frames play at their offset from the first frame, counted from the first read on the injected
clock. After the last frame has been shown for one typical frame gap, a looping source starts over
and a non-looping one returns no samples, so the sampler goes stale as it would on a dead reader.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from meltguard.daemon.telemetry.replay.detect import load_trace_file
from meltguard.daemon.telemetry.replay.errors import ReplayFormatError
from meltguard.daemon.telemetry.replay.trace import ReplayFrame, Trace
from meltguard.protocols import Clock
from meltguard.values import GpuSample

_DEFAULT_GAP = 1.0


class ReplaySource:
    """TelemetrySource that plays frames against `clock`; build it with `from_file`."""

    def __init__(
        self,
        frames: Sequence[ReplayFrame],
        *,
        clock: Clock,
        loop: bool = False,
        origin: str = "<frames>",
    ) -> None:
        if not frames:
            raise ReplayFormatError(f"{origin}:0: trace holds no samples")
        self._frames = tuple(frames)
        self._offsets = [frame.offset for frame in self._frames]
        self._clock = clock
        self._loop = loop
        self._start: float | None = None
        self.origin = origin
        gaps = [b - a for a, b in zip(self._offsets, self._offsets[1:], strict=False) if b > a]
        # The last frame stays valid as long as frames usually do: one typical gap.
        self.duration = self._offsets[-1] + (statistics.median(gaps) if gaps else _DEFAULT_GAP)

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Clock, loop: bool = False) -> ReplaySource:
        """`path` may carry read options: `FILE?columns=...` (see replay.options)."""
        return cls.from_trace(load_trace_file(path), clock=clock, loop=loop)

    @classmethod
    def from_trace(cls, trace: Trace, *, clock: Clock, loop: bool = False) -> ReplaySource:
        return cls(trace.frames, clock=clock, loop=loop, origin=trace.origin)

    @property
    def kind(self) -> str:
        return "replay"

    @property
    def frames(self) -> tuple[ReplayFrame, ...]:
        return self._frames

    def read(self) -> Sequence[GpuSample]:
        now = self._clock.monotonic()
        if self._start is None:
            self._start = now
        elapsed = now - self._start
        if elapsed >= self.duration:
            if not self._loop:
                return []
            elapsed = math.fmod(elapsed, self.duration)
        frame = self._frames[bisect.bisect_right(self._offsets, elapsed) - 1]
        return [replace(sample, taken_at=now) for sample in frame.samples]

    def close(self) -> None:
        pass
