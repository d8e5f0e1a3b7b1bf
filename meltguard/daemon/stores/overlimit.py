"""The over-limit cache: repeated refusals answered without asking the store, for any store.

A tenant over its quota keeps asking (clients retry, dashboards poll); each ask costs a store
round trip that can only say no again. Once the store refuses a window, its usage is kept here
for `hold` seconds (of the caller's clock), and a consume that cannot fit on top of that usage
is refused locally. A consume that could fit (a smaller request, a limit raised by an easing
quota_factor) still goes to the store.

The bound that matters: this cache never refuses what the store would admit for longer than
`hold` (1 s by default). Within that second the store may have changed behind it (a refund by
another replica, a Redis restart or FLUSHALL, an operator resetting a tenant); after it, the
store is asked again. This replica's own refunds forget the windows at once. (envoyproxy/
ratelimit's local over-limit cache, with a short expiry instead of the window's end.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meltguard.admission.quota_memory import EPSILON
from meltguard.protocols import QuotaStore
from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

HOLD_SECONDS = 1.0
# Past this many remembered windows the ones whose hold ended are dropped.
_SWEEP_AT = 65_536


class OverLimitCache:
    """A QuotaStore that answers a refusal it saw under `hold` seconds ago by itself."""

    def __init__(self, inner: QuotaStore, *, hold: float = HOLD_SECONDS) -> None:
        if hold < 0:
            raise ValueError(f"hold must be >= 0 seconds, got {hold!r}")
        self.inner = inner
        self._hold = hold
        # window key -> (window id, used, reset_at, remembered until)
        self._refused: dict[str, tuple[int, float, float, float]] = {}

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr: str) -> Any:
        # ping(), url, path ...: whatever the store offers beyond the Protocol. (`inner`
        # itself is looked up here only on an object built without __init__: copy, pickle.)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        if self._refused:
            cached = self._cached_refusal(windows, cost, now)
            if cached is not None:
                return cached
        outcome = await self.inner.consume(windows, cost, now, charge_id=charge_id)
        if outcome.allowed:
            if self._refused:
                # Keep remembered usage exact: a smaller request may fit after a refusal.
                self._remember(outcome.windows, now, only_known=True)
        elif outcome.exhausted is not None and self._hold > 0:
            self._remember(outcome.windows, now)
        return outcome

    async def refund(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        charged_at: float,
        *,
        charge_id: str | None = None,
    ) -> None:
        for w in windows:
            self._refused.pop(w.key, None)
        await self.inner.refund(windows, cost, charged_at, charge_id=charge_id)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        outcome = await self.inner.peek(windows, now)
        if self._refused:
            # The store's word is newer: a window it reports lower than remembered is let go.
            for state in outcome.windows:
                entry = self._refused.get(state.window.key)
                if entry is not None and state.used + EPSILON < entry[1]:
                    del self._refused[state.window.key]
        return outcome

    async def close(self) -> None:
        self._refused.clear()
        await self.inner.close()

    def forget(self) -> None:
        """Drop every remembered refusal (after an operator reset a quota by hand)."""
        self._refused.clear()

    def _cached_refusal(
        self, windows: Sequence[QuotaWindow], cost: float, now: float
    ) -> QuotaOutcome | None:
        states: list[WindowState] = []
        exhausted: WindowState | None = None
        for w in windows:
            entry = self._refused.get(w.key)
            if entry is None:
                return None
            wid, used, reset_at, until = entry
            if now >= until or wid != w.window_id(now):
                del self._refused[w.key]
                return None
            state = WindowState(window=w, used=used, reset_at=reset_at)
            states.append(state)
            # Checked against today's limit, not the one refused: when pressure eases and the
            # quota_factor rises, the tenant gets through at once.
            if exhausted is None and used + cost > w.limit + EPSILON:
                exhausted = state
        if exhausted is None:
            return None
        return QuotaOutcome(False, tuple(states), exhausted=exhausted, charged_at=now)

    def _remember(
        self, states: tuple[WindowState, ...], now: float, *, only_known: bool = False
    ) -> None:
        if len(self._refused) >= _SWEEP_AT:
            self._refused = {k: e for k, e in self._refused.items() if e[3] > now}
        until = now + self._hold
        for s in states:
            key = s.window.key
            if only_known:
                entry = self._refused.get(key)
                if entry is None:
                    continue
                until = entry[3]
            # The window is named by its end (reset_at), which the store reports in its own
            # clock; the id is taken from there, so a skewed caller clock only misses the cache.
            wid = s.window.window_id(s.reset_at - s.window.period / 2)
            self._refused[key] = (wid, s.used, s.reset_at, until)
