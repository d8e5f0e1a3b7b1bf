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

A named charge (`charge_id`) is one more key beside the windows', `<hash tag>:charge:<id>`,
holding 1 while charged and 0 once given back or voided; it expires when the charge's last
window ends (a minute at least), so a retried consume or refund, or a refund that overtook its
consume, is answered from it inside the same script.

Every script is loaded (`SCRIPT LOAD`) when the store first reaches the server and again after
any connection failure (a restarted Redis has forgotten them); a call answered NOSCRIPT loads
them all and is tried once more, which is safe because NOSCRIPT means nothing ran.

Refusals are not cached here: `OverLimitCache` (overlimit.py) does that for any store.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

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

# KEYS[i]: base key of window i, then the charge key when ARGV[3] is '1'. ARGV: cost, now
# ('' = Redis TIME), has charge key, then limit_i, period_i.
# Reply: {allowed 0|1, index of the exhausted window or 0, now, used_1, reset_1, used_2, ...}.
_CONSUME = (
    _LUA_COMMON
    + f"""
local epsilon = {EPSILON!r}
local cost = tonumber(ARGV[1])
local now = clock(ARGV[2])
local named = ARGV[3] == '1'
local n = #KEYS
if named then
  n = n - 1
end
local known = nil
if named then
  known = redis.call('GET', KEYS[#KEYS])
end
local slots, used, resets = {{}}, {{}}, {{}}
local exhausted = 0
local last_end = now
for i = 1, n do
  local limit = tonumber(ARGV[2 + 2 * i])
  local period = tonumber(ARGV[3 + 2 * i])
  local wid = floordiv(now, period)
  slots[i] = KEYS[i] .. ':' .. string.format('%.0f', wid)
  used[i] = tonumber(redis.call('GET', slots[i]) or '0')
  resets[i] = (wid + 1) * period
  if resets[i] > last_end then
    last_end = resets[i]
  end
  if exhausted == 0 and used[i] + cost > limit + epsilon then
    exhausted = i
  end
end
local allowed = exhausted == 0
if known then
  -- A retried consume, or one whose refund (a void) arrived first: never charge twice.
  allowed = known == '1'
  exhausted = 0
elseif allowed then
  for i = 1, n do
    used[i] = used[i] + cost
    -- Relative expiry from the script's clock: with Redis TIME it is the window's end; with a
    -- caller's clock (tests) a key far in the past still lives long enough to be refunded.
    local ttl = math.ceil((resets[i] - now) * 1000)
    redis.call('SET', slots[i], fmt(used[i]), 'PX', ttl)
  end
  if named then
    redis.call('SET', KEYS[#KEYS], '1', 'PX', math.max(math.ceil((last_end - now) * 1000), 60000))
  end
end
local reply = {{allowed and 1 or 0, exhausted, fmt(now)}}
for i = 1, n do
  reply[#reply + 1] = fmt(used[i])
  reply[#reply + 1] = fmt(resets[i])
end
return reply
"""
)

