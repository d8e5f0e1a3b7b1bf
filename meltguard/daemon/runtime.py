"""The daemon's live state and the hooks that connect its parts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from meltguard.admission.events import Event
from meltguard.admission.policy import LEVEL_NAMES, Level, Policy
from meltguard.admission.pressure import PressureState, assess, cooling_eta
from meltguard.admission.strategy import AdmissionStrategy
from meltguard.daemon.admission_events import AdmissionEvents
from meltguard.daemon.energy import EnergyMeter
from meltguard.daemon.image_files import ImageFiles
from meltguard.daemon.metrics import LiveView, Metrics
from meltguard.daemon.policy_file import (
    LoadedPolicy,
    PolicyFileError,
    file_sha256,
    load_policy_file,
)
from meltguard.daemon.settings import Settings
from meltguard.protocols import Clock, Engine
from meltguard.values import GpuSample

log = structlog.get_logger("meltguard")


class Runtime:
    """Owns what the running daemon knows between requests: the policy in force and its
    reloads, the latest telemetry and pressure level (pushed to the gate), the count of
    requests in flight (for the drain), the images served by URL, and the event sink that
    turns the gate's events into metrics and log lines."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        engine: Engine,
        gate: AdmissionStrategy,
        loaded: LoadedPolicy,
        events: AdmissionEvents | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine
        self.gate = gate
        self.loaded = loaded
        self.pressure: PressureState | None = None
        self.samples: Sequence[GpuSample] = ()
        self.telemetry_kind = "none"
        self.telemetry_note: str | None = None
        self.accepting = True
        self.active_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.images = ImageFiles(settings.url_ttl)
        self.energy = EnergyMeter()  # joules per image; fed by the sampler and the engine
        self.events = events if events is not None else AdmissionEvents()
        self.metrics = None  # the app attaches its Metrics (see the property)
        self.on_policy_change: Callable[[Policy], None] = lambda policy: None
        self.rejected_sha256: str | None = None  # a bad file is reported once, not every poll
        self.started_at = clock.monotonic()

    @property
    def metrics(self) -> Metrics | None:
        return self.events.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        # Held by the event sink, which the gate calls on every decision.
        self.events.metrics = metrics

    # -- in-flight accounting (drain on SIGTERM) -------------------------------------------

    def request_started(self) -> None:
        self.active_requests += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- policy ---------------------------------------------------------------------------

    @property
    def policy_path(self) -> Path | None:
        return Path(self.settings.policy) if self.settings.policy else None

    def reload(self, trigger: str) -> bool:
        """Swap in the file's policy, or keep the current one whole if the file is bad."""
        path = self.policy_path
        if path is None:
            log.info("policy.reload_skipped", trigger=trigger, reason="built-in policy in use")
            return True
        digest = file_sha256(path)
        if digest is not None and digest == self.rejected_sha256:
            # SIGHUP and the file watcher both see one bad edit: it fails (and counts) once.
            log.info("policy.reload_skipped", trigger=trigger, reason="already rejected")
            return False
        try:
            loaded = load_policy_file(path)
        except (PolicyFileError, OSError) as exc:
            errors = exc.lines if isinstance(exc, PolicyFileError) else [f"{path}: {exc}"]
            log.error("policy.reload_failed", trigger=trigger, errors=errors)
            self._count_reload("failure")
            self.rejected_sha256 = digest
            return False
        changed = loaded.sha256 != self.loaded.sha256
        self.loaded = loaded
        self.gate.set_policy(loaded.policy)
        self.on_policy_change(loaded.policy)
        self.rejected_sha256 = None
        self._count_reload("success")
        log.info("policy.reloaded", trigger=trigger, sha256=loaded.sha256[:12], changed=changed,
                 mode=loaded.policy.mode)
        return True

    def _count_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.policy_reloads.labels(result).inc()

    # -- pressure -------------------------------------------------------------------------

    def observe(self, samples: Sequence[GpuSample] | None, now: float) -> None:
        """Assess pressure from the newest samples (None: no new read, re-check staleness)."""
        if samples is not None:
            self.samples = samples
        policy = self.loaded.policy
        if not self.samples and now - self.started_at < policy.pressure.stale_after:
            # The first read has not had time to arrive; that is not missing telemetry.
            return
        previous = self.pressure
        state = assess(self.samples, previous, policy, now)
        self.pressure = state
        # The level can only drop at a sample, so a retry must land after the next one.
        eta = cooling_eta(state, policy, now) + policy.pressure.sample_interval
        self.gate.set_pressure(state.level, eta)
        # Pacing toward the policy's hold line (pressure.hold); None when there is none.
        self.gate.set_duty_budget(state.duty_budget)
        if previous is None or previous.level != state.level:
            rising = previous is not None and state.level > previous.level
            # "level" is the log level's key; the pressure level goes under "pressure".
            (log.warning if rising else log.info)(
                "pressure.level_changed",
                pressure=state.level.label,
                previous=previous.level.label if previous else None,
                stale=state.stale,
                reasons=list(state.reasons),
            )

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """The gate's event sink: metrics and log lines (see admission_events)."""
        self.events.on_event(event)

    # -- scrape-time view -----------------------------------------------------------------

    def view(self) -> LiveView:
        snap = self.gate.snapshot()
        policy = self.loaded.policy
        levels: dict[str, int] = {}
        if self.pressure is not None:
            levels = {str(g.index): int(g.level) for g in self.pressure.gpus}
            levels["all"] = int(self.pressure.level)
        enter = {
            name: level.enter.temperature_c
            for name, level in policy.pressure.levels.items()
            if name in LEVEL_NAMES and level.enter.temperature_c is not None
        }
        return LiveView(
            queue_depth=snap.queue_depth,
            inflight=snap.inflight,
            quota_factor=snap.quota_factor,
            queue_wait_budget=snap.max_queue_wait,
            concurrency_limit=snap.concurrency_limit,
            pressure_levels=levels,
            enter_temperatures=enter,
            policy_mode=policy.mode,
            policy_sha256=self.loaded.sha256,
        )

    @property
    def level(self) -> Level:
        return self.pressure.level if self.pressure is not None else Level.NORMAL
