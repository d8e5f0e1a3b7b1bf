"""Connects the power lever and the energy meter to a daemon's parts: the sampler's readings
go to the pressure logic, then to the meter and the lever; the engine reports its batches to
the meter; both export their metrics; the lever restores the defaults when the app stops."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry

from meltguard.daemon.energy import EnergyCollector
from meltguard.daemon.power import PowerActuator, PowerCollector, PowerLever
from meltguard.daemon.runtime import Runtime
from meltguard.protocols import BatchObservable, PowerLimits, TelemetrySource
from meltguard.values import GpuSample


class PowerAndEnergy:
    def __init__(
        self, runtime: Runtime, source: TelemetrySource, registry: CollectorRegistry
    ) -> None:
        self.runtime = runtime
        registry.register(EnergyCollector(runtime.energy))
        if isinstance(runtime.engine, BatchObservable):
            runtime.engine.on_batch(runtime.energy.batch_ran)
        actuator = PowerActuator(source) if isinstance(source, PowerLimits) else None
        registry.register(PowerCollector(actuator))
        self.lever = PowerLever(actuator) if actuator is not None else None

    def observe(self, samples: Sequence[GpuSample] | None, now: float) -> None:
        """What the sampler calls: pressure first, then the meter and the lever follow it."""
        runtime = self.runtime
        runtime.observe(samples, now)
        if samples is not None:
            runtime.energy.observe(samples)
        if self.lever is not None:
            self.lever.follow(runtime.pressure, runtime.loaded.policy)

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Register after the sampler's context: cleanup runs in reverse, so the defaults are
        restored while NVML is still open."""
        yield
        if self.lever is not None:
            await self.lever.close()