# KEYS[i]: base key of window i, then the charge key when ARGV[4] is '1'. ARGV: cost,
# charged_at, now ('' = Redis TIME), has charge key, then period_i. A window that already ended
# (key expired) is left alone; a live one never goes below zero and keeps its expiry. A named
# charge is given back once; an unknown id is voided (a tombstone until its last window ends).
_REFUND = (
    _LUA_COMMON
    + """
local cost = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local named = ARGV[4] == '1'
local n = #KEYS
if named then
  n = n - 1
  local now = clock(ARGV[3])
  local last_end = at
  for i = 1, n do
    local period = tonumber(ARGV[4 + i])
    local ends = (floordiv(at, period) + 1) * period
    if ends > last_end then
      last_end = ends
    end
  end
  local was = redis.call('GET', KEYS[#KEYS])
  redis.call('SET', KEYS[#KEYS], '0', 'PX', math.max(math.ceil((last_end - now) * 1000), 60000))
  if was ~= '1' then
    return 0
  end
end
for i = 1, n do
  local period = tonumber(ARGV[4 + i])
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



class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SCRIPTS = {"consume": _Script(_CONSUME), "refund": _Script(_REFUND), "peek": _Script(_PEEK)}


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
        self._scripts_loaded = False
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

    @property
    def name(self) -> str:
        return "redis"

    @property
    def url(self) -> str:
        """The URL with any password masked, for logs."""
        return self._url

    async def ping(self) -> None:
        """Reach the server and load the scripts, within the deadline (startup, readiness)."""
        await self._call(self._ping_and_load())

    async def _ping_and_load(self) -> None:
        await self._client.ping()
        await self._load_scripts()

    async def _load_scripts(self) -> None:
        for script in _SCRIPTS.values():
            await self._client.script_load(script.source)
        self._scripts_loaded = True

    async def _eval(self, name: str, keys: list[str], args: list[str]) -> Any:
        script = _SCRIPTS[name]
        if not self._scripts_loaded:
            await self._load_scripts()
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH) since the scripts were loaded: nothing ran.
            await self._load_scripts()
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        keys = [w.key for w in windows]
        args = [repr(float(cost)), self._now_arg(now), _named(keys, windows, charge_id)]
        for w in windows:
            args.append(repr(float(w.limit)))
            args.append(repr(float(w.period)))
        reply = await self._call(self._eval("consume", keys, args))
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
            return QuotaOutcome(True, states, charged_at=charged_at)
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
        keys = [w.key for w in windows]
        now_arg = repr(float(charged_at)) if self._caller_clock else ""
        args = [repr(float(cost)), repr(float(charged_at)), now_arg,
                _named(keys, windows, charge_id)]
        args.extend(repr(float(w.period)) for w in windows)
        await self._call(self._eval("refund", keys, args))

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        args = [self._now_arg(now)]
        args.extend(repr(float(w.period)) for w in windows)
        reply = await self._call(self._eval("peek", [w.key for w in windows], args))
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
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.aclose()
        except (TimeoutError, RedisError, OSError):
            pass  # closing a store whose server is gone must not fail shutdown

    def _now_arg(self, now: float) -> str:
        return repr(float(now)) if self._caller_clock else ""

    async def _call(self, awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await awaitable
        except TimeoutError as exc:
            # asyncio's deadline and redis-py's socket timeout both land here.
            self._scripts_loaded = False
            raise QuotaStoreError(
                self.name, f"{self._url}: no answer within {self._deadline:g} s"
            ) from exc
        except RedisError as exc:
            # The server may be a new one (restart, failover) that knows no scripts yet.
            self._scripts_loaded = False
            if isinstance(exc, ReadOnlyError):
                # After a failover the pooled sockets still reach the old primary, now a
                # replica, and would get READONLY forever: dial again (and re-resolve DNS).
                await self._drop_connections()
            raise QuotaStoreError(self.name, f"{self._url}: {exc}",
                                  maybe_applied=not _never_ran(exc)) from exc
        except OSError as exc:
            self._scripts_loaded = False
            raise QuotaStoreError(self.name, f"{self._url}: {exc}") from exc

    async def _drop_connections(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.connection_pool.disconnect()
        except (TimeoutError, RedisError, OSError):
            pass  # the next call dials anyway; this only hurries it


def _never_ran(exc: RedisError) -> bool:
    """Errors after which the command certainly did not run: the server could not be reached
    (redis-py says "... connecting to ..."), or it refused the command (a replica, an error
    reply such as NOSCRIPT)."""
    if isinstance(exc, (ReadOnlyError, ResponseError)):
        return True
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and "connecting" in str(exc)


def _named(keys: list[str], windows: Sequence[QuotaWindow], charge_id: str | None) -> str:
    """Append the charge's key to `keys` when there is one; the scripts' flag for it."""
    if charge_id is None or not windows:
        return "0"
    keys.append(charge_key(windows[0].key, charge_id))
    return "1"


def charge_key(window_key: str, charge_id: str) -> str:
    """The charge's key, on the tenant's hash tag so a script may touch it with the windows."""
    if window_key.startswith("{") and "}" in window_key:
        tag = window_key[: window_key.index("}") + 1]
    else:
        tag = window_key
    return f"{tag}:charge:{charge_id}"


_SECRET_QUERY = frozenset({"password", "pass", "auth", "token"})


def redact_url(url: str) -> str:
    """The URL with its password masked (in the userinfo and in `?password=`): URLs end up in
    logs, error messages and admin answers."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() in _SECRET_QUERY for k, _ in pairs):
        query = [(k, "***" if k.lower() in _SECRET_QUERY else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(query, safe="*"))
    if parts.password is None:
        return parts.geturl() if pairs else url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()
