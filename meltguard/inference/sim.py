"""A simulated GPU engine: the daemon's whole admission path without torch.

It must stay importable without torch or diffusers (a test checks sys.modules), so the
overload benchmark and a laptop demo start in a blink and cost no CPU per image beyond a
small PNG. Time goes through the injected Clock, so tests run it on a FakeClock.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meltguard.inference.batcher import Batcher, BatchListener
from meltguard.protocols import Clock
from meltguard.values import EDIT_KINDS, EditInput, EngineHealth, GenerationJob, Size

SIM_NAME = "sim"


@dataclass(frozen=True, slots=True)
class SimEngineParams:
    """Model seconds one batch takes on the simulated GPU at full clocks:

        base_s + per_megapixel_step_s * megapixels * steps * images ** batch_exponent

    `base_s` is the fixed cost of a pipeline call (text encoding, launches) that batching
    shares. `batch_exponent` < 1 makes batched images sublinear, as on a real GPU that is
    not yet saturated; 1 makes batching buy nothing. The defaults are near SD 1.5 on an
    A100: a 512x512 image at 30 steps takes about 1.6 s, a batch of 4 about 5 s.
    """

    base_s: float = 0.05
    per_megapixel_step_s: float = 0.2
    batch_exponent: float = 0.85

    def __post_init__(self) -> None:
        if self.base_s < 0:
            raise ValueError(f"base_s must be >= 0, got {self.base_s}")
        if self.per_megapixel_step_s <= 0:
            raise ValueError(f"per_megapixel_step_s must be > 0, got {self.per_megapixel_step_s}")
        if not 0 < self.batch_exponent <= 1:
            raise ValueError(f"batch_exponent must be in (0, 1], got {self.batch_exponent}")

    def batch_seconds(self, size: Size, steps: int, images: int) -> float:
        per_image = self.per_megapixel_step_s * (size.pixels / 1_000_000) * steps
        return self.base_s + per_image * math.pow(images, self.batch_exponent)


class SimEngine:
    """Implements protocols.Engine. One simulated device: batches run one at a time.

    `speed` compresses time (a batch really sleeps model seconds / speed). `slowdown` is
    read at the start of each batch: the multiplier (clamped to >= 1) the simulated GPU
    reports while thermally throttled, so heat makes generation slower, as it does.
    busy_seconds() is in Clock seconds (after compression), the time base the simulated
    GPU heats on.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        params: SimEngineParams | None = None,
        max_batch: int = 4,
        speed: float = 1.0,
        slowdown: Callable[[], float] | None = None,
        name: str = SIM_NAME,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self._name = name
        self._clock = clock
        self._params = params or SimEngineParams()
        self._speed = speed
        self._slowdown = slowdown or (lambda: 1.0)
        self._batcher = Batcher(self._run_batch, max_batch=max_batch, clock=clock)
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def params(self) -> SimEngineParams:
        return self._params

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def max_batch(self) -> int:
        return self._batcher.max_batch

    def service_time(self, job: GenerationJob) -> float:
        """Model seconds for `job` alone at full clocks; real time is this times the
        current slowdown, divided by speed. The benchmark derives capacity from it."""
        return self._params.batch_seconds(job.size, job.steps, job.n)

    async def warm_up(self) -> None:
        return None

    async def generate(self, job: GenerationJob) -> list[bytes]:
        await self._batcher.submit(job)
        # Encoding is CPU work done after the GPU has finished, so it stays outside the busy
        # time the simulated GPU heats on; inside it, time compression would multiply its
        # few milliseconds into seconds of phantom GPU work (13% more duty at --sim-speed 40).
        text = job.prompt if job.edit is None else f"{job.prompt}\0{edit_digest(job.edit)}"
        return [sim_png(job.size, text, job.seed + index) for index in range(job.n)]

    def edit_support(self, kind: str) -> str | None:
        """Both kinds: an edit costs the simulated GPU what a generation of its size does."""
        return None if kind in EDIT_KINDS else f"unknown kind of edit {kind!r}"

    def health(self) -> EngineHealth:
        if self._closed:
            return EngineHealth(ready=False, detail="closed", device=SIM_NAME)
        return EngineHealth(
            ready=True, detail=f"simulated GPU, time compressed x{self._speed:g}", device=SIM_NAME
        )

    def busy_seconds(self) -> float:
        return self._batcher.busy_seconds()

    def on_batch(self, listener: BatchListener) -> None:
        self._batcher.add_listener(listener)

    async def close(self) -> None:
        self._closed = True
        await self._batcher.close()

    async def _run_batch(self, jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        first = jobs[0]
        images = sum(job.n for job in jobs)
        slowdown = max(float(self._slowdown()), 1.0)
        seconds = self._params.batch_seconds(first.size, first.steps, images) * slowdown
        await self._clock.sleep(seconds / self._speed)
        return [[] for _ in jobs]  # generate() encodes the images, off the GPU's clock


def sim_png(size: Size, prompt: str, seed: int) -> bytes:
    """A valid RGB PNG whose pixels are a function of (prompt, seed) only.

    Each row is the same gradient rotated, so building it costs one slice per row rather
    than Python work per pixel, and zlib shrinks it to a few KiB even at 1024x1024.
    """
    width, height = size.width, size.height
    digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    red, green, blue, shift = digest[0], digest[1], digest[2], 1 + digest[3] % 7
    row = bytearray()
    for x in range(width):
        ramp = x * 256 // width
        row += bytes(((red + ramp) % 256, (green + ramp // 2) % 256, (blue - ramp) % 256))
    raw = bytearray()
    for y in range(height):
        offset = 3 * ((y * shift) % width)
        raw += b"\x00"  # filter type None
        raw += row[offset:]
        raw += row[:offset]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(bytes(raw), 6)),
            _chunk(b"IEND", b""),
        )
    )


def edit_digest(edit: EditInput) -> str:
    """What a simulated edit's pixels depend on besides prompt and seed: its picture, mask
    and strength."""
    digest = hashlib.blake2b(edit.image.data, digest_size=8)
    if edit.mask is not None:
        digest.update(edit.mask.data)
    digest.update(repr(edit.strength).encode())
    return digest.hexdigest()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
