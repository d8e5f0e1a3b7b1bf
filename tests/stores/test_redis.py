"""RedisQuotaStore against a real redis-server: its clock, its keys, and its failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot

from meltguard.daemon.stores import QuotaStoreError, RedisQuotaStore
from meltguard.daemon.stores.redis import _SCRIPTS, PASSWORD_ENV, charge_key, redact_url
from meltguard.values import QuotaWindow

from .conftest import RedisServer, relaxed_store

# Generous bound for "fails fast": the deadline is 0.2 s; a loaded 2-core CI box gets slack.
FAILS_WITHIN = 2.0


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisQuotaStore]:
    made = relaxed_store(redis_server.url)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def fast(redis_server: RedisServer) -> AsyncIterator[RedisQuotaStore]:
    """A store with the production timeouts: the one whose failures are timed."""
    made = RedisQuotaStore(redis_server.url)
    try:
        yield made
    finally:
        await made.close()


async def eventually_peek(store: RedisQuotaStore, windows: list[QuotaWindow]) -> float:
    """Peek (read-only, so safe to repeat) until the store answers; the usage it reads."""
    give_up = time.monotonic() + FAILS_WITHIN
    while True:
        try:
            return (await store.peek(windows, time.time())).windows[0].used
        except QuotaStoreError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.05)


def day(tenant: str, limit: float = 3) -> list[QuotaWindow]:
    return [QuotaWindow(key=f"{tenant}:86400", limit=limit, period=86_400.0)]


async def fill(store: RedisQuotaStore, windows: list[QuotaWindow]) -> None:
    while (await store.consume(windows, 1, time.time())).allowed:
        pass


async def test_uses_redis_time_and_hash_tagged_keys_with_expiry(
    store: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    # A caller clock years off is ignored: the server's TIME decides the window.
    outcome = await store.consume(windows, 1, 0.0)
    assert outcome.allowed
    assert abs(outcome.charged_at - time.time()) < 5
    window_id = int(outcome.charged_at // 86_400)
    assert outcome.windows[0].reset_at == (window_id + 1) * 86_400
    client = redis_server.client()
    try:
        key = f"{tenant}:86400:{window_id}"
        assert client.keys(f"{tenant}*") == [key.encode()]
        assert float(client.get(key) or 0) == 1.0
        ttl = client.pttl(key) / 1000
        assert 0 < ttl <= outcome.windows[0].reset_at - outcome.charged_at + 1
        # All of a tenant's keys hash to its tag's cluster slot, so one script may touch them.
        assert key_slot(key.encode()) == key_slot(f"{tenant}:60:1".encode())
    finally:
        client.close()
    await store.refund(windows, 1, outcome.charged_at)
    assert (await store.peek(windows, 0.0)).windows[0].used == 0


async def test_server_clock_window_resets_at_its_boundary(
    store: RedisQuotaStore, tenant: str
) -> None:
    windows = [QuotaWindow(key=f"{tenant}:0.25", limit=1, period=0.25)]
    first = await store.consume(windows, 1, time.time())
    # Right at a boundary the refusal could land in the next window; retry once past it.
    refused = await store.consume(windows, 1, time.time())
    if refused.allowed:
        first = refused
        refused = await store.consume(windows, 1, time.time())
    assert first.allowed and not refused.allowed
    await asyncio.sleep(max(first.windows[0].reset_at - time.time(), 0) + 0.02)
    again = await store.consume(windows, 1, time.time())
    assert again.allowed and again.windows[0].used == 1
    assert again.windows[0].reset_at > first.windows[0].reset_at


async def test_script_cache_flush_is_survived(
    store: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    assert (await store.consume(windows, 1, time.time())).allowed
    client = redis_server.client()
    try:
        client.script_flush()
    finally:
        client.close()
    outcome = await store.consume(windows, 1, time.time())
    assert outcome.allowed and outcome.windows[0].used == 2


async def test_stopped_redis_fails_fast_then_counts_again_after_restart(
    store: RedisQuotaStore, fast: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant, limit=5)
    for _ in range(2):
        assert (await store.consume(windows, 1, time.time())).allowed
    await fast.peek(windows, time.time())  # so its pool holds a live connection
    redis_server.stop()
    for client in (fast, fast, store):
        started = time.monotonic()
        with pytest.raises(QuotaStoreError) as caught:
            await client.consume(windows, 1, time.time())
        assert time.monotonic() - started < FAILS_WITHIN
        assert caught.value.store == "redis"
    redis_server.start()
    # The snapshot written at SIGTERM kept the two charges; each pool dials a new connection.
    assert await eventually_peek(fast, windows) == 2
    allowed = 0
    for _ in range(6):
        allowed += (await store.consume(windows, 1, time.time())).allowed
    assert allowed == 3
    assert (await store.peek(windows, time.time())).windows[0].used == 5


async def test_paused_redis_costs_one_bounded_wait_then_recovers(
    store: RedisQuotaStore, fast: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant, limit=3)
    bystander = day(tenant + "-b", limit=3)
    assert (await store.consume(windows, 1, time.time())).allowed
    await fast.peek(windows, time.time())
    redis_server.pause()
    try:
        for call in (fast.consume(bystander, 1, time.time()), fast.peek(windows, time.time())):
            started = time.monotonic()
            with pytest.raises(QuotaStoreError):
                await call
            elapsed = time.monotonic() - started
            assert elapsed < FAILS_WITHIN
            assert elapsed >= 0.04  # it did wait for the socket timeout
    finally:
        redis_server.resume()
    assert await eventually_peek(fast, windows) == 1
    outcome = await store.consume(windows, 1, time.time())
    assert outcome.allowed and outcome.windows[0].used == 2
    # A consume that timed out may still run once Redis wakes (it was already on the wire):
    # the charge is then counted once, never twice.
    assert (await store.peek(bystander, time.time())).windows[0].used in (0.0, 1.0)


async def test_a_primary_turned_replica_is_dialled_again(
    store: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant, limit=5)
    assert (await store.consume(windows, 1, time.time())).allowed
    admin = redis_server.client()
    try:
        # A failover as the old primary sees it: it now follows someone else (unreachable here).
        admin.replicaof("127.0.0.1", 1)
        with pytest.raises(QuotaStoreError, match=r"READONLY|read only"):
            await store.consume(windows, 1, time.time())
        pool = store._client.connection_pool
        assert not any(c.is_connected for c in pool._available_connections)
    finally:
        admin.replicaof("NO", "ONE")
        admin.close()
    assert (await store.consume(windows, 1, time.time())).windows[0].used == 2


async def test_scripts_are_loaded_on_connect_and_after_a_restart(
    store: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    await store.ping()
    admin = redis_server.client()
    try:
        assert all(admin.script_exists(*(s.sha for s in _SCRIPTS.values())))
    finally:
        admin.close()
    windows = day(tenant, limit=5)
    charged = await store.consume(windows, 1, time.time(), charge_id="c")
    # A restart forgets the scripts: the first call after it is the refund, the one the issue
    # saw fail with NOSCRIPT. It must load them and go through.
    redis_server.restart()
    await eventually_peek(store, windows)
    admin = redis_server.client()
    try:
        admin.script_flush()
    finally:
        admin.close()
    await store.refund(windows, 1, charged.charged_at, charge_id="c")
    assert (await store.peek(windows, time.time())).windows[0].used == 0


async def test_a_charge_key_lives_on_the_tenants_slot_and_expires(
    store: RedisQuotaStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    await store.consume(windows, 1, time.time(), charge_id="abc")
    key = charge_key(windows[0].key, "abc")
    assert key_slot(key.encode()) == key_slot(windows[0].key.encode())
    admin = redis_server.client()
    try:
        assert admin.get(key) == b"1"
        assert 0 < admin.pttl(key) <= 86_400_000
        await store.refund(windows, 1, time.time(), charge_id="abc")
        assert admin.get(key) == b"0" and admin.pttl(key) > 0
    finally:
        admin.close()


async def test_other_replicas_see_the_same_counters(
    redis_server: RedisServer, tenant: str
) -> None:
    replicas = [relaxed_store(redis_server.url) for _ in range(3)]
    try:
        windows = day(tenant, limit=10)
        results = await asyncio.gather(
            *(r.consume(windows, 1, time.time()) for r in replicas for _ in range(6))
        )
        assert sum(o.allowed for o in results) == 10
    finally:
        for r in replicas:
            await r.close()


async def test_password_comes_from_the_url_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    stores = [
        RedisQuotaStore("redis://127.0.0.1:1/0"),
        RedisQuotaStore("redis://:in-url@127.0.0.1:1/0"),
        RedisQuotaStore("redis://127.0.0.1:1/0", password="explicit"),
    ]
    try:
        found = [s._client.connection_pool.connection_kwargs.get("password") for s in stores]
        assert found == ["from-env", "in-url", "explicit"]
        assert "in-url" not in stores[1].url
    finally:
        for s in stores:
            await s.close()


def test_urls_are_redacted_and_checked() -> None:
    assert redact_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("rediss://:s3cret@h:6380/2") == "rediss://:***@h:6380/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://h:6379/0?password=s3cret&x=1") == "redis://h:6379/0?password=***&x=1"
    with pytest.raises(ValueError, match="database number"):
        RedisQuotaStore("redis://h:6379/quota")
    with pytest.raises(ValueError, match="bad port"):
        RedisQuotaStore("redis://h:port/0")
    with pytest.raises(ValueError, match="no host"):
        RedisQuotaStore("redis:///0")


async def test_unreachable_server_is_a_quota_store_error() -> None:
    from .conftest import free_port

    store = RedisQuotaStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(QuotaStoreError, match="redis quota store"):
            await store.consume(day("{mg:nobody}"), 1, time.time())
        with pytest.raises(QuotaStoreError):
            await store.ping()
        assert time.monotonic() - started < FAILS_WITHIN
    finally:
        await store.close()
