"""In-process QuotaStore: the reference semantics every other store is tested against."""

from __future__ import annotations

from collections.abc import Sequence

from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

# Costs are fractions of a reference image; a tolerance keeps 3 x (1/3) within a limit of 1.
EPSILON = 1e-9


class MemoryQuotaStore:
    """Fixed windows aligned to the epoch; one dict entry per (key, window end). The end
    names the window (a key's windows all have its one period) and tells when the entry
    may be forgotten."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, float], float] = {}
        # charge id -> (still charged?, when the record may be forgotten: its last window's end)
        self._charges: dict[str, tuple[bool, float]] = {}
        self._forget_at = _FORGET_AT

    @property
    def name(self) -> str:
        return "memory"

    def _state(self, window: QuotaWindow, now: float) -> WindowState:
        reset_at = window.reset_at(now)
        used = self._used.get((window.key, reset_at), 0.0)
        return WindowState(window=window, used=used, reset_at=reset_at)

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        if charge_id is not None and charge_id in self._charges:
            # A retried consume, or one whose refund (a void) arrived first: never charge twice.
            still_charged, _ = self._charges[charge_id]
            return QuotaOutcome(still_charged, tuple(self._state(w, now) for w in windows),
                                charged_at=now)
        used_by_slot = self._used
        # One pass looks up each window's slot and usage once; the charge follows only when
        # every window has room.
        looked: list[tuple[tuple[str, float], float]] = []
        fits = True
        for window in windows:
            period = window.period
            slot = (window.key, (now // period + 1) * period)  # window.reset_at(now), inline
            used = used_by_slot.get(slot, 0.0)
            looked.append((slot, used))
            if used + cost > window.limit + EPSILON:
                fits = False
        if not fits:
            states = tuple(WindowState(window, used, slot[1])
                           for window, (slot, used) in zip(windows, looked, strict=True))
            exhausted = next(s for s in states if s.used + cost > s.window.limit + EPSILON)
            return QuotaOutcome(False, states, exhausted=exhausted, charged_at=now)
        charged = []
        for window, (slot, used) in zip(windows, looked, strict=True):
            used_by_slot[slot] = total = used + cost
            charged.append(WindowState(window, total, slot[1]))
        if charge_id is not None:
            self._charges[charge_id] = (True, _last_end(windows, now))
        if len(used_by_slot) + len(self._charges) >= self._forget_at:
            self._expire(now)
        return QuotaOutcome(True, tuple(charged), charged_at=now)

    async def refund(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        charged_at: float,
        *,
        charge_id: str | None = None,
    ) -> None:
        if charge_id is not None:
            still_charged, _ = self._charges.get(charge_id, (False, 0.0))
            self._charges[charge_id] = (False, _last_end(windows, charged_at))
            if not still_charged:
                return  # refunded before, or never charged: the id is now void
        for window in windows:
            slot = (window.key, window.reset_at(charged_at))
            if slot in self._used:
                self._used[slot] = max(self._used[slot] - cost, 0.0)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        states = tuple(self._state(w, now) for w in windows)
        exhausted = next((s for s in states if s.remaining <= EPSILON), None)
        return QuotaOutcome(exhausted is None, states, exhausted=exhausted, charged_at=now)

    async def close(self) -> None:
        self._used.clear()
        self._charges.clear()

    def _expire(self, now: float) -> None:
        # Bounded memory: forget windows that ended, checked only once the map has grown.
        self._used = {slot: used for slot, used in self._used.items() if slot[1] > now}
        self._charges = {cid: rec for cid, rec in self._charges.items() if rec[1] > now}
        # Charge records live a day: scan again only once the map has doubled.
        self._forget_at = max(_FORGET_AT, 2 * (len(self._used) + len(self._charges)))


_FORGET_AT = 4096


def _last_end(windows: Sequence[QuotaWindow], at: float) -> float:
    return max((w.reset_at(at) for w in windows), default=at)
