"""Faults, one test each: after every one the daemon still serves, no permit or queue place
leaks (`meltguard_inflight_requests` back to zero), quota is refunded for work not delivered,
and every request sent was accounted exactly once.

The GPU and its telemetry are the fake libnvidia-ml under the real pynvml bindings, so a lost
GPU and a hung driver call reach the daemon exactly as the driver reports them."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from structlog.testing import capture_logs

from meltguard.admission.policy import Level
from meltguard.clock import SystemClock
from meltguard.daemon.telemetry.nvml import open_nvml
from meltguard.inference.errors import EngineOutOfMemory
from meltguard.values import GenerationJob
from tests.daemon.conftest import ScriptedEngine, wait_until
from tests.fakenvml import FakeNvml
from tests.hardening.conftest import (
    PROMPT,
    Probe,
    SwitchableStore,
    auth,
    cancel_quietly,
    client_for,
    hardening_policy,
)
from tests.process import metric_value

pytestmark = pytest.mark.asyncio


class Gpu:
    """Engine behaviour the test steers: every call waits until released, then returns
    images or raises what the test put in `failures` (first in, first out)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.failures: list[BaseException] = []
        self.cancelled = 0

    async def __call__(self, job: GenerationJob) -> list[bytes]:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.failures:
            raise self.failures.pop(0)
        return [b"\x89PNG fake"] * job.n


async def _rig(aiohttp_client: Any, build: Any, *, released: bool = True, **policy: Any
               ) -> tuple[Probe, ScriptedEngine, Gpu]:
    gpu = Gpu()
    if released:
        gpu.release.set()
    engine = ScriptedEngine(gpu)
    store = policy.pop("store", None)
    source = policy.pop("source", None)
    assembly = build(hardening_policy(**policy), engine=engine, store=store, source=source)
    client = await client_for(aiohttp_client, assembly)
    return Probe(client, assembly), engine, gpu


async def test_engine_out_of_memory_is_503_refunded_and_tightens(
    aiohttp_client: Any, build: Any
) -> None:
    probe, _, gpu = await _rig(aiohttp_client, build)
    gpu.failures.append(EngineOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB"))
    status, headers, body = await probe.generate("pro")
    assert status == 503
    assert body["error"]["code"] == "gpu_out_of_memory"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert "GiB" not in body["error"]["message"]  # engine internals stay in the log
    assert await probe.quota_used("pro") == 0
    # Out of memory is the overload signal a GPU gives: the concurrency limit halves.
    assert metric_value(await probe.metrics(), "meltguard_concurrency_limit") == 1
    assert (await probe.generate("pro"))[0] == 200
    assert await probe.quota_used("pro") == 1
    await probe.settled()


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"),
                                   MemoryError(), ValueError("bad tensor"),
                                   TimeoutError("kernel watchdog")],
                         ids=lambda e: type(e).__name__)
async def test_engine_raising_anything_is_500_refunded(
    aiohttp_client: Any, build: Any, error: Exception
) -> None:
    probe, _, gpu = await _rig(aiohttp_client, build)
    gpu.failures.append(error)
    status, _, body = await probe.generate("plus")
    assert status == 500
    assert body["error"]["code"] == "generation_failed"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert str(error) not in body["error"]["message"] or not str(error)
    assert await probe.quota_used("plus") == 0
    assert (await probe.generate("plus"))[0] == 200
    await probe.settled()


async def test_engine_error_quoting_the_prompt_does_not_log_it(
    aiohttp_client: Any, build: Any
) -> None:
    secret = "a portrait of my neighbour's daughter"
    probe, _, gpu = await _rig(aiohttp_client, build)
    gpu.failures.append(ValueError(f"tokenizer choked on {secret!r}"))
    with capture_logs() as logs:
        status, _, _ = await probe.generate("pro", {"prompt": secret, "size": "64x64"})
    assert status == 500
    failed = [entry for entry in logs if entry["event"] == "engine.failed"]
    assert failed and "<prompt>" in failed[0]["error"]
    assert secret not in repr(logs)
    await probe.settled()


