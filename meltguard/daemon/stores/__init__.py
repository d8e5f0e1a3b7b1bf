"""Quota stores behind the `QuotaStore` Protocol: sqlite for one host, Redis for a fleet.

`open_store(spec)` turns a `--store` value into a store; every failure a store meets at run
time arrives as `QuotaStoreError`, and the caller decides by the policy's `on_store_error`.
"""

from __future__ import annotations

from meltguard.daemon.stores.errors import QuotaStoreError
from meltguard.daemon.stores.redis import RedisQuotaStore
from meltguard.daemon.stores.select import default_store_path, default_store_spec, open_store
from meltguard.daemon.stores.sqlite import SqliteQuotaStore

__all__ = [
    "QuotaStoreError",
    "RedisQuotaStore",
    "SqliteQuotaStore",
    "default_store_path",
    "default_store_spec",
    "open_store",
]
