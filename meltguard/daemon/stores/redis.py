"""Redis quota store: one set of counters for every replica of the daemon.

Each call is one Lua script, so checking and charging all of a tenant's windows is atomic on
the server. The script reads the clock with Redis `TIME`: replicas whose clocks disagree still
agree on which window a charge falls in, and `QuotaOutcome.charged_at` reports that time so a
refund goes back to the same window. Tests and `meltguard simulate` may pass their own clock
(`caller_clock=True`); production passes none.

Keys are `QuotaWindow.key` (which carries the `{mg:tenant}` hash tag) plus `:<window id>`. The
script is handed the base keys and derives the window's key itself, because only the server
knows which window is current; the hash tag keeps the derived keys on the declared keys' slot,
so the script stays valid on Redis Cluster.

A store call never hangs: connect and socket timeouts are tens of milliseconds, the whole call
has a deadline, and redis-py drops a connection that timed out or was cancelled, so the next call
dials a fresh one. Every failure is a `QuotaStoreError`; the caller applies `on_store_error`.

An over-limit cache answers repeated refusals without a round trip: once Redis says a window is
exhausted, its usage is remembered until the window ends, and a consume that cannot fit on top
of that usage is refused locally. Usage only grows within a window, so the cached value is a
lower bound and the local refusal is one Redis would also give. The exception is a refund made
by another replica, which this one does not see; it is late by at most the window's remainder,
and only for a tenant who had already hit the limit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError
from redis.retry import Retry

from meltguard.admission.quota_memory import EPSILON
from meltguard.daemon.stores.errors import QuotaStoreError
from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

PASSWORD_ENV = "MELTGUARD_REDIS_PASSWORD"

# The Lua twin of Python's float `//` (CPython's float_floor_div), so that a window id computed
# here is bit-for-bit the one QuotaWindow.window_id computes: math.floor(a / b) differs when the
# quotient rounds across an integer (1 // 0.1 is 9.0 but floor(1 / 0.1) is 10).
# Floats travel as "%.17g" strings both ways: Lua numbers are doubles like Python's, and 17
# significant digits round-trip a double exactly, so the stored usage is what MemoryQuotaStore
# would hold. (A Lua number in a reply would be truncated to an integer.)
_LUA_COMMON = """
local function floordiv(a, b)
  local mod = math.fmod(a, b)
  local div = (a - mod) / b
  if mod ~= 0 and ((b < 0) ~= (mod < 0)) then
    div = div - 1.0
  end
  if div ~= 0 then
    local fl = math.floor(div)
    if div - fl > 0.5 then
      fl = fl + 1.0
    end
    return fl
  end
  return 0
end
local function fmt(x)
  return string.format('%.17g', x)
end
local function clock(arg)
  if arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return tonumber(arg)
end
"""

# KEYS[i]: base key of window i. ARGV: cost, now ('' = Redis TIME), then limit_i, period_i.
# Reply: {allowed 0|1, index of the exhausted window or 0, now, used_1, reset_1, used_2, ...}.
_CONSUME = (
    _LUA_COMMON
    + f"""
local epsilon = {EPSILON!r}
local cost = tonumber(ARGV[1])
local now = clock(ARGV[2])
local n = #KEYS
local slots, used, resets = {{}}, {{}}, {{}}
local exhausted = 0
for i = 1, n do
  local limit = tonumber(ARGV[1 + 2 * i])
  local period = tonumber(ARGV[2 + 2 * i])
  local wid = floordiv(now, period)
  slots[i] = KEYS[i] .. ':' .. string.format('%.0f', wid)
  used[i] = tonumber(redis.call('GET', slots[i]) or '0')
  resets[i] = (wid + 1) * period
  if exhausted == 0 and used[i] + cost > limit + epsilon then
    exhausted = i
  end
end
if exhausted == 0 then
  for i = 1, n do
    used[i] = used[i] + cost
    -- Relative expiry from the script's clock: with Redis TIME it is the window's end; with a
    -- caller's clock (tests) a key far in the past still lives long enough to be refunded.
    local ttl = math.ceil((resets[i] - now) * 1000)
    redis.call('SET', slots[i], fmt(used[i]), 'PX', ttl)
  end
