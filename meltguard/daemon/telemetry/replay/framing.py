"""Groups per-GPU rows into frames and makes their times offsets from the first row."""

from __future__ import annotations

from meltguard.daemon.telemetry.replay.errors import ReplayFormatError, refuse
from meltguard.daemon.telemetry.replay.trace import ReplayFrame
from meltguard.values import GpuSample

SAME_PASS_S = 0.1  # rows of one nvidia-smi query pass are stamped milliseconds apart


class FrameBuilder:
    def __init__(self, origin: str) -> None:
        self._origin = origin
        self._frames: list[tuple[float, list[GpuSample]]] = []
        self._first: float | None = None
        self._last: tuple[float, int] | None = None  # (time, index) of the latest row
        self._by_uuid: dict[str, int] = {}
        self._started: str | None = None

    def guess_index(self, at: float, uuid: str) -> int:
        """Index for a row whose index cell reads `[GPU is lost]`: the index its UUID had earlier,
        else the one after the previous row of the same query pass (nvidia-smi prints GPUs in
        index order, milliseconds apart), else 0."""
        if uuid in self._by_uuid:
            return self._by_uuid[uuid]
        if self._last is not None and at - self._last[0] < SAME_PASS_S:
            return self._last[1] + 1
        return 0

    def add(self, at: float, sample: GpuSample, line: int, *, group_by_time: bool = False,
            stamp: str | None = None) -> None:
        """`stamp`: the row's time as written, kept for the first row to say when the trace
        starts."""
        if self._first is None:
            self._first = at
            self._started = stamp
        self._last = (at, sample.index)
        if sample.uuid:
            self._by_uuid.setdefault(sample.uuid, sample.index)
        offset = at - self._first
        current = self._frames[-1] if self._frames else None
        if current is not None and offset < current[0]:
            raise refuse(self._origin, line,
                         f"time goes backwards ({offset:.3f} s into the trace, after "
                         f"{current[0]:.3f} s)")
        # Most tools stamp each GPU's row separately, so a frame ends when an index repeats.
        starts_new = (
            current is None
            or (group_by_time and offset != current[0])
            or any(s.index == sample.index for s in current[1])
        )
        if starts_new:
            if current is not None and group_by_time and offset == current[0]:
                raise refuse(self._origin, line,
                             f"GPU {sample.index} appears twice at one time ({offset:g} s)")
            self._frames.append((offset, [sample]))
        else:
            assert current is not None
            current[1].append(sample)

    @property
    def started(self) -> str | None:
        """The first row's time as the file wrote it (see `stamp`), or None."""
        return self._started

    def frames(self) -> tuple[ReplayFrame, ...]:
        if not self._frames:
            raise ReplayFormatError(f"{self._origin}:0: trace holds no samples")
        return tuple(
            ReplayFrame(offset, tuple(sorted(samples, key=lambda s: s.index)))
            for offset, samples in self._frames
        )
