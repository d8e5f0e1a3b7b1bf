"""SqliteQuotaStore's group commit: calls made in one loop turn share one transaction, and
still answer exactly as the same calls made one after another would."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores import QuotaStoreError, SqliteQuotaStore
from meltguard.protocols import QuotaStore
from meltguard.values import QuotaOutcome, QuotaWindow

T0 = 1_767_225_600.0
DAY = 86_400.0


def day(limit: float, key: str = "{mg:alice}:86400") -> list[QuotaWindow]:
    return [QuotaWindow(key=key, limit=limit, period=DAY)]


def summary(outcome: QuotaOutcome | None) -> tuple[object, ...] | None:
    if outcome is None:
        return None
    return (
        outcome.allowed,
        outcome.exhausted.window.key if outcome.exhausted else None,
        tuple((s.window.key, s.used, s.reset_at) for s in outcome.windows),
        outcome.charged_at,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteQuotaStore]:
    made = SqliteQuotaStore(tmp_path / "quota.sqlite3")
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the same file, for holding its write lock."""
    conn = sqlite3.connect(tmp_path / "quota.sqlite3", isolation_level=None)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def turns(count: int = 3) -> None:
    """Let the loop run a few turns: tasks made before this have started their calls."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_one_turn_of_calls_is_one_transaction(store: SqliteQuotaStore) -> None:
    await store.ping()
    batches, transactions = store.batches, store.transactions
    outcomes = await asyncio.gather(*(store.consume(day(20), 1, T0 + i) for i in range(50)))
    # Exactly the limit, and the first 20 in call order: the order of a sequential run.
    assert [o.allowed for o in outcomes] == [True] * 20 + [False] * 30
    assert [o.windows[0].used for o in outcomes[:20]] == [float(i + 1) for i in range(20)]
    assert all(o.windows[0].used == 20 for o in outcomes[20:])
    assert store.batches - batches == 1
    assert store.transactions - transactions == 1
    assert (await store.peek(day(20), T0 + 60)).windows[0].used == 20


async def test_a_batch_is_capped_and_the_rest_goes_next(store: SqliteQuotaStore) -> None:
    outcomes = await asyncio.gather(*(store.consume(day(280), 1, T0) for _ in range(300)))
    assert sum(o.allowed for o in outcomes) == 280
    assert [o.allowed for o in outcomes] == [True] * 280 + [False] * 20
    assert store.batches == 2 and store.transactions == 2


async def test_interleaved_calls_in_one_turn_answer_as_sequential_ones(
    store: SqliteQuotaStore,
) -> None:
    both = [*day(3), QuotaWindow(key="{mg:alice}:60", limit=2, period=60.0)]
    answers = await asyncio.gather(
        store.consume(both, 1, T0),
        store.consume(both, 1, T0 + 1),
        store.consume(both, 1, T0 + 2),  # the minute window is full
        store.refund(both, 1, T0),
        store.consume(both, 1, T0 + 3),  # sees the refund made just before it
        store.peek(both, T0 + 4),
        store.consume(both, 1, T0 + 61),  # next minute; the day is full
    )
    assert answers[3] is None  # the refund
    first, second, refused, third, peeked, fourth = (
        answer for answer in answers if isinstance(answer, QuotaOutcome)
    )
    assert first.allowed and second.allowed
    assert not refused.allowed and refused.exhausted is not None
    assert refused.exhausted.window == both[1]
    assert third.allowed and [s.used for s in third.windows] == [2, 2]
    assert [s.used for s in peeked.windows] == [2, 2] and not peeked.allowed
    assert fourth.allowed and [s.used for s in fourth.windows] == [3, 1]
    assert store.transactions == 1


async def test_a_bad_call_fails_alone(store: SqliteQuotaStore) -> None:
    broken = [QuotaWindow(key="{mg:alice}:0", limit=3, period=0.0)]  # window_id divides by 0
    results = await asyncio.gather(
        store.consume(day(3), 1, T0),
        store.consume(broken, 1, T0),
        store.consume(day(3), 1, T0),
        return_exceptions=True,
    )
    assert isinstance(results[1], ZeroDivisionError)
    assert [r.windows[0].used for r in (results[0], results[2]) if isinstance(r, QuotaOutcome)] \
        == [1, 2]


async def test_a_locked_file_fails_the_whole_batch_and_the_next_one_runs(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path, busy_timeout=0.05)
    try:
        await store.ping()
        holder.execute("BEGIN IMMEDIATE")
        results = await asyncio.gather(
            store.consume(day(3), 1, T0),
            store.peek(day(3), T0),
            store.refund(day(3), 1, T0),
            store.consume(day(3), 1, T0),
            return_exceptions=True,
        )
        assert all(isinstance(r, QuotaStoreError) for r in results)
        assert {str(r) for r in results} == {f"sqlite quota store: {path}: database is locked"}
        assert all(isinstance(r, BaseException) and r.__cause__ is not None for r in results)
        holder.execute("ROLLBACK")
        # Nothing of the failed batch was charged, and the queue is not stuck.
        after = await asyncio.gather(store.consume(day(3), 1, T0), store.peek(day(3), T0))
        assert [o.windows[0].used for o in after] == [1, 1]
    finally:
        await store.close()


async def test_a_caller_cancelled_while_its_batch_runs_does_not_break_the_others(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    store = SqliteQuotaStore(tmp_path / "quota.sqlite3", busy_timeout=10.0)
    try:
        await store.ping()
        holder.execute("BEGIN IMMEDIATE")  # the batch waits on the thread until released
        tasks = [asyncio.create_task(store.consume(day(5), 1, T0)) for _ in range(3)]
        await turns()
        assert store.batches == 2  # the ping, and the three consumes
        tasks[1].cancel()
        holder.execute("ROLLBACK")
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        first, third = done[0], done[2]
        assert isinstance(first, QuotaOutcome) and isinstance(third, QuotaOutcome)
        # The cancelled consume had been taken into the batch: it ran, and was charged.
        assert [first.windows[0].used, third.windows[0].used] == [1, 3]
        assert (await store.peek(day(5), T0)).windows[0].used == 3
    finally:
        await store.close()


async def test_a_caller_cancelled_before_its_batch_is_taken_is_not_charged(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    store = SqliteQuotaStore(tmp_path / "quota.sqlite3", busy_timeout=10.0)
    try:
        await store.ping()
        holder.execute("BEGIN IMMEDIATE")
        running = asyncio.create_task(store.consume(day(5), 1, T0))
        await turns()  # taken, and waiting on the thread for the lock
        queued = [asyncio.create_task(store.consume(day(5), 1, T0)) for _ in range(2)]
        await turns()  # queued behind the running batch
        queued[0].cancel()
        holder.execute("ROLLBACK")
        first = await running
        with pytest.raises(asyncio.CancelledError):
            await queued[0]
        last = await queued[1]
        assert [first.windows[0].used, last.windows[0].used] == [1, 2]
        assert (await store.peek(day(5), T0)).windows[0].used == 2
    finally:
        await store.close()


async def test_close_lets_queued_calls_finish(tmp_path: Path, holder: sqlite3.Connection) -> None:
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path, busy_timeout=10.0)
    await store.ping()
    holder.execute("BEGIN IMMEDIATE")
    running = asyncio.create_task(store.consume(day(5), 1, T0))
    await turns()
    queued = [asyncio.create_task(store.consume(day(5), 1, T0)) for _ in range(2)]
    await turns()
    closing = asyncio.create_task(store.close())
    await turns()
    with pytest.raises(QuotaStoreError, match="store is closed"):
        await store.consume(day(5), 1, T0)  # made after close(): refused at once
    holder.execute("ROLLBACK")
    await closing
    assert [(await task).windows[0].used for task in (running, *queued)] == [1, 2, 3]
    await store.close()  # again: nothing to do
    with pytest.raises(QuotaStoreError, match="store is closed"):
        await store.peek(day(5), T0)
    reopened = SqliteQuotaStore(path)
    try:
        assert (await reopened.peek(day(5), T0)).windows[0].used == 3
    finally:
        await reopened.close()


async def test_close_in_the_same_turn_as_calls_commits_them(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path)
    *outcomes, _ = await asyncio.gather(
        *(store.consume(day(5), 1, T0) for _ in range(3)), store.close()
    )
    assert [o.windows[0].used for o in outcomes if isinstance(o, QuotaOutcome)] == [1, 2, 3]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT used FROM quota_usage").fetchone()[0] == 3


async def test_two_stores_on_one_file_never_over_admit(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    first = SqliteQuotaStore(path, busy_timeout=10.0)
    second = SqliteQuotaStore(path, busy_timeout=10.0)
    try:
        allowed = 0
        for round_ in range(4):
            calls: list[Awaitable[QuotaOutcome]] = []
            for i in range(30):
                calls.append(first.consume(day(70), 1, T0 + round_))
                calls.append(second.consume(day(70), 1, T0 + round_ + i * 1e-3))
            allowed += sum(o.allowed for o in await asyncio.gather(*calls))
        assert allowed == 70
        assert first.transactions + second.transactions < 240
        assert (await first.peek(day(70), T0 + 5)).windows[0].used == 70
    finally:
        await first.close()
        await second.close()


def test_a_fresh_event_loop_takes_over_from_a_closed_one(tmp_path: Path) -> None:
    store = SqliteQuotaStore(tmp_path / "quota.sqlite3")

    async def consume() -> bool:
        return (await store.consume(day(3), 2, T0)).allowed

    async def consume_and_close() -> bool:
        try:
            return await consume()
        finally:
            await store.close()

    assert asyncio.run(consume())
    assert not asyncio.run(consume_and_close())


# -- property: a turn's worth of random calls answers as MemoryQuotaStore does, one by one ----


@dataclass(frozen=True)
class Call:
    kind: str  # "consume", "refund" or "peek"
    dt: float
    cost: float
    which: str  # "both", "short" or "long"


calls = st.lists(
    st.builds(
        Call,
        st.sampled_from(["consume", "consume", "refund", "peek"]),
        st.sampled_from([0.0, 0.0, 0.001, 1.0, 9.999, 10.0, 61.0]),
        st.sampled_from([0.25, 1 / 3, 0.5, 1.0, 1.5, 2.0]),
        st.sampled_from(["both", "both", "short", "long"]),
    ),
    min_size=1,
    max_size=60,
)


async def issue(store: QuotaStore, plan: list[Call], concurrently: bool) -> list[object]:
    windows = {
        "short": [QuotaWindow(key="{mg:p}:10", limit=2.5, period=10.0)],
        "long": [QuotaWindow(key="{mg:p}:60", limit=4.0, period=60.0)],
    }
    windows["both"] = windows["short"] + windows["long"]
    now = T0
    made: list[Awaitable[QuotaOutcome | None]] = []
    for call in plan:
        now += call.dt
        if call.kind == "consume":
            made.append(store.consume(windows[call.which], call.cost, now))
        elif call.kind == "refund":
            # Refunds what a consume of this size would have charged now, whether it did or not:
            # both stores apply the same arithmetic to it.
            made.append(store.refund(windows[call.which], call.cost, now))
        else:
            made.append(store.peek(windows["both"], now))
    try:
        if concurrently:
            return [summary(o) for o in await asyncio.gather(*made)]
        return [summary(await one) for one in made]
    finally:
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=calls)
def test_one_turn_of_random_calls_answers_like_memory_one_by_one(plan: list[Call]) -> None:
    expected = asyncio.run(issue(MemoryQuotaStore(), plan, concurrently=False))
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteQuotaStore(Path(tmp) / "q.sqlite3")
        assert asyncio.run(issue(store, plan, concurrently=True)) == expected
        assert store.batches == 2  # all the calls, then the close