async def test_quota_store_down_fail_closed_then_back(aiohttp_client: Any, build: Any) -> None:
    store = SwitchableStore()
    probe, _, _ = await _rig(aiohttp_client, build, store=store, on_store_error="closed")
    assert (await probe.generate("pro"))[0] == 200
    store.down = True
    status, headers, body = await probe.generate("pro")
    assert status == 503
    assert body["error"]["code"] == "quota_store_unavailable"
    assert 1 <= int(headers["Retry-After"]) <= 60
    quota = await probe.client.get("/v1/quota", headers=auth("pro"))
    probe.sent += 1
    assert quota.status == 503
    assert (await quota.json())["error"]["code"] == "quota_store_unavailable"
    errors = metric_value(await probe.metrics(), "meltguard_quota_store_errors_total",
                          {"store": "memory"})
    assert errors is not None and errors >= 2
    store.down = False
    assert (await probe.generate("pro"))[0] == 200
    assert await probe.quota_used("pro") == 2
    await probe.settled()


async def test_quota_store_down_fail_open_still_serves(aiohttp_client: Any, build: Any) -> None:
    store = SwitchableStore()
    probe, _, _ = await _rig(aiohttp_client, build, store=store, on_store_error="open")
    store.down = True
    status, headers, _ = await probe.generate("free")
    assert status == 200
    assert "x-ratelimit-remaining-requests" not in headers  # nothing was counted
    store.down = False
    assert await probe.quota_used("free") == 0
    await probe.settled()


async def test_quota_store_dies_before_the_refund(aiohttp_client: Any, build: Any) -> None:
    store = SwitchableStore()
    probe, engine, gpu = await _rig(aiohttp_client, build, released=False, store=store)
    gpu.failures.append(RuntimeError("device fell off the bus"))
    task = asyncio.create_task(probe.generate("pro"))
    await wait_until(lambda: len(engine.calls) == 1)
    store.down = True
    gpu.release.set()
    status, _, body = await task
    assert status == 500 and body["error"]["code"] == "generation_failed"
    await probe.assembly.runtime.gate.drain()
    assert store.failed_calls >= 1  # the refund was tried and counted, not lost silently
    store.down = False
    await probe.settled()


async def test_client_disconnect_while_generating_refunds(aiohttp_client: Any, build: Any
                                                          ) -> None:
    probe, engine, gpu = await _rig(aiohttp_client, build, released=False)
    task = asyncio.create_task(probe.post("pro"))
    await wait_until(lambda: len(engine.calls) == 1)
    await cancel_quietly(task)
    await wait_until(lambda: gpu.cancelled == 1)  # the generation itself was stopped
    await wait_until(lambda: probe.assembly.runtime.active_requests == 0)
    text = await probe.metrics()
    assert metric_value(text, "meltguard_requests_total", {"code": "499", "tier": "pro"}) == 1
    assert await probe.quota_used("pro") == 0
    gpu.release.set()
    assert (await probe.generate("pro"))[0] == 200
    await probe.settled()


async def test_client_disconnect_while_queued_refunds(aiohttp_client: Any, build: Any) -> None:
    probe, engine, gpu = await _rig(aiohttp_client, build, released=False, concurrency=1)
    running = asyncio.create_task(probe.generate("pro"))
    await wait_until(lambda: len(engine.calls) == 1)
    queued = asyncio.create_task(probe.post("pro"))
    gate = probe.assembly.runtime.gate
    await wait_until(lambda: gate.snapshot().queue_depth.get("pro") == 1)
    assert await probe.quota_used("pro") == 2  # both charged at admission
    await cancel_quietly(queued)
    await wait_until(lambda: gate.snapshot().queue_depth.get("pro") == 0)
    await gate.drain()
    assert await probe.quota_used("pro") == 1  # the one that left got its charge back
    gpu.release.set()
    assert (await running)[0] == 200
    assert len(engine.calls) == 1  # the abandoned request never reached the GPU
    await probe.settled()


