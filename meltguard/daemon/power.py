"""The power limit as the first lever: each GPU's limit follows its pressure level.

Near the top of the clock range a GPU's throughput falls much more slowly than its power, so a
card capped at the power it can shed as heat does more work than one run flat out until it
throttles. The policy's `power` section gives, per level, the limit as a ratio of the card's
default; normal restores the default. The actuator sets a limit only when the ratio a GPU should
have changes (a level change or a reload), clamped to the range the card accepts.

Setting a limit needs root or CAP_SYS_ADMIN. A card that refuses (NO_PERMISSION,
NOT_SUPPORTED) is said once in the log and in `meltguard_power_limit_changes_total`, and then
left alone: admission goes on without the lever. Shadow mode logs what it would set and sets
nothing. The default is restored at shutdown (SIGTERM, SIGINT) and, through atexit, on any
other exit the interpreter still runs; a limit survives neither a driver reload nor a reboot.

NVML calls block (seconds, on a card falling off the bus), so they run on one daemon thread of
this module's own: never on the event loop, and a hung call cannot hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meltguard.admission.policy import Level, Policy
from meltguard.admission.pressure import PressureState
from meltguard.daemon.catalog import BY_NAME, PREFIX
from meltguard.protocols import PowerLimits

log = structlog.get_logger("meltguard.power")

# Refusals that will not change while the process lives: stop asking that card.
_REFUSALS = frozenset({"nvml_no_permission", "nvml_not_supported", "nvml_no_handle", "unreadable"})
_PRIVILEGE_HINT = (
    "setting a GPU power limit needs root or CAP_SYS_ADMIN (see the README); admission goes on "
    "without the power lever"
)


@dataclass(frozen=True, slots=True)
class CardLimits:
    default_w: float
    min_w: float
    max_w: float


def limit_for(ratio: float | None, card: CardLimits) -> float:
    """The limit for a ratio of the default (None: the default), clamped to the card's range."""
    if ratio is None:
        return card.default_w
    return min(max(ratio * card.default_w, card.min_w), card.max_w)


