"""Issue 17 item 10: at shutdown the gate's pending refunds reach the store before the store is
closed (they used to be awaited after it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.inference.errors import EngineFailure
from meltguard.values import GenerationJob, QuotaWindow
from tests.daemon.conftest import KEYS, ScriptedEngine


class _SlowRefunds(MemoryQuotaStore):
    """Our own store: refunds take a moment; it records the order of refunds and close."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float, *,
                     charge_id: str | None = None) -> None:
        await asyncio.sleep(0.3)
        await super().refund(windows, cost, charged_at, charge_id=charge_id)
        self.events.append("refunded")

    async def close(self) -> None:
        self.events.append("closed")
        await super().close()


async def test_pending_refunds_reach_the_store_before_it_closes(
    aiohttp_client: Any, build: Any
) -> None:
    async def fail(job: GenerationJob) -> list[bytes]:
        raise EngineFailure("boom")

    store = _SlowRefunds()
    assembly = build(engine=ScriptedEngine(fail), store=store)
    client = await aiohttp_client(assembly.app)
    response = await client.post("/v1/images/generations", json={"prompt": "x"},
                                 headers={"Authorization": f"Bearer {KEYS['pro']}"})
    assert response.status == 500  # generation_failed: its quota is being refunded
    assert store.events == []  # the refund is still on its way
    await client.close()  # the app's cleanup: drain, then close the store
    assert store.events == ["refunded", "closed"]