async def test_gpu_lost_mid_run(aiohttp_client: Any, build: Any, fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"0.temperature": 55, "1.temperature": 55})
    source = open_nvml(clock=SystemClock(), environ={})
    probe, engine, gpu = await _rig(aiohttp_client, build, released=False, source=source)
    runtime = probe.assembly.runtime
    await wait_until(lambda: runtime.level == Level.NORMAL and runtime.pressure is not None)

    doomed = asyncio.create_task(probe.generate("pro"))
    survivor = asyncio.create_task(probe.generate("free"))
    await wait_until(lambda: len(engine.calls) == 2)
    fake_nvml.update({"0.lost": 1})
    await wait_until(lambda: runtime.level == Level.CRITICAL)

    status, headers, body = await probe.generate("free")
    assert status == 503 and body["error"]["code"] == "server_overloaded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    gpu.failures.append(RuntimeError("CUDA error: GPU is lost"))
    gpu.release.set()
    assert (await doomed)[0] == 500
    assert (await survivor)[0] == 200  # work already on the other GPU is delivered
    assert (await probe.generate("pro"))[0] == 200  # critical still serves the top tier

    fake_nvml.remove("0.lost")
    await wait_until(lambda: runtime.level == Level.NORMAL)
    assert (await probe.generate("free"))[0] == 200
    await probe.settled()
    assert await probe.quota_used("pro") == 1  # the failed one was refunded
    assert await probe.quota_used("free") == 2  # the shed one was never charged


async def test_telemetry_hanging(aiohttp_client: Any, build: Any, fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"0.temperature": 55, "1.temperature": 55})
    source = open_nvml(clock=SystemClock(), environ={})
    probe, _, _ = await _rig(aiohttp_client, build, source=source, stale_after="500ms")
    runtime = probe.assembly.runtime
    await wait_until(lambda: runtime.pressure is not None and runtime.level == Level.NORMAL)
    readers = _telemetry_threads()

    fake_nvml.update({"0.temperature.hang_ms": 60_000})
    await wait_until(lambda: runtime.pressure is not None and runtime.pressure.stale)
    assert runtime.level == Level.HIGH  # on_stale: high
    status, headers, body = await probe.generate("free")
    assert status == 503 and body["error"]["code"] == "server_overloaded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await probe.generate("pro"))[0] == 200
    async with asyncio.timeout(1):  # a hung driver call never blocks the event loop
        assert (await probe.client.get("/healthz")).status == 200
    await asyncio.sleep(0.3)  # several more ticks against the hung read
    assert _telemetry_threads() <= readers  # one stuck reader, not one more per tick
    timeouts = metric_value(await probe.metrics(), "meltguard_telemetry_errors_total",
                            {"error": "timeout"})
    assert timeouts is not None and timeouts >= 1

    fake_nvml.remove("0.temperature.hang_ms")
    await wait_until(lambda: runtime.level == Level.NORMAL, timeout=10)
    assert (await probe.generate("free"))[0] == 200
    await probe.settled()


def _telemetry_threads() -> int:
    return sum(t.name.startswith("meltguard-telemetry") for t in threading.enumerate())


async def test_every_fault_in_a_row_leaves_one_response_each(
    aiohttp_client: Any, build: Any
) -> None:
    """The faults above interleaved on one daemon: the accounting still balances."""
    store = SwitchableStore()
    probe, engine, gpu = await _rig(aiohttp_client, build, store=store, on_store_error="closed")
    gpu.failures += [EngineOutOfMemory("oom"), RuntimeError("boom")]
    statuses = [(await probe.generate("pro"))[0] for _ in range(3)]
    assert statuses == [503, 500, 200]
    store.down = True
    assert (await probe.generate("plus"))[0] == 503
    store.down = False
    gpu.release.clear()
    leaving = asyncio.create_task(probe.post("plus", PROMPT))
    await wait_until(lambda: len(engine.calls) == 4)
    await cancel_quietly(leaving)
    await wait_until(lambda: gpu.cancelled == 1)  # the server saw the client go
    gpu.release.set()
    assert (await probe.generate("plus"))[0] == 200
    await probe.settled()
    assert await probe.quota_used("pro") == 1
    assert await probe.quota_used("plus") == 1
