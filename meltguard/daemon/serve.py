"""`meltguard serve`: build the parts from settings, run the server, reload on SIGHUP and
file change, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from meltguard.admission.policy import Policy
from meltguard.clock import SystemClock
from meltguard.daemon import fd_guard
from meltguard.daemon.admission_events import AdmissionEvents
from meltguard.daemon.app import abandon_inflight, create_app
from meltguard.daemon.logs import configure_logging
from meltguard.daemon.policy_file import (
    LoadedPolicy,
    PolicyFileError,
    builtin_policy,
    load_policy_file,
)
from meltguard.daemon.power_wiring import PowerAndEnergy
from meltguard.daemon.runtime import Runtime
from meltguard.daemon.settings import Settings
from meltguard.daemon.stores.lifecycle import (
    QUOTA_STORE,
    StoreUnusable,
    check_at_start,
    register_store_metrics,
)
from meltguard.daemon.stores.redis import redact_url
from meltguard.daemon.stores.select import build_store, default_store_spec
from meltguard.daemon.strategies import make_gate
from meltguard.daemon.telemetry import (
    NvmlUnavailable,
    Sampler,
    SimulatedGpu,
    TelemetrySpecError,
    open_source,
    register_telemetry_metrics,
    requested_label,
)
from meltguard.inference.errors import ModelNotFound
from meltguard.inference.select import build_engine
from meltguard.protocols import Clock, Engine, QuotaStore, TelemetrySource

log = structlog.get_logger("meltguard")


def settings_from_args(args: argparse.Namespace) -> Settings:
    gpus = tuple(int(x) for x in str(args.gpus).split(",") if x.strip()) if args.gpus else None
    return Settings(
        host=args.host,
        port=args.port,
        policy=args.policy,
        model=args.model,
        telemetry=args.telemetry,
        store=args.store or default_store_spec(),
        log_format=args.log_format,
        max_batch=args.max_batch,
        sim_speed=args.sim_speed,
        replay_loop=args.replay_loop,
        drain_timeout=args.drain_timeout,
        idle_timeout=args.idle_timeout,
        log_prompts=args.log_prompts,
        admin_remote=args.admin_remote,
        public_url=args.public_url,
        gpus=gpus,
        strategy=args.strategy,
        loop=args.loop,
    )


class StartupError(Exception):
    """A reason not to start, printed as one line; `exit_code` 2 marks a usage error (a bad
    --telemetry value or replay trace)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Assembly:
    """The built parts of one daemon; `serve` runs it, tests may build one directly."""

    runtime: Runtime
    app: web.Application
    source: TelemetrySource
    sampler: Sampler


def load_initial_policy(settings: Settings) -> LoadedPolicy:
    if settings.policy is None:
        return builtin_policy()
    try:
        return load_policy_file(settings.policy)
    except PolicyFileError as exc:
        raise StartupError("invalid policy:\n" + "\n".join(exc.lines)) from None
    except OSError as exc:
        raise StartupError(f"cannot read policy {settings.policy}: {exc}") from None


def assemble(
    settings: Settings,
    clock: Clock,
    registry: CollectorRegistry,
    *,
    engine: Engine | None = None,
    source: TelemetrySource | None = None,
    store: QuotaStore | None = None,
) -> Assembly:
    """Build every part from settings; tests pass their own engine, source or store."""
    loaded = load_initial_policy(settings)
    if store is None:
        try:
            store = build_store(settings.store)
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    events = AdmissionEvents()  # the gate calls its sink itself: one call per event
    try:
        gate = make_gate(settings.strategy, loaded.policy, store, clock, on_event=events.on_event)
    except ValueError as exc:
        raise StartupError(f"--strategy {settings.strategy}: {exc}") from None

    def inflight() -> int:
        # Only granted permits hold GPU memory; queued requests do not.
        return sum(gate.snapshot().inflight.values())

    # The simulated GPU and the sim engine feed each other (busy time in, thermal slowdown
    # out): each reads the other through a closure, called only once both exist.
    def busy_seconds() -> float:
        return the_engine.busy_seconds()

    def slowdown() -> float:
        return telemetry.slowdown_factor() if isinstance(telemetry, SimulatedGpu) else 1.0

    note: str | None = None
    if source is None:
        try:
            source, note = open_source(
                settings.telemetry, clock=clock, busy_seconds=busy_seconds, inflight=inflight,
                sim_speed=settings.sim_speed, replay_loop=settings.replay_loop,
                gpu_indices=settings.gpus,
            )
        except NvmlUnavailable as exc:
            raise StartupError(f"--telemetry {settings.telemetry}: {exc}") from None
        except TelemetrySpecError as exc:
            # A replay refusal already names FILE:LINE; the spec would only repeat the file.
            raise StartupError(str(exc), exit_code=2) from None
    telemetry: TelemetrySource = source
    if engine is None:
        try:
            engine = build_engine(settings.model, max_batch=settings.max_batch, clock=clock,
                                  sim_speed=settings.sim_speed, sim_slowdown=slowdown)
        except ModelNotFound as exc:
            raise StartupError(str(exc)) from None
    the_engine: Engine = engine

    runtime = Runtime(settings, clock=clock, engine=engine, gate=gate, loaded=loaded,
                      events=events)
    runtime.telemetry_kind = source.kind
    runtime.telemetry_note = note

    pressure = loaded.policy.pressure
    power = PowerAndEnergy(runtime, source, registry)
    sampler = Sampler(
        source, clock=clock, interval=pressure.sample_interval, stale_after=pressure.stale_after,
        on_snapshot=lambda snap: power.observe(snap.samples, clock.monotonic()),
        on_tick=lambda now: power.observe(None, now),
    )
    register_telemetry_metrics(registry, sampler, clock=clock,
                               requested=requested_label(settings.telemetry))

    def retune(policy: Policy) -> None:
        sampler.set_interval(policy.pressure.sample_interval)
        sampler.set_stale_after(policy.pressure.stale_after)

    runtime.on_policy_change = retune
    app = create_app(runtime, registry)
    app[QUOTA_STORE] = store
    register_store_metrics(registry, store)
    app.cleanup_ctx.append(_resources_ctx(sampler, source, store, runtime))
    app.cleanup_ctx.append(power.ctx)
    return Assembly(runtime, app, source, sampler)


