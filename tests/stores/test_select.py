"""`--store` specs and the default one."""

from __future__ import annotations

from pathlib import Path

import pytest

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores import (
    RedisQuotaStore,
    SqliteQuotaStore,
    default_store_path,
    default_store_spec,
    open_store,
)
from meltguard.daemon.stores.overlimit import OverLimitCache
from meltguard.daemon.stores.refunds import RefundingStore
from meltguard.daemon.stores.select import build_store, innermost, refunding


async def test_each_spec_opens_its_store(tmp_path: Path) -> None:
    memory = open_store("memory")
    sqlite = open_store(f"sqlite:{tmp_path}/q.sqlite3")
    redis = open_store("redis://127.0.0.1:6379/2")
    rediss = open_store("rediss://:pw@cache.internal:6380/0")
    try:
        assert isinstance(memory, MemoryQuotaStore)
        assert isinstance(sqlite, SqliteQuotaStore) and sqlite.path == tmp_path / "q.sqlite3"
        assert isinstance(redis, RedisQuotaStore)
        assert redis._client.connection_pool.connection_kwargs["db"] == 2
        assert isinstance(rediss, RedisQuotaStore)
        assert [s.name for s in (memory, sqlite, redis, rediss)] == [
            "memory", "sqlite", "redis", "redis"
        ]
    finally:
        for store in (memory, sqlite, redis, rediss):
            await store.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mongodb://x", "quota store must be memory, sqlite:PATH, redis://HOST:PORT/DB"),
        ("", "quota store must be memory"),
        ("sqlite:", "has no path: use sqlite:PATH"),
        ("sqlite:  ", "has no path"),
        ("redis://h:6379/zero", "must be a database number"),
        ("redis://:hunter2@h:x/0", "bad port"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        open_store(spec)
    assert "hunter2" not in str(caught.value)


async def test_bare_sqlite_means_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    store = open_store("sqlite")
    assert isinstance(store, SqliteQuotaStore)
    assert store.path == tmp_path / "meltguard" / "quota.sqlite3"
    await store.close()


def test_default_spec_is_sqlite_under_the_xdg_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_store_spec({"XDG_STATE_HOME": "/var/lib/x"}) == (
        "sqlite:/var/lib/x/meltguard/quota.sqlite3"
    )
    monkeypatch.setenv("HOME", "/home/ops")
    fallback = Path("/home/ops/.local/state/meltguard/quota.sqlite3")
    assert default_store_path({}) == fallback
    # A relative XDG_STATE_HOME is invalid per the spec and ignored.
    assert default_store_path({"XDG_STATE_HOME": "state"}) == fallback
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    assert default_store_spec() == "sqlite:/srv/state/meltguard/quota.sqlite3"


async def test_the_daemon_runs_each_store_behind_the_cache_and_the_refund_queue(
    tmp_path: Path,
) -> None:
    store = build_store(f"sqlite:{tmp_path}/q.sqlite3")
    try:
        assert isinstance(store, OverLimitCache)
        assert isinstance(store.inner, RefundingStore)
        assert refunding(store) is store.inner
        assert isinstance(innermost(store), SqliteQuotaStore)
        assert store.name == "sqlite"
        await store.ping()  # reaches the store through both wrappers
        assert (tmp_path / "q.sqlite3").exists()
    finally:
        await store.close()
    plain = open_store("memory")
    assert refunding(plain) is None and innermost(plain) is plain
