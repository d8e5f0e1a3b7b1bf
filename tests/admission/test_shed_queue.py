"""When the pressure level rises to one that sheds a tier, the requests of that tier already
waiting in the queue are shed too, with their quota refunded: a request admitted while the
GPU was cool must not run on it once it is hot."""

from __future__ import annotations

import asyncio

from meltguard.admission.events import Decided, Waited
from meltguard.admission.gate import Permit
from meltguard.admission.policy import Level
from meltguard.errors import ErrorCode, ServiceError
from tests.admission.test_gate import FREE, ONE, PLUS, PRO, Env, make_policy


async def fill_gpu(env: Env) -> list[Permit]:
    """Both slots of the concurrency limit taken by pro, so everyone else queues."""
    return [await env.gate.admit(PRO, ONE) for _ in range(2)]


async def test_a_queued_request_of_a_tier_shed_at_the_new_level_is_refused_and_refunded() -> None:
    env = Env()
    running = await fill_gpu(env)
    free, plus = env.start(FREE), env.start(PLUS)
    await asyncio.sleep(0)
    assert await env.used(FREE) == (1.0, 1.0)
    env.clock.advance(3.0)

    env.gate.set_pressure(Level.HIGH, cooling_eta=12.0)
    refused = await asyncio.wait_for(asyncio.gather(free, return_exceptions=True), 1)
    [err] = refused
    assert isinstance(err, ServiceError) and err.code is ErrorCode.SERVER_OVERLOADED
    assert "while this one waited in the queue" in err.message
    assert err.retry_after is not None and 12.0 <= err.retry_after <= 60.0
    await env.gate.drain()
    assert await env.used(FREE) == (0.0, 0.0)
    assert env.last == Decided("free", "fiona", "reject", "server_overloaded", Level.HIGH,
                               1.0, 0.0)
    assert Waited("free", 3.0) in env.events

    # plus is degraded at high, not shed: it still waits, and runs when a slot frees.
    assert not plus.done()
    running[0].settle("success", seconds=1.0)
    permit = await asyncio.wait_for(plus, 1)
    permit.settle("success", seconds=1.0)
    running[1].settle("success", seconds=1.0)


async def test_critical_sheds_plus_from_the_queue_and_pro_keeps_its_place() -> None:
    env = Env()
    running = await fill_gpu(env)
    plus, pro = env.start(PLUS), env.start(PRO)
    await asyncio.sleep(0)
    env.gate.set_pressure(Level.CRITICAL, cooling_eta=30.0)
    [err] = await asyncio.gather(plus, return_exceptions=True)
    assert isinstance(err, ServiceError) and err.code is ErrorCode.SERVER_OVERLOADED
    assert not pro.done()
    # Critical halves pro's share of the slots: it starts once both running jobs are done.
    for permit in running:
        permit.settle("success", seconds=1.0)
    (await asyncio.wait_for(pro, 1)).settle("success", seconds=1.0)


async def test_shadow_mode_sheds_nobody_from_the_queue() -> None:
    env = Env(make_policy(mode="shadow"))
    running = await fill_gpu(env)
    free = env.start(FREE)
    await asyncio.sleep(0)
    env.gate.set_pressure(Level.HIGH, cooling_eta=12.0)
    await asyncio.sleep(0)
    assert not free.done()
    running[0].settle("success", seconds=1.0)
    (await asyncio.wait_for(free, 1)).settle("success", seconds=1.0)
    running[1].settle("success", seconds=1.0)


async def test_a_reload_that_sheds_the_tier_at_the_current_level_sheds_its_queue() -> None:
    env = Env()
    running = await fill_gpu(env)
    env.gate.set_pressure(Level.ELEVATED, cooling_eta=5.0)  # free is only slowed here
    free = env.start(FREE)
    await asyncio.sleep(0)
    assert not free.done()
    env.gate.set_policy(make_policy(actions={"elevated": {"free": {"reject": True}}}))
    [err] = await asyncio.gather(free, return_exceptions=True)
    assert isinstance(err, ServiceError) and err.code is ErrorCode.SERVER_OVERLOADED
    for permit in running:
        permit.settle("success", seconds=1.0)
