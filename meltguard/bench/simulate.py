"""`meltguard simulate`: a policy replayed offline, in virtual time, through the real controller.

Nothing here re-implements admission. The very objects the daemon runs (the Gate or a
baseline from `strategies`, its Scheduler, `Runtime.observe` with the pressure assessment,
the SimEngine with its Batcher, and the SimulatedGpu thermal model or a ReplaySource trace)
run on an asyncio event loop whose clock is virtual: whenever every task is waiting, the loop
jumps straight to the next timer instead of sleeping. A run of ten model minutes takes about
a second, and the same inputs give the same output, byte for byte.

What the daemon has and this has not: HTTP (parsing, headers, sockets) and the telemetry
reader thread (the sampler's schedule is kept: read, assess, every `sample_interval`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import selectors
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.events import Decided, Event
from meltguard.admission.gate import Permit
from meltguard.admission.policy import Policy
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.bench.outcome import (
    OK,
    UNANSWERED,
    PointResult,
    RequestRecord,
    TelemetryPoint,
    Transition,
    delivered_work,
)
from meltguard.bench.outcome import summarize as summarize_point
from meltguard.bench.power import policy_for
from meltguard.bench.scenario import (
    Arrival,
    Capacity,
    RequestLogError,
    Scenario,
    arrivals,
    baseline_options,
    capacity,
    load_requests,
)
from meltguard.clock import FakeClock
from meltguard.daemon.errors import status_of
from meltguard.daemon.policy_file import LoadedPolicy, PolicyFileError, load_policy_file
from meltguard.daemon.power import PowerActuator, gpu_levels
from meltguard.daemon.runtime import Runtime
from meltguard.daemon.settings import Settings
from meltguard.daemon.strategies import BaselineOptions, make_gate
from meltguard.daemon.telemetry.errors import TelemetrySpecError
from meltguard.daemon.telemetry.replay import ReplayFrame, ReplaySource, load_trace
from meltguard.daemon.telemetry.simulated import SimulatedGpu
from meltguard.errors import ErrorCode, ServiceError
from meltguard.inference.errors import EngineOutOfMemory
from meltguard.inference.sim import SimEngine
from meltguard.protocols import TelemetrySource
from meltguard.values import GpuSample

T = TypeVar("T")

# Throttle reasons under which a replayed card is taken to run at thermal-slowdown clocks.
_SLOW_REASONS = frozenset({"hw_thermal", "sw_thermal", "hw_slowdown"})


class SimulationStalled(RuntimeError):
    """Every task waits on something no timer will ever bring: a bug, not a result."""


class VirtualClock(FakeClock):
    """A FakeClock whose sleep waits on the event loop, so concurrent sleepers interleave in
    virtual time instead of each one pushing the clock forward by itself."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class _VirtualSelector(selectors.BaseSelector):
    """The loop's selector: real file descriptors are polled without blocking, and the time the
    loop would have blocked for is added to the virtual clock instead."""

    def __init__(self, clock: FakeClock) -> None:
        self._inner = selectors.DefaultSelector()
        self._clock = clock

    def register(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready:
            return ready
        if timeout is None:
            raise SimulationStalled("every task is waiting and no timer is set")
        if timeout > 0:
            self._clock.advance(timeout)
        return []

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on `clock`: call_later, sleep and timeouts all run in virtual time."""

    def __init__(self, clock: FakeClock) -> None:
        self._virtual_clock = clock
        super().__init__(_VirtualSelector(clock))

    def time(self) -> float:
        return self._virtual_clock.monotonic()


def run_virtual(
    main: Callable[[VirtualClock], Coroutine[Any, Any, T]], start: float = 1_000.0
) -> T:
    """Run `main(clock)` (a coroutine function) to completion in virtual time."""
    clock = VirtualClock(start=start)
    loop = VirtualTimeLoop(clock)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main(clock))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# ---- the simulation -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimSetup:
    """One offline run. `trace` replaces the thermal model with recorded telemetry (then the
    temperature no longer answers to the load: it is what the card did that day)."""

    loaded: LoadedPolicy
    scenario: Scenario
    requests: tuple[Arrival, ...]
    strategy: str = "meltguard"
    load: float = 0.0  # for the report only; the requests are what is offered
    trace: tuple[ReplayFrame, ...] | None = None
    max_batch: int = 1
    options: BaselineOptions = field(default_factory=BaselineOptions)
    seed: int = 0


@dataclass(frozen=True, slots=True)
class SimRun:
    records: tuple[RequestRecord, ...]
    telemetry: tuple[TelemetryPoint, ...]
    transitions: tuple[Transition, ...] = ()
    trace_slowdown_c: float | None = None  # the highest slowdown a replayed trace reported


class _ReplayThrottle:
    """Slowdown of the engine under a replayed trace: slow clocks while the card reported a
    thermal throttle reason at the last read."""

    def __init__(self, source: ReplaySource, factor: float) -> None:
        self.source = source
        self.factor = factor
        self.slow = False

    def read(self) -> Sequence[GpuSample]:
        samples = self.source.read()
        self.slow = any(s.throttle & _SLOW_REASONS for s in samples)
        return samples

    def slowdown_factor(self) -> float:
        return self.factor if self.slow else 1.0


def simulate(setup: SimSetup) -> SimRun:
    return run_virtual(lambda clock: _simulate(setup, clock))


async def _simulate(setup: SimSetup, clock: VirtualClock) -> SimRun:
    loaded = policy_for(setup.strategy, setup.loaded)
    policy = loaded.policy
    scenario = setup.scenario
    replay: _ReplayThrottle | None = None
    source: TelemetrySource
    gpu: SimulatedGpu | None = None

    def slowdown() -> float:
        if gpu is not None:
            return gpu.slowdown_factor()
        return replay.slowdown_factor() if replay is not None else 1.0

    decisions = {"admitted": 0, "refused": 0}

    def count(event: Event) -> None:
        # What the daemon's admission_decisions_total counts, for the same timeline.
        if isinstance(event, Decided):
            refused = event.decision in ("reject", "would_reject")
            decisions["refused" if refused else "admitted"] += 1

    gate = make_gate(setup.strategy, policy, MemoryQuotaStore(), clock, on_event=count,
                     options=setup.options, rng=random.Random(setup.seed))
    engine = SimEngine(clock=clock, params=scenario.engine, max_batch=setup.max_batch,
                       slowdown=slowdown)
    if setup.trace is not None:
        replay = _ReplayThrottle(ReplaySource(setup.trace, clock=clock, loop=True),
                                 scenario.gpu.throttle_slowdown)
        source = replay.source
    else:
        # As the daemon wires it (serve.assemble): only granted permits hold GPU memory.
        gpu = SimulatedGpu(
            clock=clock, busy_seconds=engine.busy_seconds,
            inflight=lambda: sum(gate.snapshot().inflight.values()), params=scenario.gpu,
        )
        source = gpu

    settings = Settings(model="sim", telemetry="sim", store="memory", strategy=setup.strategy,
                        max_batch=setup.max_batch)
    runtime = Runtime(settings, clock=clock, engine=engine, gate=gate, loaded=loaded)
    lever = PowerActuator(gpu) if gpu is not None else None

    start = clock.monotonic()
    telemetry: list[TelemetryPoint] = []
    records: list[RequestRecord] = []
    transitions: list[Transition] = []
    slowdowns: list[float] = []
    # What counts as throttled: the simulated card reports hw_thermal when it slows down; a
    # recorded one may report any of the slowdown reasons.
    slow_reasons = _SLOW_REASONS if replay is not None else frozenset({"hw_thermal"})

    def note_level(now: float) -> None:
        state = runtime.pressure
        if state is None:
            return
        label = state.level.label
        if not transitions or transitions[-1].level != label:
            transitions.append(Transition(now - start, label, tuple(state.reasons)))

    def read() -> None:
        now = clock.monotonic()
        samples = replay.read() if replay is not None else source.read()
        if samples:
            runtime.observe(samples, now)
            slowdowns.extend(s.slowdown_c for s in samples if s.slowdown_c is not None)
            first = samples[0]
            if first.temperature_c is not None:
                telemetry.append(TelemetryPoint(
                    now - start, first.temperature_c, bool(first.throttle & slow_reasons),
                    int(runtime.level), decisions["admitted"], decisions["refused"],
                    first.energy_j,
                ))
            if lever is not None:
                # As the daemon's power lever runs it, minus its thread (power_wiring).
                lever.follow(gpu_levels(runtime.pressure), runtime.loaded.policy)
        runtime.observe(None, now)
        note_level(now)

    async def sample_forever() -> None:
        interval = policy.pressure.sample_interval
        while True:
            read()
            await asyncio.sleep(interval)

    async def one(index: int, arrival: Arrival) -> None:
        caller = Caller(arrival.tenant, arrival.tier, anonymous=False)
        ask = ImageAsk(prompt=f"benchmark image {index}", size=arrival.size,
                       steps=arrival.steps, n=arrival.n)
        sent = start + arrival.t
        runtime.request_started()
        try:
            record = await _serve(runtime, engine, caller, ask)
        except asyncio.CancelledError:
            records.append(RequestRecord(arrival.t, arrival.tier, 0, UNANSWERED,
                                         clock.monotonic() - sent))
            raise
        finally:
            runtime.request_finished()
        records.append(replace(record, t=arrival.t, latency_s=clock.monotonic() - sent))

    runtime.observe((), start)
    sampler = asyncio.create_task(sample_forever())
    tasks: list[asyncio.Task[None]] = []
    for index, arrival in enumerate(setup.requests):
        delay = start + arrival.t - clock.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, arrival)))
    last = setup.requests[-1].t if setup.requests else 0.0
    give_up = start + max(last, scenario.end_s) + scenario.grace_s
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(give_up - clock.monotonic(), 0.0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    remaining = give_up - clock.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)  # the cooling tail belongs to the temperature path
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    await engine.close()
    await gate.drain()
    records.sort(key=lambda r: r.t)
    return SimRun(tuple(records), tuple(telemetry), tuple(transitions),
                  max(slowdowns) if slowdowns else None)


async def _serve(runtime: Runtime, engine: SimEngine, caller: Caller,
                 ask: ImageAsk) -> RequestRecord:
    """The request path of app.create_image and app._generate, minus HTTP."""
    try:
        permit = await runtime.gate.admit(caller, ask)
    except ServiceError as err:
        status = status_of(err, runtime.gate.overload_status)
        return RequestRecord(0.0, caller.tier, status, err.code.value, 0.0)
    started = runtime.clock.monotonic()
    try:
        pngs = await engine.generate(permit.job)
    except EngineOutOfMemory:
        permit.settle("dropped")
        return RequestRecord(0.0, caller.tier, 503, ErrorCode.GPU_OUT_OF_MEMORY.value, 0.0)
    except asyncio.CancelledError:
        permit.settle("ignored")
        raise
    except Exception:
        permit.settle("failed")
        return RequestRecord(0.0, caller.tier, 500, ErrorCode.GENERATION_FAILED.value, 0.0)
    permit.settle("success", seconds=runtime.clock.monotonic() - started)
    return RequestRecord(0.0, caller.tier, 200, OK, 0.0, bool(permit.degraded), len(pngs),
                         _work(ask, permit, len(pngs), runtime.loaded.policy))


def _work(ask: ImageAsk, permit: Permit, images: int, policy: Policy) -> float:
    limits = policy.limits
    return delivered_work(ask.size or limits.default_size, ask.steps or limits.default_steps,
                          permit.job.size, permit.job.steps, images)


def simulate_point(setup: SimSetup, cap: Capacity) -> PointResult:
    run = simulate(setup)
    slowdown, _ = slowdown_source(setup, run)
    return summarize_point(
        strategy=setup.strategy, load=setup.load, scenario=setup.scenario,
        capacity_ips=cap.sustainable_ips, requests=run.records, telemetry=run.telemetry,
        slowdown_c=slowdown, use_model_slowdown=setup.trace is None,
        transitions=run.transitions,
    )


def slowdown_source(setup: SimSetup, run: SimRun) -> tuple[float | None, str]:
    """The slowdown temperature the figures are measured against, and where it comes from:
    the built-in thermal model when it ran; with a trace, what the trace reported, else the
    policy's critical temperature line, else nothing (a recorded card is not the model)."""
    if setup.trace is None:
        return setup.scenario.gpu.slowdown_c, "the built-in thermal model"
    if run.trace_slowdown_c is not None:
        return run.trace_slowdown_c, "the trace"
    critical = setup.loaded.policy.pressure.levels.get("critical")
    if critical is not None and critical.enter.temperature_c is not None:
        return critical.enter.temperature_c, "the policy (critical's temperature_c)"
    return None, "nowhere: neither the trace nor the policy gives one"


# ---- command line ---------------------------------------------------------------------------


def run_simulate(args: argparse.Namespace) -> int:
    from meltguard.daemon.logs import configure_logging

    configure_logging("console", level=logging.ERROR, cache=False)
    try:
        loaded = load_policy_file(args.policy)
    except PolicyFileError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    try:
        policy_for(args.strategy, loaded)
    except ValueError as exc:
        print(f"meltguard simulate: {exc}", file=sys.stderr)
        return 2
    scenario = Scenario()
    if args.duration is not None or args.warmup is not None or args.seed is not None:
        scenario = replace(
            scenario,
            duration_s=args.duration if args.duration is not None else scenario.duration_s,
            warmup_s=args.warmup if args.warmup is not None else scenario.warmup_s,
            seed=args.seed if args.seed is not None else scenario.seed,
        )
    cap = capacity(scenario)
    try:
        trace = load_trace(args.trace) if args.trace else None
        if args.requests:
            requests = load_requests(args.requests)
            last = requests[-1].t if requests else 0.0
            # The window is half-open; the last request must still fall inside it.
            scenario = replace(scenario, warmup_s=0.0,
                               duration_s=math.nextafter(max(last, 1e-9), math.inf))
        else:
            requests = arrivals(scenario, args.load, cap)
    except (RequestLogError, TelemetrySpecError) as exc:
        print(f"meltguard simulate: {exc}", file=sys.stderr)
        return 2
    unknown = sorted({a.tier for a in requests} - set(loaded.policy.tiers))
    if unknown:
        print(f"meltguard simulate: the requests name tiers the policy lacks: "
              f"{', '.join(unknown)}", file=sys.stderr)
        return 2
    setup = SimSetup(loaded=loaded, scenario=scenario, requests=requests,
                     strategy=args.strategy, load=0.0 if args.requests else args.load,
                     trace=trace, options=baseline_options(cap))
    run = simulate(setup)
    slowdown, slowdown_from = slowdown_source(setup, run)
    result = summarize_point(
        strategy=setup.strategy, load=setup.load, scenario=setup.scenario,
        capacity_ips=cap.sustainable_ips, requests=run.records, telemetry=run.telemetry,
        slowdown_c=slowdown, use_model_slowdown=trace is None, transitions=run.transitions,
    )
    print(render(result, loaded.policy, cap, source="trace " + args.trace if args.trace
                 else "thermal model", slowdown_from=slowdown_from))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 0


def render(result: PointResult, policy: Policy, cap: Capacity, *, source: str,
           slowdown_from: str = "the built-in thermal model") -> str:
    """The report ops read before deploying: per tier served, degraded and refused, then the
    temperature path and every level the controller went through."""
    replayed = not source.startswith("thermal model")
    capacity_line = cap.describe()
    if replayed:
        # The built-in card's capacity is not this card's: say so rather than lean on it.
        capacity_line = (
            "capacity: the replayed card's temperature does not answer to this load, so "
            "goodput is compared with the simulated engine's "
            f"{cap.sustainable_ips:.4f} images/s for reference only"
        )
    lines = [
        f"strategy {result.strategy}, {result.offered_rps * 60:.1f} requests/min offered over "
        f"{result.duration_s:g} s, telemetry from the {source}",
        capacity_line,
        "",
        f"{'tier':<8}{'offered':>8}{'served':>8}{'degraded':>9}{'late':>6}{'refused':>8}"
        f"{'success':>9}{'share':>7}{'p50 s':>8}{'p99 s':>8}  refusals",
    ]
    for t in result.tiers:
        refusals = ", ".join(f"{k} {v}" for k, v in t.refused.items()) or "-"
        lines.append(
            f"{t.tier:<8}{t.offered:>8}{t.succeeded:>8}{t.degraded:>9}{t.late:>6}"
            f"{sum(t.refused.values()):>8}{t.success_rate:>9.1%}"
            f"{result.image_share(t.tier):>7.0%}{_s(t.p50_s):>8}"
            f"{_s(t.p99_s):>8}  {refusals}"
        )
    lines += [
        "",
        f"goodput {result.goodput_ips:.4f} images/s = {result.goodput_ratio:.2f} x "
        + ("the reference above" if replayed else "sustainable capacity")
        + f"; p50 {_s(result.p50_s)} s, p99 {_s(result.p99_s)} s",
        f"peak {_s(result.peak_c, 1)} °C (slowdown {_s(result.slowdown_c, 1)} °C, from "
        f"{slowdown_from}), {result.above_slowdown_s:.0f} s at or above slowdown, "
        f"{result.throttled_s:.0f} s throttled"
        + (" (thermal reasons the trace reported)" if replayed else ""),
        f"full-quality work {result.work_ratio:.3f} x "
        + ("the reference above" if replayed else "sustainable capacity") + "; "
        + (f"{result.joules_per_work:.0f} J per full-quality image"
           if result.joules_per_work is not None else "no energy counter"),
        "temperature path: " + _path(result.telemetry),
        "",
        "pressure levels (s from the start: level, reasons):",
    ]
    for change in result.transitions or ():
        reasons = ", ".join(change.reasons) or "-"
        lines.append(f"  {change.t:8.1f}  {change.level:<9} {reasons}")
    if not result.transitions:
        lines.append("  (none recorded)")
    return "\n".join(lines)


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _path(points: Sequence[TelemetryPoint], marks: int = 24) -> str:
    if not points:
        return "(no telemetry)"
    end = points[-1].t
    step = max(end / marks, 1e-9)
    out, index = [], 0
    for k in range(marks + 1):
        at = k * step
        while index + 1 < len(points) and points[index + 1].t <= at:
            index += 1
        out.append(f"{points[index].temperature_c:.0f}")
    return f"every {step:.0f} s: " + " ".join(out) + " °C"


