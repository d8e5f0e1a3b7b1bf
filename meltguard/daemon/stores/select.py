"""Turn a `--store` value into a QuotaStore."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores.overlimit import OverLimitCache
from meltguard.daemon.stores.redis import RedisQuotaStore, redact_url
from meltguard.daemon.stores.refunds import RefundingStore
from meltguard.daemon.stores.sqlite import SqliteQuotaStore
from meltguard.protocols import QuotaStore

SPEC_HELP = "memory, sqlite:PATH, redis://HOST:PORT/DB or rediss://HOST:PORT/DB"


def default_store_path(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_STATE_HOME/meltguard/quota.sqlite3, with ~/.local/state when it is unset."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "meltguard" / "quota.sqlite3"


def default_store_spec(env: Mapping[str, str] | None = None) -> str:
    """The spec `meltguard serve` uses without `--store`: survives restarts, needs no server."""
    return f"sqlite:{default_store_path(env)}"


def open_store(spec: str) -> QuotaStore:
    """`memory` | `sqlite:PATH` (`sqlite` alone: the default path) | `redis://...` | `rediss://...`.

    Opens nothing yet: a store connects on first use (call its `ping()` to check at startup).
    Raises ValueError naming the accepted forms.
    """
    text = spec.strip()
    if text == "memory":
        return MemoryQuotaStore()
    if text == "sqlite":
        return SqliteQuotaStore(default_store_path())
    if text.startswith("sqlite:"):
        path = text.removeprefix("sqlite:")
        if not path.strip():
            raise ValueError(f"quota store {spec!r} has no path: use sqlite:PATH")
        return SqliteQuotaStore(path)
    if text.startswith(("redis://", "rediss://")):
        return RedisQuotaStore(text)
    raise ValueError(f"quota store must be {SPEC_HELP}, got {redact_url(text)!r}")


def wrap_store(store: QuotaStore) -> QuotaStore:
    """The daemon's chain: refusals cached for a second, in front of refunds that are never
    lost, in front of the store (see overlimit.py and refunds.py)."""
    return OverLimitCache(RefundingStore(store))


def build_store(spec: str) -> QuotaStore:
    """`open_store(spec)` wrapped as the daemon runs it. Raises ValueError as open_store."""
    return wrap_store(open_store(spec))


def innermost(store: QuotaStore) -> QuotaStore:
    """The store at the end of a wrapper chain (the store itself when not wrapped)."""
    while isinstance(store, (OverLimitCache, RefundingStore)):
        store = store.inner
    return store


def refunding(store: QuotaStore) -> RefundingStore | None:
    """The chain's RefundingStore, if it has one."""
    while True:
        if isinstance(store, RefundingStore):
            return store
        if not isinstance(store, OverLimitCache):
            return None
        store = store.inner
