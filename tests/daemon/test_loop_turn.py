"""Work deferred to the end of the loop turn runs once per turn, and at once outside a loop."""

from __future__ import annotations

import asyncio

from meltguard.daemon.loop_turn import EndOfTurn


async def test_asked_many_times_in_a_turn_it_runs_once_at_its_end() -> None:
    runs: list[int] = []
    end = EndOfTurn(lambda: runs.append(len(runs)))
    for _ in range(5):
        end.request()
    assert runs == []
    await asyncio.sleep(0)
    assert runs == [0]
    end.request()
    await asyncio.sleep(0)
    assert runs == [0, 1]


def test_outside_a_loop_it_runs_at_once() -> None:
    runs: list[str] = []
    end = EndOfTurn(lambda: runs.append("ran"))
    end.request()
    end.request()
    assert runs == ["ran", "ran"]


def test_a_loop_that_closed_with_a_run_pending_does_not_hold_up_the_next() -> None:
    runs: list[str] = []
    end = EndOfTurn(lambda: runs.append("ran"))
    loop = asyncio.new_event_loop()

    def ask_and_stop() -> None:
        end.request()
        loop.stop()  # this turn is the last: the run it scheduled never comes

    loop.call_soon(ask_and_stop)
    loop.run_forever()
    loop.close()
    assert runs == []

    async def ask_and_yield() -> None:
        end.request()
        await asyncio.sleep(0)

    asyncio.run(ask_and_yield())
    assert runs == ["ran"]
