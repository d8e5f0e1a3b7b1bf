"""The quota store's place in the daemon's life: checked at startup, reported by /readyz and
in metrics, and drained before it is closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meltguard.daemon.catalog import BY_NAME, PREFIX
from meltguard.daemon.stores.refunds import RESULTS
from meltguard.daemon.stores.select import innermost, refunding
from meltguard.protocols import QuotaStore

log = structlog.get_logger("meltguard")

# The daemon's (wrapped) store, for /readyz; absent in apps built without one.
QUOTA_STORE = web.AppKey("quota_store", QuotaStore)

# /readyz asks a failing store again, within this long, so readiness comes back without traffic.
READY_PING_TIMEOUT = 1.0


class StoreUnusable(Exception):
    """The store cannot be used at all: a reason not to start, as one line."""


async def check_at_start(store: QuotaStore) -> None:
    """Open the store's connections before the first request. A local store (SQLite) that
    cannot be opened and written is a startup error: with `on_store_error: open` it would
    otherwise turn quotas off silently. A network store (Redis) that does not answer yet is
    logged: it may come up after the daemon, and on_store_error decides meanwhile."""
    ping = getattr(store, "ping", None)
    if ping is None:
        return
    local = innermost(store).name == "sqlite"
    try:
        if local:
            await ping()
        else:
            await asyncio.gather(*(ping() for _ in range(4)))
    except Exception as exc:
        if local:
            raise StoreUnusable(f"quota store unusable: {_one_line(exc)}") from None
        log.error("quota_store.unreachable_at_start", store=store.name, error=_one_line(exc))


async def readiness(store: QuotaStore | None, *, fails_closed: bool) -> tuple[bool, dict[str, Any]]:
    """The store's part of /readyz: whether it keeps the daemon from being ready, and what to
    say. A failing store is asked again here, so readiness comes back without traffic.

    A failing local store (SQLite) makes the daemon unready: another replica, with its own
    file, serves better. A failing shared store (Redis) fails every replica at once; taking
    them all out of the load balancer would turn `on_store_error: open` into an outage, so it
    makes the daemon unready only when the policy fails closed (its requests are refused
    anyway). Either way the body and `quota_store_up` say that the store fails.
    """
    chain = refunding(store) if store is not None else None
    if store is None or chain is None:
        return True, {"name": store.name if store is not None else None, "ok": True}
    health = chain.health
    if not health.ok:
        try:
            async with asyncio.timeout(READY_PING_TIMEOUT):
                await chain.ping()
        except Exception:  # recorded in health by ping()
            pass
    shared = innermost(store).name == "redis"
    ready = health.ok or (shared and not fails_closed)
    return ready, {"name": store.name, "ok": health.ok, "error": health.error,
                   "refunds_pending": chain.pending}


def register_store_metrics(registry: CollectorRegistry, store: QuotaStore) -> None:
    """quota_store_up, quota_refunds_pending and quota_refunds_total, read at scrape time."""
    if refunding(store) is not None:
        registry.register(_StoreCollector(store))


class _StoreCollector(Collector):
    def __init__(self, store: QuotaStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        chain = refunding(self._store)
        if chain is None:
            return
        up = GaugeMetricFamily(PREFIX + "quota_store_up", _help("quota_store_up"),
                               labels=["store"])
        up.add_metric([self._store.name], 1.0 if chain.health.ok else 0.0)
        yield up
        yield GaugeMetricFamily(PREFIX + "quota_refunds_pending",
                                _help("quota_refunds_pending"), value=chain.pending)
        total = CounterMetricFamily(PREFIX + "quota_refunds", _help("quota_refunds"),
                                    labels=["result"])
        for result in RESULTS:
            total.add_metric([result], chain.refunds_total[result])
        yield total

    def describe(self) -> Iterable[Metric]:
        return []


def _help(name: str) -> str:
    return BY_NAME[PREFIX + name].help


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