end
local reply = {{exhausted == 0 and 1 or 0, exhausted, fmt(now)}}
for i = 1, n do
  reply[#reply + 1] = fmt(used[i])
  reply[#reply + 1] = fmt(resets[i])
end
return reply
"""
)

# KEYS[i]: base key of window i. ARGV: cost, charged_at, then period_i. A window that already
# ended (key expired) is left alone; a live one never goes below zero and keeps its expiry.
_REFUND = (
    _LUA_COMMON
    + """
local cost = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
for i = 1, #KEYS do
  local period = tonumber(ARGV[2 + i])
  local slot = KEYS[i] .. ':' .. string.format('%.0f', floordiv(at, period))
  local value = redis.call('GET', slot)
  if value then
    local left = tonumber(value) - cost
    if left < 0 then
      left = 0
    end
    redis.call('SET', slot, fmt(left), 'KEEPTTL')
  end
end
return 1
"""
)

# KEYS[i]: base key of window i. ARGV: now ('' = Redis TIME), then period_i. Read-only.
# Reply: {now, used_1, reset_1, used_2, reset_2, ...}.
_PEEK = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local reply = {fmt(now)}
for i = 1, #KEYS do
  local period = tonumber(ARGV[1 + i])
  local wid = floordiv(now, period)
  local value = redis.call('GET', KEYS[i] .. ':' .. string.format('%.0f', wid))
  reply[#reply + 1] = value or '0'
  reply[#reply + 1] = fmt((wid + 1) * period)
end
return reply
"""
)

# Past this many remembered windows the cache drops the ones that ended; it only ever holds
# tenants who hit a limit, so this is reached only under a flood of distinct exhausted tenants.
_CACHE_SWEEP_AT = 65_536


class RedisQuotaStore:
    """Quota counters in Redis (`redis://HOST:PORT/DB`, `rediss://` for TLS).

    `password` is used when the URL carries none; without either, `MELTGUARD_REDIS_PASSWORD`.
    `deadline` bounds a whole call (reconnect and script load included). `caller_clock=True`
    makes the scripts use the `now` they are given instead of Redis `TIME`: for tests and
    simulations only. Nothing connects until the first call (or `ping()`).
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        connect_timeout: float = 0.05,
        socket_timeout: float = 0.05,
        deadline: float = 0.2,
        caller_clock: bool = False,
        over_limit_cache: bool = True,
        max_connections: int = 16,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"redis store URL must start with redis:// or rediss://, got {redact_url(url)!r}"
            )
        if not parts.hostname:
            raise ValueError(f"redis store URL has no host: {redact_url(url)!r}")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(
                f"redis store URL path must be a database number (redis://HOST:PORT/0), "
                f"got {redact_url(url)!r}"
            )
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"redis store URL has a bad port: {redact_url(url)!r}") from exc
        if password is None and parts.password is None:
            password = os.environ.get(PASSWORD_ENV) or None
        options: dict[str, Any] = {}
        if password is not None:
            options["password"] = password
        self._url = redact_url(url)
        self._deadline = deadline
        self._caller_clock = caller_clock
        self._use_cache = over_limit_cache
        # A bounded pool: a burst waits (within the deadline) for a warm connection instead of
        # dialling dozens of new ones, whose 50 ms connect timeout a busy loop can miss.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=deadline,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            # No retries: a consume is not idempotent (a retry after a lost reply charges twice)
            # and the deadline leaves no room; the caller's on_store_error decides instead.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            # Skips CLIENT SETINFO, so a reconnect is one round trip shorter.
            driver_info=None,
            **options,
        )
        self._client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._consume_script = self._client.register_script(_CONSUME)
        self._refund_script = self._client.register_script(_REFUND)
        self._peek_script = self._client.register_script(_PEEK)
        # window key -> (window id, used, reset_at) last reported by a refusal.
        self._refused: dict[str, tuple[int, float, float]] = {}

    @property
    def name(self) -> str:
        return "redis"

    @property
    def url(self) -> str:
        """The URL with any password masked, for logs."""
        return self._url

    async def ping(self) -> None:
        """One round trip within the deadline (startup, readiness)."""
        await self._call(self._client.ping())

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
        args: list[str | float] = [repr(float(cost)), self._now_arg(now)]
        for w in windows:
            args.append(repr(float(w.limit)))
            args.append(repr(float(w.period)))
        reply = await self._call(
            self._consume_script(keys=[w.key for w in windows], args=args)
        )
        try:
            allowed = int(reply[0]) == 1
            exhausted_index = int(reply[1])
            charged_at = float(reply[2])
            states = tuple(
                WindowState(
                    window=w, used=float(reply[3 + 2 * i]), reset_at=float(reply[4 + 2 * i])
                )
                for i, w in enumerate(windows)
            )
        except (IndexError, TypeError, ValueError) as exc:
            raise QuotaStoreError(self.name, f"unexpected reply {reply!r}") from exc
        if allowed:
            if self._refused:
                # Keep remembered usage exact: a smaller request may fit after a refusal.
                self._remember(states, charged_at, now, only_known=True)
            return QuotaOutcome(True, states, charged_at=charged_at)
        if self._use_cache:
            self._remember(states, charged_at, now)
        exhausted = states[exhausted_index - 1] if exhausted_index else None
        return QuotaOutcome(False, states, exhausted=exhausted, charged_at=charged_at)

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
        args: list[str | float] = [repr(float(cost)), repr(float(charged_at))]
        args.extend(repr(float(w.period)) for w in windows)
        await self._call(self._refund_script(keys=[w.key for w in windows], args=args))

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        args: list[str | float] = [self._now_arg(now)]
        args.extend(repr(float(w.period)) for w in windows)
        reply = await self._call(self._peek_script(keys=[w.key for w in windows], args=args))
        try:
            at = float(reply[0])
            states = tuple(
                WindowState(
                    window=w, used=float(reply[1 + 2 * i]), reset_at=float(reply[2 + 2 * i])
                )
                for i, w in enumerate(windows)
            )
        except (IndexError, TypeError, ValueError) as exc:
            raise QuotaStoreError(self.name, f"unexpected reply {reply!r}") from exc
        exhausted = next((s for s in states if s.remaining <= EPSILON), None)
        return QuotaOutcome(exhausted is None, states, exhausted=exhausted, charged_at=at)

    async def close(self) -> None:
        self._refused.clear()
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.aclose()
        except (TimeoutError, RedisError, OSError):
            pass  # closing a store whose server is gone must not fail shutdown

    def forget_refusals(self) -> None:
        """Drop the over-limit cache (after an operator reset a tenant's quota by hand)."""
        self._refused.clear()

    def _now_arg(self, now: float) -> str:
        return repr(float(now)) if self._caller_clock else ""

    async def _call(self, awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await awaitable
        except TimeoutError as exc:
            # asyncio's deadline and redis-py's socket timeout both land here.
            raise QuotaStoreError(
                self.name, f"{self._url}: no answer within {self._deadline:g} s"
            ) from exc
        except RedisError as exc:
            if isinstance(exc, ReadOnlyError):
                # After a failover the pooled sockets still reach the old primary, now a
                # replica, and would get READONLY forever: dial again (and re-resolve DNS).
                await self._drop_connections()
            raise QuotaStoreError(self.name, f"{self._url}: {exc}") from exc
        except OSError as exc:
            raise QuotaStoreError(self.name, f"{self._url}: {exc}") from exc

    async def _drop_connections(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.connection_pool.disconnect()
        except (TimeoutError, RedisError, OSError):
            pass  # the next call dials anyway; this only hurries it

    def _cached_refusal(
        self, windows: Sequence[QuotaWindow], cost: float, now: float
    ) -> QuotaOutcome | None:
        # The cache is checked on the caller's (local wall) clock: a skew against Redis TIME
        # only turns a would-be hit into a round trip, because window ids must match exactly.
        states: list[WindowState] = []
        exhausted: WindowState | None = None
        for w in windows:
            entry = self._refused.get(w.key)
            if entry is None:
                return None
            wid, used, reset_at = entry
            current = w.window_id(now)
            if wid != current:
                if wid < current:
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
        self,
        states: tuple[WindowState, ...],
        charged_at: float,
        now: float,
        *,
        only_known: bool = False,
    ) -> None:
        if len(self._refused) >= _CACHE_SWEEP_AT:
            self._refused = {k: e for k, e in self._refused.items() if e[2] > now}
        for s in states:
            if only_known and s.window.key not in self._refused:
                continue
            self._refused[s.window.key] = (s.window.window_id(charged_at), s.used, s.reset_at)


def redact_url(url: str) -> str:
    """The URL with its password masked: URLs end up in logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()