def _resources_ctx(
    sampler: Sampler, source: TelemetrySource, store: QuotaStore, runtime: Runtime
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runtime.observe((), runtime.clock.monotonic())
        await _warm_store(store)
        sampler.start()
        yield
        await sampler.stop()  # closes the source, unless a read is hung inside the driver
        await runtime.gate.drain()  # the gate's refunds reach the store before it closes
        await store.close()

    return ctx


async def _warm_store(store: QuotaStore) -> None:
    """Open the store's connections before the first request instead of during a burst: an
    unusable SQLite file stops startup; an unreachable Redis is logged (lifecycle.py)."""
    try:
        await check_at_start(store)
    except StoreUnusable as exc:
        raise StartupError(str(exc)) from None


async def _watch_policy(runtime: Runtime, interval: float) -> None:
    """Reload when the file's content changes (editors replace files, so compare bytes)."""
    path = runtime.policy_path
    if path is None or interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(OSError):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            unseen = digest not in (runtime.loaded.sha256, runtime.rejected_sha256)
            if unseen and not runtime.reload("file_change"):
                runtime.rejected_sha256 = digest


async def serve(settings: Settings) -> int:
    clock = SystemClock()
    registry = CollectorRegistry()
    fd_guard.install(asyncio.get_running_loop())
    assembly = assemble(settings, clock, registry)
    runtime = assembly.runtime
    if runtime.telemetry_note:
        log.warning("telemetry.fallback", source=runtime.telemetry_kind,
                    reason=runtime.telemetry_note)
    if not runtime.loaded.policy.api_keys:
        log.info("policy.no_keys", hint="add keys: `meltguard policy hash-key SECRET`, put the "
                 "hex under api_keys in a policy file, run with --policy FILE")

    # keepalive_timeout also bounds a connection that never sends a whole request (aiohttp
    # arms it at accept; its default is 3630 s); shutdown_timeout is short because the drain
    # below has already waited for in-flight work.
    runner = web.AppRunner(assembly.app, handler_cancellation=True, access_log=None,
                           keepalive_timeout=settings.idle_timeout, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    log.info("meltguard.listening", url=settings.base_url, model=runtime.engine.name,
             telemetry=runtime.telemetry_kind, policy=settings.policy or "built-in",
             store=redact_url(settings.store), loop=loop_name(asyncio.get_running_loop()))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: runtime.reload("sighup"))
    watcher = asyncio.create_task(_watch_policy(runtime, settings.policy_poll))
    _notify_systemd("READY=1")
    await stop.wait()

    _notify_systemd("STOPPING=1")
    runtime.accepting = False
    log.info("meltguard.draining", active=runtime.active_requests,
             deadline_s=settings.drain_timeout)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runtime.wait_idle(), settings.drain_timeout)
    # Past the deadline: what is left answers 503 shutting_down (quota refunded) while its
    # client is still connected, instead of being cut off by runner.cleanup().
    abandoned = abandon_inflight(assembly.app)
    if abandoned:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.wait_idle(), 1.0)
    watcher.cancel()
    await runner.cleanup()
    log.info("meltguard.stopped", abandoned=abandoned)
    return 0


def _notify_systemd(state: str) -> None:
    """sd_notify without a dependency: one datagram to $NOTIFY_SOCKET when systemd set it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `auto` where uvloop is installed (a Linux dependency) and for
    `uvloop`; None (asyncio's own) for `asyncio`, or for `auto` without uvloop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run_serve(settings: Settings) -> int:
    configure_logging(settings.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
            return runner.run(serve(settings))
    except StartupError as exc:
        print(f"meltguard: {exc}", file=sys.stderr)
        return exc.exit_code
