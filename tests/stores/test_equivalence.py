"""Property: the Lua script (and the sqlite store) answer exactly as MemoryQuotaStore does.

Random sequences of consume, refund and peek at random non-decreasing times, over two windows
short enough that the sequences cross their boundaries. Redis runs with `caller_clock=True`, the
test-only mode in which the script takes `now` from its argument instead of Redis `TIME`.
Answers must be equal to the bit: both sides do the same double arithmetic.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores import SqliteQuotaStore
from meltguard.protocols import QuotaStore
from meltguard.values import QuotaOutcome, QuotaWindow

from .conftest import RedisServer, relaxed_store

T0 = 1_767_225_000.0


@dataclass(frozen=True)
class Consume:
    dt: float
    cost: float
    which: str  # "both", "short" or "long": the windows the request is checked against


@dataclass(frozen=True)
class Refund:
    dt: float
    index: int  # which earlier consume to refund (modulo how many there were)


@dataclass(frozen=True)
class Peek:
    dt: float


steps = st.sampled_from([0.0, 0.0, 0.001, 0.5, 1.0, 7.0, 9.999, 10.0, 30.0, 61.0])
costs = st.sampled_from([0.25, 1 / 3, 0.5, 1.0, 1.0, 1.5, 2.0, 4.0])
operations = st.lists(
    st.one_of(
        st.builds(Consume, steps, costs, st.sampled_from(["both", "both", "short", "long"])),
        st.builds(Refund, steps, st.integers(0, 50)),
        st.builds(Peek, steps),
    ),
    min_size=1,
    max_size=40,
)
limits = st.tuples(st.sampled_from([1.0, 2.0, 2.5, 3.0]), st.sampled_from([3.0, 4.0, 5.0]))


def summary(outcome: QuotaOutcome) -> tuple[object, ...]:
    return (
        outcome.allowed,
        outcome.exhausted.window.key if outcome.exhausted else None,
        tuple((s.window.key, s.used, s.reset_at) for s in outcome.windows),
        outcome.charged_at,
    )


async def replay(
    store: QuotaStore, ops: list[Consume | Refund | Peek], short: float, long: float, prefix: str
) -> list[tuple[object, ...]]:
    windows = {
        "short": [QuotaWindow(key=f"{prefix}:10", limit=short, period=10.0)],
        "long": [QuotaWindow(key=f"{prefix}:60", limit=long, period=60.0)],
    }
    windows["both"] = windows["short"] + windows["long"]
    now = T0
    charged: list[tuple[str, float, float]] = []
    answers: list[tuple[object, ...]] = []
    try:
        for op in ops:
            now += op.dt
            if isinstance(op, Consume):
                outcome = await store.consume(windows[op.which], op.cost, now)
                if outcome.allowed:
                    charged.append((op.which, op.cost, outcome.charged_at))
                answers.append(summary(outcome))
            elif isinstance(op, Refund):
                if charged:
                    which, cost, at = charged[op.index % len(charged)]
                    await store.refund(windows[which], cost, at)
                answers.append(("refund",))
            else:
                answers.append(("peek", *summary(await store.peek(windows["both"], now))))
    finally:
        await store.close()
    return answers


def check(
    make: Callable[[], QuotaStore], ops: list[Consume | Refund | Peek], lim: tuple[float, float]
) -> None:
    prefix = "{mg:" + uuid.uuid4().hex[:10] + "}"
    expected = asyncio.run(replay(MemoryQuotaStore(), ops, *lim, prefix))
    got = asyncio.run(replay(make(), ops, *lim, prefix))
    assert got == expected


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations, lim=limits)
def test_lua_script_answers_like_memory(
    redis_server: RedisServer, ops: list[Consume | Refund | Peek], lim: tuple[float, float]
) -> None:
    check(lambda: relaxed_store(redis_server.url, caller_clock=True), ops, lim)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, lim=limits)
def test_sqlite_answers_like_memory(
    ops: list[Consume | Refund | Peek], lim: tuple[float, float]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check(lambda: SqliteQuotaStore(Path(tmp) / "q.sqlite3"), ops, lim)
