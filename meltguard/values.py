"""Frozen values shared by every layer; stdlib only so admission/ and inference/ may import it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")


@dataclass(frozen=True, slots=True, order=True)
class Size:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """Parse "WxH"; raises ValueError with a message a person understands."""
        match = _SIZE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def fits_in(self, limit: Size) -> bool:
        return self.width <= limit.width and self.height <= limit.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One request's work as the engine sees it, after admission (possibly degraded)."""

    prompt: str
    size: Size
    steps: int
    n: int
    seed: int
    negative_prompt: str | None = None
    edit: EditInput | None = None  # set for /v1/images/edits: the picture to start from

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call: an edit shares one only with
        edits of the same kind and strength (a pipeline call takes one of each)."""
        edit = self.edit
        if edit is None:
            return (self.size.width, self.size.height, self.steps)
        return (self.size.width, self.size.height, self.steps, edit.kind, edit.strength)


@dataclass(frozen=True, slots=True)
class Picture:
    """A decoded upload: 8-bit pixels, row-major, in PIL's `mode` ("RGB", or "L" for a mask)."""

    width: int
    height: int
    mode: str
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        channels = {"RGB": 3, "L": 1}.get(self.mode)
        if channels is None:
            raise ValueError(f"Picture mode must be RGB or L, got {self.mode!r}")
        expected = self.width * self.height * channels
        if self.width < 1 or self.height < 1 or len(self.data) != expected:
            raise ValueError(f"{len(self.data)} bytes are not a {self.width}x{self.height} "
                             f"{self.mode} picture")


EDIT_KINDS = ("image_to_image", "inpaint")


@dataclass(frozen=True, slots=True)
class EditInput:
    """What an edit starts from. `mask` is white (255) where the picture may change, as
    diffusers' inpainting pipelines take it; `strength` (0, 1] is how far from the picture the
    result may move."""

    image: Picture
    mask: Picture | None
    strength: float

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.image.mode != "RGB":
            raise ValueError("the image of an edit must be RGB")
        mask = self.mask
        if mask is not None and (mask.mode != "L" or (mask.width, mask.height)
                                 != (self.image.width, self.image.height)):
            raise ValueError("the mask of an edit must be L and the size of its image")

    @property
    def kind(self) -> str:
        return "image_to_image" if self.mask is None else "inpaint"


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ready: bool
    detail: str
    device: str


# Names follow NVML's clocks-event-reason constants, in the form ops type into a policy file.
THROTTLE_REASONS: tuple[str, ...] = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal",
    "hw_thermal",
    "hw_power_brake",
    "display_clock_setting",
)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU read once. A field the card does not support is None (no series, never zero)."""

    index: int
    uuid: str
    name: str
    taken_at: float  # monotonic seconds on the reader's clock
    temperature_c: float | None = None
    slowdown_c: float | None = None
    shutdown_c: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization: float | None = None  # 0..1
    power_w: float | None = None
    power_limit_w: float | None = None
    throttle: frozenset[str] = field(default_factory=frozenset)
    lost: bool = False
    # The card's own energy counter since the driver loaded (NVML total energy), in joules.
    energy_j: float | None = None

    @property
    def memory_ratio(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes

    @property
    def power_ratio(self) -> float | None:
        if self.power_w is None or not self.power_limit_w:
            return None
        return self.power_w / self.power_limit_w


@dataclass(frozen=True, slots=True)
class QuotaWindow:
    """One quota window of one tenant. Windows are fixed and aligned to the Unix epoch, so a
    `1d` window is the calendar day in UTC: exact counts, and a reset time a person can read."""

    key: str  # e.g. "{mg:alice}:86400"; the hash tag keeps a tenant's windows on one cluster slot
    limit: float  # in reference images, already multiplied by the current quota_factor
    period: float  # seconds

    def window_id(self, now: float) -> int:
        return int(now // self.period)

    def reset_at(self, now: float) -> float:
        return (self.window_id(now) + 1) * self.period


@dataclass(frozen=True, slots=True)
class WindowState:
    window: QuotaWindow
    used: float
    reset_at: float  # unix seconds

    @property
    def remaining(self) -> float:
        return max(self.window.limit - self.used, 0.0)


@dataclass(frozen=True, slots=True)
class QuotaOutcome:
    """Result of one atomic consume or peek over all windows of a tenant."""

    allowed: bool
    windows: tuple[WindowState, ...]
    exhausted: WindowState | None = None  # the window that refused, when not allowed
    charged_at: float = 0.0  # the store's clock at the charge; refunds go to that window
