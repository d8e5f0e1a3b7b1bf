"""The small Protocols every layer is written against; stdlib only. (The admission strategy
the daemon drives is admission/strategy.py: it speaks in admission's own types.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from meltguard.values import EngineHealth, GenerationJob, GpuSample, QuotaOutcome, QuotaWindow


class Clock(Protocol):
    """Time is an argument: only edges hold a Clock; tests pass a fake one."""

    def monotonic(self) -> float:
        """Seconds for durations and deadlines; never goes back."""
        ...

    def wall(self) -> float:
        """Unix seconds, for quota windows and dates a person reads."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time (a fake clock waits for its advance)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What sits behind the admission gate, reached only through a permit (TGI's Backend,
    reduced to what the daemon needs)."""

    @property
    def name(self) -> str:
        """The model name clients send as `model` and /v1/models lists."""
        ...

    async def warm_up(self) -> None:
        """Load the weights and run once; `health().ready` is true afterwards."""
        ...

    async def generate(self, job: GenerationJob) -> list[bytes]:
        """Return job.n PNG images. Raises inference.errors.EngineOutOfMemory / EngineFailure."""
        ...

    def health(self) -> EngineHealth:
        """Whether it can generate now, for /readyz."""
        ...

    def edit_support(self, kind: str) -> str | None:
        """None when this engine runs edits of `kind` (values.EDIT_KINDS), else why not, in
        words for the client; asked before admission so a refusal costs no quota."""
        ...

    def busy_seconds(self) -> float:
        """Cumulative seconds the accelerator has spent generating (drives the simulated GPU)."""
        ...

    async def close(self) -> None:
        """Release the pipeline and its worker; no generate() after this."""
        ...


@runtime_checkable
class BatchObservable(Protocol):
    """An engine that tells who shared each batch and when it ran (energy attribution)."""

    def on_batch(
        self, listener: Callable[[Sequence[GenerationJob], float, float], None]
    ) -> None:
        """Call `listener(jobs, started, ended)` after every batch, on the engine's Clock,
        before the batch's results are handed back."""
        ...


class TelemetrySource(Protocol):
    """Blocking reads, called off the event loop by the sampler."""

    @property
    def kind(self) -> str:
        """`nvml`, `simulated` or `replay`: the `source` label of telemetry_source_info."""
        ...

    def read(self) -> Sequence[GpuSample]:
        """One sample per watched GPU, read now (blocking)."""
        ...

    def close(self) -> None:
        """Release the library or file behind it."""
        ...


class QuotaStore(Protocol):
    """Atomic per call across all given windows: either every window is charged or none is.

    `now` is unix seconds from the caller's clock; a store with an authoritative clock of its
    own (Redis `TIME`) uses that instead and reports it as `QuotaOutcome.charged_at`.

    `charge_id` names one charge so that a charge and its refund can each be retried: a
    consume repeated with the same id charges once, a refund repeated with the same id gives
    back once, and a refund that reaches the store before (or instead of) its consume voids
    the id, so the late consume charges nothing. The gate always passes one; calls without an
    id are plain counting (dev harnesses).
    """

    @property
    def name(self) -> str:
        """`memory`, `sqlite` or `redis`: the `store` label of quota_store_errors_total."""
        ...

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        """Charge `cost` to every window, or to none when one lacks room."""
        ...

    async def refund(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        charged_at: float,
        *,
        charge_id: str | None = None,
    ) -> None:
        """Give back `cost` to the windows that were current at `charged_at` (never below 0)."""
        ...

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        """The windows' usage now, charging nothing."""
        ...

    async def close(self) -> None:
        """Close connections or files; called once, after the gate's refunds are drained."""
        ...


@runtime_checkable
class PowerLimits(Protocol):
    """A card's power limit as a lever (NVML on a real GPU). Blocking calls: the power actuator
    makes them on its own thread, never on the event loop."""

    def default_power_limit_w(self, gpu: int) -> float | None:
        """The limit the card boots with; None where it cannot be read."""
        ...

    def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
        """The lowest and highest limit the card accepts; None where it cannot be read."""
        ...

    def set_power_limit_w(self, gpu: int, watts: float) -> str:
        """`success`, or why the card refused (`nvml_no_permission`, `nvml_not_supported`, ...)."""
        ...
