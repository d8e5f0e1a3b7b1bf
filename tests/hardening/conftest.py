"""Shared rig for the hardening tests: a policy tuned for fast faults, a quota store that can
be switched off, and one check of what must hold after every fault."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.serve import Assembly
from meltguard.values import QuotaOutcome, QuotaWindow
from tests.daemon.conftest import KEYS, build, sha, wait_until
from tests.fakenvml import fake_nvml, fake_nvml_library
from tests.process import metric_value

__all__ = ["build", "fake_nvml", "fake_nvml_library"]

ADMIN_KEY = "sk-admin-hardening"


def hardening_policy(
    *, concurrency: int = 2, stale_after: str = "1s", on_store_error: str = "open",
    free_quota: int = 100, anonymous: str = "null", admin: bool = True, extra: str = "",
    reference: str = "{size: 64x64, steps: 2}",
) -> str:
    """Every tier's quota is a day window, so `used` is exact for the whole test; fast
    sampling and a short stale_after let telemetry faults show within a second."""
    keys = "\n".join(
        f'  - {{key_sha256: "{sha(key)}", tenant: {tier}-tenant, tier: {tier}}}'
        for tier, key in KEYS.items()
    )
    admin_line = f'admin_key_sha256: "{sha(ADMIN_KEY)}"' if admin else ""
    return f"""version: 1
anonymous_tier: {anonymous}
on_store_error: {on_store_error}
{admin_line}
tiers:
  free: {{priority: 0, quotas: [{{limit: {free_quota}, per: 1d}}], max_concurrent: 2,
         max_queue_wait: 10s}}
  plus: {{priority: 1, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 2,
         max_queue_wait: 10s}}
  pro:  {{priority: 2, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 4,
         max_queue_wait: 10s}}
api_keys:
{keys}
cost: {{reference: {reference}}}
limits: {{max_n: 4, max_size: 512x512, max_steps: 50, default_size: 64x64, default_steps: 2}}
concurrency: {{limit: {concurrency}}}
pressure:
  sample_interval: 50ms
  stale_after: {stale_after}
  on_stale: high
  levels:
    elevated: {{enter: {{temperature_c: 78}}, exit: {{temperature_c: 74}}}}
    high:     {{enter: {{temperature_c: 84}}, exit: {{temperature_c: 80}}}}
    critical: {{enter: {{temperature_c: 90, gpu_lost: true}}, exit: {{temperature_c: 86}}}}
actions:
  high: {{free: {{reject: true}}}}
  critical: {{free: {{reject: true}}, plus: {{reject: true}}}}
{extra}"""


class SwitchableStore:
    """A QuotaStore whose backend can be taken down (every call raises ConnectionError) and
    brought back, as a Redis restart would do."""

    def __init__(self) -> None:
        self.inner = MemoryQuotaStore()
        self.down = False
        self.failed_calls = 0

    @property
    def name(self) -> str:
        return "memory"

    def _check(self) -> None:
        if self.down:
            self.failed_calls += 1
            raise ConnectionError("quota store unreachable")

    async def consume(self, windows: Sequence[QuotaWindow], cost: float, now: float,
                      *, charge_id: str | None = None) -> QuotaOutcome:
        self._check()
        return await self.inner.consume(windows, cost, now, charge_id=charge_id)

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float,
                     *, charge_id: str | None = None) -> None:
        self._check()
        await self.inner.refund(windows, cost, charged_at, charge_id=charge_id)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        self._check()
        return await self.inner.peek(windows, now)

    async def close(self) -> None:
        await self.inner.close()


def auth(tier: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tier]}"}


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = {"prompt": "a lighthouse in a storm", "size": "64x64"}


class Probe:
    """Wraps a test client and counts every /v1 request sent, the denominator of
    `meltguard_requests_total`: each must be accounted exactly once, answered or abandoned."""

    def __init__(self, client: Any, assembly: Assembly) -> None:
        self.client = client
        self.assembly = assembly
        self.sent = 0

    async def post(self, tier: str | None, body: Any = None, **kwargs: Any) -> Any:
        self.sent += 1
        headers = {**(auth(tier) if tier else {}), **kwargs.pop("headers", {})}
        return await self.client.post("/v1/images/generations", json=body or PROMPT,
                                      headers=headers, **kwargs)

    async def generate(self, tier: str | None, body: Any = None) -> tuple[int, Any, Any]:
        resp = await self.post(tier, body)
        return resp.status, resp.headers, await resp.json()

    async def quota_used(self, tier: str) -> float:
        self.sent += 1
        resp = await self.client.get("/v1/quota", headers=auth(tier))
        assert resp.status == 200, await resp.text()
        return float((await resp.json())["windows"][0]["used"])

    async def metrics(self) -> str:
        return str(await (await self.client.get("/metrics")).text())

    async def settled(self) -> None:
        """The four things every fault must leave true: the daemon answers, no request is
        still counted as active, no permit or queue place leaked, and every /v1 request sent
        was accounted exactly once (answered, or 499 for a client that left)."""
        runtime = self.assembly.runtime
        await wait_until(lambda: runtime.active_requests == 0, timeout=10)
        await runtime.gate.drain()  # refunds run as tasks; they must be done before checks
        health = await self.client.get("/healthz")
        assert health.status == 200
        text = await self.metrics()
        for tier in runtime.loaded.policy.tiers:
            assert metric_value(text, "meltguard_inflight_requests", {"tier": tier}) == 0, tier
            assert metric_value(text, "meltguard_queue_depth", {"tier": tier}) == 0, tier
        assert requests_total(text) == self.sent, text


def requests_total(text: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("meltguard_requests_total{")
    )


async def started(probe: Probe, engine: Any, count: int) -> None:
    await wait_until(lambda: len(engine.calls) >= count, timeout=5)


async def client_for(aiohttp_client: Any, assembly: Assembly) -> Any:
    client = await aiohttp_client(assembly.app)
    await wait_until(lambda: assembly.runtime.engine.health().ready)
    return client


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
