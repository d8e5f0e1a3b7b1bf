"""usage.energy_j and the per-tier energy counter through the real app."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meltguard.inference.sim import sim_png
from tests.daemon.conftest import FixedSource, ScriptedEngine, auth, gpu, wait_until

pytestmark = pytest.mark.asyncio

IMAGE = {"prompt": "a kettle", "size": "64x64", "n": 2, "steps": 2}


def tier_joules(text: str) -> dict[str, float]:
    return {
        sample.labels["tier"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "meltguard_energy_joules_total"
    }


async def test_each_response_carries_its_share_and_the_tier_counts_it(
    aiohttp_client: Any, build: Any
) -> None:
    assembly = build(source=FixedSource([gpu(50)]))  # 300 W, no energy counter
    client = await aiohttp_client(assembly.app)
    runtime = assembly.runtime
    await wait_until(lambda: runtime.engine.health().ready and runtime.energy.gpu == 0)
    total = 0.0
    for tier in ("pro", "plus"):
        resp = await client.post("/v1/images/generations", headers=auth(tier), json=IMAGE)
        assert resp.status == 200, await resp.text()
        usage = (await resp.json())["usage"]
        assert usage["energy_j"] > 0
        total += usage["energy_j"]
    metrics = await (await client.get("/metrics")).text()
    joules = tier_joules(metrics)
    assert set(joules) == {"pro", "plus"}
    assert sum(joules.values()) == pytest.approx(total, abs=0.01)


async def test_an_engine_that_reports_no_batches_gives_no_energy(
    aiohttp_client: Any, build: Any
) -> None:
    async def behave(job: Any) -> list[bytes]:
        return [sim_png(job.size, job.prompt, job.seed)] * job.n

    assembly = build(engine=ScriptedEngine(behave))
    client = await aiohttp_client(assembly.app)
    await wait_until(lambda: assembly.runtime.energy.gpu == 0)
    resp = await client.post("/v1/images/generations", headers=auth("pro"), json=IMAGE)
    assert resp.status == 200, await resp.text()
    assert "energy_j" not in (await resp.json())["usage"]
    assert tier_joules(await (await client.get("/metrics")).text()) == {}
