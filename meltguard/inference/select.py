"""`--model` to an Engine. torch and diffusers are imported only for the real engines, so
`--model sim` starts without them (and works where they are not installed)."""

from __future__ import annotations

from collections.abc import Callable

from meltguard.inference.sim import SIM_NAME, SimEngine
from meltguard.inference.tiny import TINY_NAME
from meltguard.protocols import Clock, Engine


def build_engine(
    model: str,
    *,
    max_batch: int,
    clock: Clock,
    sim_speed: float = 1.0,
    sim_slowdown: Callable[[], float] | None = None,
    device: str | None = None,
) -> Engine:
    """`tiny` | `sim` | an existing local diffusers folder | a Hugging Face id (cache only).

    Cheap: no weights load here (warm_up() does that), but a folder or id that cannot be
    found raises inference.errors.ModelNotFound now, before torch is even imported, so
    `serve` fails at startup with the reason rather than on the first request.
    """
    if model == SIM_NAME:
        return SimEngine(clock=clock, max_batch=max_batch, speed=sim_speed, slowdown=sim_slowdown)
    if model == TINY_NAME:
        from meltguard.inference.diffusers_engine import DiffusersEngine, tiny_factory

        return DiffusersEngine(
            TINY_NAME, tiny_factory, max_batch=max_batch, clock=clock, device=device
        )
    from meltguard.inference.loading import resolve_model_dir

    path = resolve_model_dir(model)
    from meltguard.inference.diffusers_engine import DiffusersEngine, folder_factory

    return DiffusersEngine(
        model, folder_factory(model, path), max_batch=max_batch, clock=clock, device=device
    )
