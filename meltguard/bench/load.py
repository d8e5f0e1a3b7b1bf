"""The live side of a benchmark point: an open-loop load generator and a /metrics sampler.

Open loop: every request leaves at its arrival time whether or not earlier ones have been
answered, and its latency is counted from that scheduled time, so a slow server cannot slow
the offered load down (no coordinated omission). Nothing retries: a refusal is an outcome.
Times are converted to model seconds (x speed) as they are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from meltguard.bench.outcome import OK, UNANSWERED, RequestRecord, TelemetryPoint, delivered_work
from meltguard.bench.scenario import Arrival
from meltguard.values import Size

GPU = "0"


@dataclass(frozen=True, slots=True)
class Defaults:
    """What the policy fills in for a request that names no size or steps."""

    size: Size
    steps: int


async def offer(
    url: str,
    requests: Sequence[Arrival],
    *,
    speed: float,
    give_up_at: float,
    key_of: Callable[[str], str],
    defaults: Defaults,
    origin: float,
    progress: Callable[[float], None] | None = None,
) -> tuple[RequestRecord, ...]:
    """Send every request at origin + t/speed (loop time); answers still missing at
    origin + give_up_at/speed are abandoned and recorded as unanswered."""
    loop = asyncio.get_running_loop()
    records: list[RequestRecord] = []
    # No connection limit: an overloaded server must see every request the clients send,
    # not a client-side queue in front of it.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int, arrival: Arrival, sent: float) -> None:
            headers = {"Authorization": f"Bearer {key_of(arrival.tenant)}"}
            try:
                async with session.post(url + "/v1/images/generations", json=arrival.body(index),
                                        headers=headers) as response:
                    payload = await response.json(content_type=None)
                    status = response.status
                    degraded = "x-meltguard-degraded" in response.headers
            except asyncio.CancelledError:
                records.append(RequestRecord(arrival.t, arrival.tier, 0, UNANSWERED,
                                             (loop.time() - sent) * speed))
                raise
            except (aiohttp.ClientError, ValueError, OSError) as exc:
                records.append(RequestRecord(arrival.t, arrival.tier, 0,
                                             f"client_error:{type(exc).__name__}",
                                             (loop.time() - sent) * speed))
                return
            latency = (loop.time() - sent) * speed
            records.append(_record(arrival, status, payload, degraded, latency, defaults))

        tasks: list[asyncio.Task[None]] = []
        for index, arrival in enumerate(requests):
            sent = origin + arrival.t / speed
            delay = sent - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, arrival, sent)))
            if progress is not None:
                progress(arrival.t)
        if tasks:
            deadline = origin + give_up_at / speed
            _, pending = await asyncio.wait(tasks, timeout=max(deadline - loop.time(), 0.0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    records.sort(key=lambda r: r.t)
    return tuple(records)


def _record(arrival: Arrival, status: int, payload: object, degraded: bool, latency: float,
            defaults: Defaults) -> RequestRecord:
    body = payload if isinstance(payload, dict) else {}
    if status == 200:
        usage = body.get("usage") or {}
        images = int(usage.get("images", len(body.get("data") or ())))
        try:
            size = Size.parse(str(usage.get("size")))
        except ValueError:
            size = arrival.size or defaults.size
        steps = int(usage.get("steps") or arrival.steps or defaults.steps)
        work = delivered_work(arrival.size or defaults.size, arrival.steps or defaults.steps,
                              size, steps, images)
        return RequestRecord(arrival.t, arrival.tier, status, OK, latency, degraded, images,
                             work)
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    code = str((error or {}).get("code") or f"http_{status}")
    return RequestRecord(arrival.t, arrival.tier, status, code, latency)


async def sample_metrics(
    url: str, *, speed: float, origin: float, interval: float,
    sink: list[TelemetryPoint],
) -> None:
    """Scrape /metrics every `interval` real seconds until cancelled; each scrape with a
    temperature becomes one TelemetryPoint."""
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=max(interval * 20, 2.0))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with session.get(url + "/metrics") as response:
                    text = await response.text()
                point = parse_metrics(text, (loop.time() - origin) * speed)
                if point is not None:
                    sink.append(point)
            await asyncio.sleep(interval)


def parse_metrics(text: str, t: float) -> TelemetryPoint | None:
    temperature: float | None = None
    energy: float | None = None
    throttled = False
    level = 0
    admitted = refused = 0.0
    for line in text.splitlines():
        if line.startswith("meltguard_admission_decisions_total{"):
            count = float(line.rpartition(" ")[2])
            if 'decision="reject"' in line or 'decision="would_reject"' in line:
                refused += count
            else:
                admitted += count
        if line.startswith("meltguard_gpu_temperature_celsius{") and f'gpu="{GPU}"' in line:
            temperature = float(line.rpartition(" ")[2])
        elif (line.startswith("meltguard_gpu_throttle_active{") and f'gpu="{GPU}"' in line
              and 'reason="hw_thermal"' in line):
            throttled = float(line.rpartition(" ")[2]) > 0
        elif line.startswith("meltguard_pressure_level{") and 'gpu="all"' in line:
            level = int(float(line.rpartition(" ")[2]))
        elif line.startswith("meltguard_gpu_energy_joules_total{") and f'gpu="{GPU}"' in line:
            energy = float(line.rpartition(" ")[2])
    if temperature is None:
        return None
    return TelemetryPoint(t, temperature, throttled, level, int(admitted), int(refused),
                          energy)
