"""Helpers over GpuSample shared by every source: throttle-bitmask decoding and the marker for a
GPU whose throttle reasons could not be read."""

from __future__ import annotations

from dataclasses import dataclass

from meltguard.values import THROTTLE_REASONS, GpuSample

# NVML's nvmlClocksEventReason* bits (nvml.h), in THROTTLE_REASONS order. These are ABI constants of
# the driver, so the replay source can decode an nvidia-smi bitmask without importing pynvml.
THROTTLE_BITS: tuple[tuple[int, str], ...] = tuple(
    (1 << bit, name) for bit, name in enumerate(THROTTLE_REASONS)
)


def decode_throttle(mask: int) -> frozenset[str]:
    """Names of the known reasons set in an NVML clocks-event bitmask; unknown bits (board_limit,
    reliability on newer drivers) are dropped because no policy can name them."""
    return frozenset(name for bit, name in THROTTLE_BITS if mask & bit)


def encode_throttle(reasons: frozenset[str] | set[str]) -> int:
    """Inverse of decode_throttle, for fakes and traces."""
    by_name = {name: bit for bit, name in THROTTLE_BITS}
    mask = 0
    for reason in reasons:
        mask |= by_name[reason]
    return mask


@dataclass(frozen=True, slots=True)
class ThrottleUnknownSample(GpuSample):
    """A GpuSample whose throttle bitmask could not be read (NOT_SUPPORTED, or a trace without the
    column). `throttle` is then empty by necessity, not because nothing throttles, so the collector
    exports no throttle series for it rather than a row of misleading zeros."""


def throttle_known(sample: GpuSample) -> bool:
    return not sample.lost and not isinstance(sample, ThrottleUnknownSample)
