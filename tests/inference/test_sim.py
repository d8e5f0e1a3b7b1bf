from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from meltguard.clock import FakeClock
from meltguard.inference.sim import SimEngine, SimEngineParams, sim_png
from meltguard.protocols import Engine
from meltguard.values import GenerationJob, Size

from .pngs import decode, pixels

SMALL = Size(64, 64)


def job(
    *, size: Size = SMALL, steps: int = 2, n: int = 1, seed: int = 7, prompt: str = "a cat"
) -> GenerationJob:
    return GenerationJob(prompt=prompt, size=size, steps=steps, n=n, seed=seed)


async def elapsed(engine: SimEngine, clock: FakeClock, work: GenerationJob) -> float:
    started = clock.monotonic()
    await engine.generate(work)
    return clock.monotonic() - started


def test_sim_engine_is_an_engine() -> None:
    assert isinstance(SimEngine(clock=FakeClock()), Engine)


@pytest.mark.parametrize(
    ("small", "large"),
    [
        (job(size=Size(64, 64)), job(size=Size(512, 512))),
        (job(size=Size(512, 256)), job(size=Size(512, 512))),
        (job(steps=10), job(steps=30)),
        (job(n=1), job(n=4)),
    ],
)
async def test_latency_grows_with_pixels_steps_and_images(
    small: GenerationJob, large: GenerationJob
) -> None:
    clock = FakeClock()
    engine = SimEngine(clock=clock)

    assert engine.service_time(small) < engine.service_time(large)
    assert await elapsed(engine, clock, small) < await elapsed(engine, clock, large)
    await engine.close()


async def test_time_follows_the_documented_model() -> None:
    params = SimEngineParams(base_s=0.1, per_megapixel_step_s=0.5, batch_exponent=1.0)
    clock = FakeClock()
    engine = SimEngine(clock=clock, params=params)
    work = job(size=Size(1000, 1000), steps=2, n=3)

    assert engine.service_time(work) == pytest.approx(0.1 + 0.5 * 1.0 * 2 * 3)
    assert await elapsed(engine, clock, work) == pytest.approx(3.1)
    await engine.close()


async def test_batched_images_cost_less_than_separate_calls() -> None:
    params = SimEngineParams()
    size = Size(512, 512)
    assert params.batch_seconds(size, 30, 4) < 4 * params.batch_seconds(size, 30, 1)
    assert params.batch_seconds(size, 30, 4) > params.batch_seconds(size, 30, 3)


async def test_slowdown_stretches_and_speed_compresses_time() -> None:
    clock = FakeClock()
    factor = 1.0
    engine = SimEngine(clock=clock, slowdown=lambda: factor)
    nominal = await elapsed(engine, clock, job())

    factor = 2.5
    assert await elapsed(engine, clock, job()) == pytest.approx(2.5 * nominal)
    factor = 0.3  # a multiplier below 1 would be a GPU faster than its own spec
    assert await elapsed(engine, clock, job()) == pytest.approx(nominal)

    fast = SimEngine(clock=clock, speed=10.0)
    assert await elapsed(fast, clock, job()) == pytest.approx(nominal / 10)
    await engine.close()
    await fast.close()


async def test_busy_seconds_accumulate_on_the_clock() -> None:
    clock = FakeClock()
    engine = SimEngine(clock=clock, speed=2.0)
    total = await elapsed(engine, clock, job()) + await elapsed(engine, clock, job(n=3))
    assert engine.busy_seconds() == pytest.approx(total)
    await engine.close()


async def test_concurrent_jobs_batch_on_one_device() -> None:
    clock = FakeClock()
    engine = SimEngine(clock=clock, max_batch=4)
    started = clock.monotonic()
    results = await asyncio.gather(*(engine.generate(job(seed=s)) for s in range(4)))

    assert [len(r) for r in results] == [1, 1, 1, 1]
    # one batch of four, not four calls one after another
    batch = engine.params.batch_seconds(Size(64, 64), 2, 4)
    assert clock.monotonic() - started == pytest.approx(batch)
    await engine.close()


@pytest.mark.parametrize("size", [Size(64, 64), Size(512, 256), Size(1, 1), Size(3, 200)])
async def test_images_are_valid_pngs_of_the_requested_size(size: Size) -> None:
    engine = SimEngine(clock=FakeClock())
    images = await engine.generate(job(size=size, n=2))

    assert len(images) == 2
    for png in images:
        image = decode(png)
        assert image.format == "PNG"
        assert image.size == (size.width, size.height)
        assert image.mode == "RGB"
    await engine.close()


async def test_images_are_deterministic_per_prompt_and_seed() -> None:
    engine = SimEngine(clock=FakeClock())
    first = await engine.generate(job(seed=3, n=2))
    again = await engine.generate(job(seed=3, n=2))
    shifted = await engine.generate(job(seed=4))
    other_prompt = await engine.generate(job(seed=3, prompt="a dog"))

    assert first == again
    assert first[0] != first[1]
    assert first[1] == shifted[0]  # image i of a job is seeded seed+i
    assert (pixels(first[0]) != pixels(other_prompt[0])).any()
    assert sim_png(Size(32, 32), "x", 1) == sim_png(Size(32, 32), "x", 1)
    await engine.close()


async def test_health_and_close() -> None:
    engine = SimEngine(clock=FakeClock(), speed=5)
    await engine.warm_up()
    health = engine.health()
    assert health.ready
    assert health.device == "sim"
    await engine.close()
    assert not engine.health().ready


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": -1.0},
        {"per_megapixel_step_s": 0.0},
        {"batch_exponent": 0.0},
        {"batch_exponent": 1.5},
    ],
)
def test_params_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SimEngineParams(**kwargs)


def test_speed_must_be_positive() -> None:
    with pytest.raises(ValueError, match="speed"):
        SimEngine(clock=FakeClock(), speed=0)


def test_sim_never_imports_torch_or_diffusers() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        from meltguard.clock import FakeClock
        from meltguard.inference.select import build_engine
        from meltguard.values import GenerationJob, Size

        async def main():
            engine = build_engine("sim", max_batch=4, clock=FakeClock(), sim_speed=3.0)
            await engine.warm_up()
            await engine.generate(GenerationJob("a cat", Size(64, 64), 2, 2, 1))
            engine.health(); engine.busy_seconds()
            await engine.close()

        asyncio.run(main())
        heavy = sorted(
            m for m in ("torch", "diffusers", "transformers", "huggingface_hub", "numpy")
            if m in sys.modules
        )
        print("heavy:", heavy)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout
