"""In-process QuotaStore: the reference semantics every other store is tested against."""

from __future__ import annotations

from collections.abc import Sequence

from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

# Costs are fractions of a reference image; a tolerance keeps 3 x (1/3) within a limit of 1.
EPSILON = 1e-9


class MemoryQuotaStore:
    """Fixed windows aligned to the epoch; one dict entry per (key, window id)."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, int], float] = {}
        self._ends: dict[tuple[str, int], float] = {}

    @property
    def name(self) -> str:
        return "memory"

    def _state(self, window: QuotaWindow, now: float) -> WindowState:
        used = self._used.get((window.key, window.window_id(now)), 0.0)
        return WindowState(window=window, used=used, reset_at=window.reset_at(now))

    async def consume(
        self, windows: Sequence[QuotaWindow], cost: float, now: float
    ) -> QuotaOutcome:
        used_by_slot = self._used
        # One pass computes each window's slot, usage and reset once.
        looked: list[tuple[QuotaWindow, tuple[str, int], float, float]] = []
        fits = True
        for window in windows:
            period = window.period
            window_id = int(now // period)
            slot = (window.key, window_id)
            used = used_by_slot.get(slot, 0.0)
            looked.append((window, slot, used, (window_id + 1) * period))
            if used + cost > window.limit + EPSILON:
                fits = False
        if not fits:
            states = tuple(WindowState(w, used, reset) for w, _, used, reset in looked)
            exhausted = next(s for s in states if s.used + cost > s.window.limit + EPSILON)
            return QuotaOutcome(False, states, exhausted=exhausted, charged_at=now)
        ends = self._ends
        charged = []
        for window, slot, used, reset in looked:
            used_by_slot[slot] = total = used + cost
            ends[slot] = reset
            charged.append(WindowState(window, total, reset))
        self._expire(now)
        return QuotaOutcome(True, tuple(charged), charged_at=now)

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float) -> None:
        for window in windows:
            slot = (window.key, window.window_id(charged_at))
            if slot in self._used:
                self._used[slot] = max(self._used[slot] - cost, 0.0)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        states = tuple(self._state(w, now) for w in windows)
        exhausted = next((s for s in states if s.remaining <= EPSILON), None)
        return QuotaOutcome(exhausted is None, states, exhausted=exhausted, charged_at=now)

    async def close(self) -> None:
        self._used.clear()
        self._ends.clear()

    def _expire(self, now: float) -> None:
        # Bounded memory: forget windows that ended, checked only once the map has grown.
        if len(self._used) < 4096:
            return
        self._used = {slot: used for slot, used in self._used.items() if self._ends[slot] > now}
        self._ends = {slot: end for slot, end in self._ends.items() if slot in self._used}
