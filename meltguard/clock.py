"""The real clock and a fake one for tests; both satisfy protocols.Clock."""

from __future__ import annotations

import asyncio
import time


class SystemClock:
    # The time module's functions themselves, not methods wrapping them: the gate reads the
    # clock on every decision, and a call straight into C costs no Python frame.
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """Advances only when told to; `sleep` advances it and yields once so tasks interleave."""

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_767_225_600.0) -> None:
        self._now = start
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never runs backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)
