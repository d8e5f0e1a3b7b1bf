"""What a request asks for, whether it may ask that, how to shrink it, and what it costs.

Cost is counted in reference images (`policy.cost.reference`, 512x512 at 30 steps by
default): work grows with pixels and with denoising steps, so a 1024x1024 image at 30 steps
costs 4 and a 512x512 one at 15 steps costs 0.5. Quotas, queue estimates and refunds all use
this one number.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from meltguard.admission.policy import EffectiveTier, Policy
from meltguard.errors import invalid
from meltguard.values import GenerationJob, Size

SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; signed keeps every client happy
DEFAULT_SEED_BITS = 32  # drawn seeds stay short enough to read back and retype
DEFAULT_SEED_MAX = 2**DEFAULT_SEED_BITS - 1


@dataclass(frozen=True, slots=True)
class ImageAsk:
    """A request as the client sent it, already parsed from JSON but not yet checked."""

    prompt: str
    size: Size | None = None
    steps: int | None = None
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None


def validate(ask: ImageAsk, policy: Policy, *, default_seed: int | None = None) -> GenerationJob:
    """Check `ask` against `policy.limits` and fill defaults; raises INVALID_REQUEST naming the
    offending parameter. `default_seed` is used when the client sent none (the gate passes one
    from its injected rng so runs are reproducible in tests).

    Integers are checked as `type(x) is int`: JSON true/false parse to bool, an int subclass,
    and a client sending n=true erred."""
    limits = policy.limits
    prompt = ask.prompt
    if not isinstance(prompt, str) or not prompt or prompt.isspace():
        raise invalid("prompt", "prompt is required and must be a non-empty string.")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid(
            "prompt",
            f"prompt is {len(prompt)} characters long; the maximum is {limits.max_prompt_chars}.",
        )
    negative = ask.negative_prompt
    if negative is not None and (
        not isinstance(negative, str) or len(negative) > limits.max_prompt_chars
    ):
        raise invalid(
            "negative_prompt",
            f"negative_prompt must be a string of at most {limits.max_prompt_chars} characters.",
        )

    n = ask.n
    if type(n) is not int or not 1 <= n <= limits.max_n:
        raise invalid("n", f"n must be an integer from 1 to {limits.max_n}, got {n!r}.")

    size = ask.size if ask.size is not None else limits.default_size
    if not isinstance(size, Size):
        raise invalid("size", f"size must look like 512x512 (WIDTHxHEIGHT), got {size!r}.")
    if size.width % 8 or size.height % 8:
        raise invalid(
            "size", f"width and height must be multiples of 8, got {size} (try {_round8(size)})."
        )
    max_size = limits.max_size
    if size.width > max_size.width or size.height > max_size.height:
        raise invalid("size", f"size {size} is larger than the maximum {max_size}.")

    steps = ask.steps if ask.steps is not None else limits.default_steps
    if type(steps) is not int or not 1 <= steps <= limits.max_steps:
        raise invalid(
            "steps", f"steps must be an integer from 1 to {limits.max_steps}, got {steps!r}."
        )

    seed = ask.seed
    if seed is None:
        seed = default_seed if default_seed is not None else random.randint(0, DEFAULT_SEED_MAX)
    elif type(seed) is not int or not 0 <= seed <= SEED_MAX:
        raise invalid("seed", f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}.")

    return GenerationJob(prompt=prompt, size=size, steps=steps, n=n, seed=seed,
                         negative_prompt=negative)


def _round8(size: Size) -> Size:
    return Size(max(8, size.width // 8 * 8), max(8, size.height // 8 * 8))


def fit_size(size: Size, limit: Size) -> Size:
    """The largest size within `limit` with (nearly) the aspect of `size`, in multiples of 8."""
    if size.fits_in(limit):
        return size
    scale = min(limit.width / size.width, limit.height / size.height)
    # Flooring to multiples of 8 keeps the result inside the limit.
    width = max(8, math.floor(size.width * scale / 8) * 8)
    height = max(8, math.floor(size.height * scale / 8) * 8)
    return Size(min(width, limit.width), min(height, limit.height))


def degrade(job: GenerationJob, eff: EffectiveTier) -> tuple[GenerationJob, tuple[str, ...]]:
    """Shrink `job` to what `eff` allows. The second value names each change as
    `field:old->new` (for the log line and the `x-meltguard-degraded` header)."""
    steps, size, n = job.steps, job.size, job.n
    changes: list[str] = []
    if steps > eff.max_steps:
        changes.append(f"steps:{steps}->{eff.max_steps}")
        steps = eff.max_steps
    fitted = fit_size(size, eff.max_size)
    if fitted != size:
        changes.append(f"size:{size}->{fitted}")
        size = fitted
    if n > eff.max_n:
        changes.append(f"n:{n}->{eff.max_n}")
        n = eff.max_n
    if not changes:
        return job, ()
    return dataclasses.replace(job, steps=steps, size=size, n=n), tuple(changes)


def cost_of(job: GenerationJob, policy: Policy) -> float:
    """Work in reference images: n x pixels/ref_pixels x steps/ref_steps."""
    reference = policy.cost.reference
    return job.n * (job.size.pixels / reference.size.pixels) * (job.steps / reference.steps)