class PowerActuator:
    """The decisions and the NVML calls, synchronous and thread-safe; `PowerLever` runs it off
    the event loop. Unit tests drive it directly with a fake PowerLimits."""

    def __init__(self, limits: PowerLimits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._cards: dict[int, CardLimits] = {}
        self._in_force: dict[int, float] = {}  # gpu -> ratio we set; absent: the default
        self._attempted: dict[int, float | None] = {}  # what enforce mode last asked for
        self._shadowed: dict[int, float | None] = {}  # what shadow mode last logged
        self._refused: dict[int, str] = {}
        self._changes: Counter[tuple[int, str]] = Counter()
        self._stopped = False

    @property
    def changes(self) -> Mapping[tuple[int, str], int]:
        return dict(self._changes)

    def in_force(self, gpu: int) -> float | None:
        """The ratio this process has set on `gpu`; None while the default is in force."""
        return self._in_force.get(gpu)

    def follow(self, levels: Mapping[int, Level], policy: Policy) -> None:
        with self._lock:
            if self._stopped:
                return
            for gpu, level in sorted(levels.items()):
                if gpu not in self._refused:
                    self._follow_one(gpu, level, policy)

    def shutdown(self) -> None:
        """Restore every default this process changed; later `follow` calls do nothing."""
        with self._lock:
            self._stopped = True
            self._restore_all("shutdown")

    def _follow_one(self, gpu: int, level: Level, policy: Policy) -> None:
        ratio = policy.power_ratio(level)
        if policy.mode == "shadow":
            if gpu in self._in_force:
                # Shadow mode admits everything; a cap left from enforce mode would not be.
                self._set(gpu, None, level)
            self._attempted.pop(gpu, None)
            if self._shadowed.get(gpu) != ratio:
                self._shadowed[gpu] = ratio
                card = self._card(gpu)
                log.info("power.would_set", gpu=gpu, pressure=level.label, ratio=ratio,
                         watts=None if card is None else round(limit_for(ratio, card), 1))
                self._changes[(gpu, "shadow")] += 1
            return
        self._shadowed.pop(gpu, None)
        if self._attempted.get(gpu) == ratio:
            return  # asked for already, whatever came of it: retried at the next change
        self._attempted[gpu] = ratio
        if self._in_force.get(gpu) != ratio:
            self._set(gpu, ratio, level)

    def _restore_all(self, why: str) -> None:
        for gpu in sorted(self._in_force):
            self._set(gpu, None, None, why=why)
        self._attempted.clear()

    def _card(self, gpu: int) -> CardLimits | None:
        card = self._cards.get(gpu)
        if card is not None:
            return card
        default = self._limits.default_power_limit_w(gpu)
        if default is None:
            return None
        bounds = self._limits.power_limit_range_w(gpu)
        low, high = bounds if bounds is not None else (default, default)
        card = self._cards[gpu] = CardLimits(default, low, high)
        return card

    def _set(self, gpu: int, ratio: float | None, level: Level | None, why: str = "") -> None:
        card = self._card(gpu)
        if card is None:
            self._refuse(gpu, "unreadable", "the card's default power limit cannot be read")
            return
        watts = limit_for(ratio, card)
        result = self._limits.set_power_limit_w(gpu, watts)
        self._changes[(gpu, result)] += 1
        if result == "success":
            if ratio is None:
                self._in_force.pop(gpu, None)
            else:
                self._in_force[gpu] = ratio
            log.info("power.limit_set", gpu=gpu, watts=round(watts, 1), ratio=ratio,
                     default_w=card.default_w,
                     pressure=None if level is None else level.label, why=why or None)
        elif result in _REFUSALS:
            self._refuse(gpu, result, f"the card refused a {watts:.0f} W limit")
        else:
            log.warning("power.limit_failed", gpu=gpu, watts=round(watts, 1), result=result)

    def _refuse(self, gpu: int, result: str, detail: str) -> None:
        if result == "unreadable":
            self._changes[(gpu, result)] += 1
        self._refused[gpu] = result
        self._in_force.pop(gpu, None)
        log.warning("power.lever_unavailable", gpu=gpu, result=result, detail=detail,
                    hint=_PRIVILEGE_HINT)


def gpu_levels(state: PressureState | None) -> dict[int, Level]:
    """Each GPU's own level: only the hot card is capped. A card the pressure logic has not
    read yet gets none (no decision without evidence)."""
    if state is None:
        return {}
    return {g.index: g.level for g in state.gpus}


class PowerLever:
    """The actuator on its own daemon thread, fed from the event loop on every assessment."""

    def __init__(self, actuator: PowerActuator) -> None:
        self.actuator = actuator
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="meltguard-power", daemon=True)
        self._thread.start()
        self._last: tuple[object, ...] | None = None
        self._closed = False
        atexit.register(self._at_exit)

    def follow(self, state: PressureState | None, policy: Policy) -> None:
        """Hand the levels to the actuator when they (or the policy's lever) changed."""
        levels = gpu_levels(state)
        key = (tuple(sorted(levels.items())), policy.mode, tuple(sorted(policy.power.items())))
        if key == self._last or self._closed:
            return
        self._last = key
        self._jobs.put(lambda: self.actuator.follow(levels, policy))

    async def close(self, deadline: float = 5.0) -> None:
        """Restore the defaults (waiting up to `deadline` seconds for the driver) and stop the
        thread."""
        if self._closed:
            return
        self._closed = True
        done = threading.Event()

        def restore() -> None:
            try:
                self.actuator.shutdown()
            finally:
                done.set()

        self._jobs.put(restore)
        self._jobs.put(None)
        if not await asyncio.to_thread(done.wait, deadline):
            log.warning("power.restore_timeout", deadline_s=deadline)
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        # The event loop died before close(): restore from here, on this thread.
        self._closed = True
        self._jobs.put(None)
        self.actuator.shutdown()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # the lever must not die with one bad call
                log.exception("power.actuator_failed")


class PowerCollector(Collector):
    """Exports the changes; with no actuator (a telemetry source without a lever) the family is
    still declared, with no series, so dashboards find the name."""

    def __init__(self, actuator: PowerActuator | None) -> None:
        self._actuator = actuator

    def describe(self) -> Iterable[Metric]:
        yield self._family()

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        changes = self._actuator.changes if self._actuator is not None else {}
        for (gpu, result), count in sorted(changes.items()):
            family.add_metric([str(gpu), result], float(count))
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        spec = BY_NAME[PREFIX + "power_limit_changes"]
        return CounterMetricFamily(spec.full_name, spec.help, labels=list(spec.labels))
