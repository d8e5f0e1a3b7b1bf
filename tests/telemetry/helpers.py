"""Scripted sources and small helpers shared by the telemetry tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from meltguard.values import GpuSample


def gpu(index: int = 0, **fields: object) -> GpuSample:
    base: dict[str, object] = {
        "uuid": f"GPU-{index:08d}",
        "name": "NVIDIA H100 80GB HBM3",
        "taken_at": 0.0,
        "temperature_c": 60.0,
        "slowdown_c": 87.0,
    }
    base.update(fields)
    return GpuSample(index=index, **base)  # type: ignore[arg-type]


Step = Sequence[GpuSample] | BaseException | Callable[[], Sequence[GpuSample]]


class ScriptedSource:
    """Plays a list of results (samples, an exception to raise, or a callable); repeats the last."""

    def __init__(self, steps: list[Step], kind: str = "scripted") -> None:
        self.steps = steps
        self.reads = 0
        self.closed = False
        self.threads: set[str] = set()
        self._kind = kind

    @property
    def kind(self) -> str:
        return self._kind

    def read(self) -> Sequence[GpuSample]:
        self.threads.add(threading.current_thread().name)
        step = self.steps[min(self.reads, len(self.steps) - 1)]
        self.reads += 1
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step()
        return step

    def close(self) -> None:
        self.closed = True
