"""Edits in the engines: image-to-image and inpainting pipelines built from the text-to-image
one's components (one load), batched only with edits of the same shape, deterministic per
seed; the sim engine serves them too; other model families (SDXL- and SD3-style folders built
in code) serve all three kinds or say clearly why not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from meltguard.clock import FakeClock, SystemClock
from meltguard.inference.batcher import Batcher
from meltguard.inference.diffusers_engine import DiffusersEngine, edit_schedule, folder_factory
from meltguard.inference.errors import EditUnsupported
from meltguard.inference.sim import SimEngine
from meltguard.values import EditInput, GenerationJob, Picture, Size

from .families import build_lcm, build_sd3, build_sdxl
from .pngs import decode, pixels
from .test_batcher import Recorder, settle, start_blocker
from .test_diffusers_engine import FakePipeline, assert_same_picture, fake_engine

SMALL = Size(64, 64)


def picture(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)
            ) -> Picture:
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (0, 0, size[0] // 2, size[1]))
    return Picture(size[0], size[1], "RGB", image.tobytes())


def mask(size: tuple[int, int] = (64, 64)) -> Picture:
    image = Image.new("L", size, 0)
    image.paste(255, (0, 0, size[0] // 2, size[1] // 2))
    return Picture(size[0], size[1], "L", image.tobytes())


def edit_job(seed: int, *, n: int = 1, with_mask: bool = False, strength: float = 0.8,
             color: tuple[int, int, int] = (200, 30, 30), size: Size = SMALL,
             prompt: str = "a red cat") -> GenerationJob:
    edit = EditInput(picture(color), mask() if with_mask else None, strength)
    return GenerationJob(prompt=prompt, size=size, steps=2, n=n, seed=seed, edit=edit)


def text_job(seed: int) -> GenerationJob:
    return GenerationJob(prompt="a red cat", size=SMALL, steps=2, n=1, seed=seed)


# -- values and batching ----------------------------------------------------------------------


def test_edits_batch_only_with_edits_of_the_same_kind_and_strength() -> None:
    plain = text_job(1).batch_key()
    assert plain == (64, 64, 2)
    image_to_image = edit_job(1).batch_key()
    assert image_to_image != plain
    assert edit_job(2, color=(1, 2, 3)).batch_key() == image_to_image  # other pictures share
    assert edit_job(1, with_mask=True, strength=0.8).batch_key() != image_to_image
    assert edit_job(1, strength=0.5).batch_key() != image_to_image


def test_an_edit_value_refuses_what_a_pipeline_could_not_take() -> None:
    with pytest.raises(ValueError, match="strength"):
        EditInput(picture(), None, 0.0)
    with pytest.raises(ValueError, match="size of its image"):
        EditInput(picture(), mask((32, 32)), 1.0)
    with pytest.raises(ValueError, match="not a 64x64 RGB picture"):
        Picture(64, 64, "RGB", b"\x00" * 10)


@pytest.mark.parametrize(("steps", "strength", "length"),
                         [(20, 0.8, 20), (2, 0.5, 2), (2, 0.3, 4), (1, 0.01, 100), (3, 1.0, 3)])
def test_an_edit_runs_at_least_one_denoising_step(steps: int, strength: float,
                                                  length: int) -> None:
    assert edit_schedule(steps, strength) == length
    assert int(length * strength) >= 1


async def test_the_batcher_keeps_edits_and_generations_apart() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=8, clock=clock)
    first = await start_blocker(batcher, recorder)
    jobs = [text_job(1), edit_job(2), edit_job(3, with_mask=True), edit_job(4), text_job(5),
            edit_job(6, with_mask=True), edit_job(7, strength=0.5)]
    tasks = [asyncio.create_task(batcher.submit(j)) for j in jobs]
    await settle()
    recorder.release.set()
    await asyncio.gather(first, *tasks)
    assert [[j.seed for j in b] for b in recorder.batches[1:]] == [[1, 5], [2, 4], [3, 6], [7]]
    await batcher.close()


# -- the tiny model ---------------------------------------------------------------------------


@pytest.fixture
async def warm_tiny(tiny_engine: DiffusersEngine) -> AsyncIterator[DiffusersEngine]:
    await tiny_engine.warm_up()
    yield tiny_engine


async def test_the_tiny_model_edits_with_and_without_a_mask(warm_tiny: DiffusersEngine) -> None:
    assert warm_tiny.edit_support("image_to_image") is None
    assert warm_tiny.edit_support("inpaint") is None
    [generated] = await warm_tiny.generate(text_job(3))
    redrawn = await warm_tiny.generate(edit_job(3, n=2))
    inpainted = await warm_tiny.generate(edit_job(3, n=2, with_mask=True))
    for png in (*redrawn, *inpainted):
        assert decode(png).size == (64, 64)
    arrays = [pixels(png) for png in (generated, redrawn[0], redrawn[1], inpainted[0])]
    for index, left in enumerate(arrays):
        for right in arrays[index + 1:]:
            assert np.abs(left - right).mean() > 1.0
    # Same seed, same picture, same pixels.
    assert await warm_tiny.generate(edit_job(3, n=2)) == redrawn
    # The picture is what the edit starts from: another one gives other pixels.
    [other] = await warm_tiny.generate(edit_job(3, color=(10, 200, 10)))
    assert np.abs(pixels(other) - arrays[1]).mean() > 1.0
    # The three pipelines share one stateful scheduler: an edit leaves nothing behind.
    assert await warm_tiny.generate(text_job(3)) == [generated]


async def test_edits_come_back_at_the_admitted_size(warm_tiny: DiffusersEngine) -> None:
    # A degraded edit is smaller than its picture, and off the latent grid too.
    [png] = await warm_tiny.generate(edit_job(1, size=Size(40, 24), with_mask=True))
    assert decode(png).size == (40, 24)


async def test_edits_batched_together_give_the_same_pixels(warm_tiny: DiffusersEngine) -> None:
    [alone] = await warm_tiny.generate(edit_job(11, with_mask=True))
    results = await asyncio.gather(
        warm_tiny.generate(edit_job(1, with_mask=True, color=(5, 5, 5), prompt="other")),
        warm_tiny.generate(edit_job(11, with_mask=True)),
        warm_tiny.generate(text_job(11)),
    )
    assert_same_picture(alone, results[1][0])


async def test_a_family_without_an_inpainting_pipeline_says_so(tmp_path: Path) -> None:
    folder = build_lcm(tmp_path / "lcm")
    engine = DiffusersEngine("lcm", folder_factory("lcm", folder), max_batch=2,
                             clock=SystemClock(), device="cpu")
    try:
        await engine.warm_up()
        assert engine.edit_support("image_to_image") is None
        assert engine.edit_support("inpaint") == (
            "model 'lcm' is a LatentConsistencyModelPipeline, a family diffusers has no "
            "inpaint pipeline for")
        assert [decode(png).size for png in await engine.generate(edit_job(1, n=2))] == [
            (64, 64)] * 2
        with pytest.raises(EditUnsupported, match="LatentConsistencyModelPipeline"):
            await engine.generate(edit_job(1, with_mask=True))
    finally:
        await engine.close()


async def test_a_family_without_edit_pipelines_says_so() -> None:
    engine = fake_engine(FakePipeline([]))
    await engine.warm_up()
    for kind in ("image_to_image", "inpaint"):
        reason = engine.edit_support(kind)
        assert reason is not None
        assert "FakePipeline" in reason and kind.replace("_", "-") in reason
    with pytest.raises(EditUnsupported, match="FakePipeline"):
        await engine.generate(edit_job(1))
    # Generations still run.
    assert len(await engine.generate(text_job(1))) == 1
    await engine.close()


# -- the sim engine ---------------------------------------------------------------------------


async def test_the_sim_engine_serves_edits_from_their_picture() -> None:
    clock = FakeClock()
    engine = SimEngine(clock=clock, speed=1e6)
    assert engine.edit_support("image_to_image") is None
    assert engine.edit_support("inpaint") is None
    assert engine.service_time(edit_job(1)) == engine.service_time(text_job(1))
    [generated] = await engine.generate(text_job(1))
    [edited] = await engine.generate(edit_job(1))
    [other] = await engine.generate(edit_job(1, color=(1, 2, 3)))
    [masked] = await engine.generate(edit_job(1, with_mask=True))
    assert len({generated, edited, other, masked}) == 4
    assert await engine.generate(edit_job(1)) == [edited]
    assert decode(edited).size == (64, 64)
    await engine.close()


# -- other families ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sdxl", "sd3"])
def family_folder(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    builder = {"sdxl": build_sdxl, "sd3": build_sd3}[request.param]
    return request.param, builder(tmp_path_factory.mktemp(request.param))


async def test_other_families_serve_generations_and_both_edits(
    family_folder: tuple[str, Path],
) -> None:
    name, folder = family_folder
    engine = DiffusersEngine(name, folder_factory(name, folder), max_batch=4,
                             clock=SystemClock(), device="cpu")
    try:
        await engine.warm_up()
        assert engine.edit_support("image_to_image") is None
        assert engine.edit_support("inpaint") is None
        outputs: list[Any] = []
        for job in (text_job(2), edit_job(2, n=2), edit_job(2, n=2, with_mask=True)):
            pngs = await engine.generate(job)
            assert [decode(png).size for png in pngs] == [(64, 64)] * job.n
            outputs.append(pixels(pngs[0]))
        assert np.abs(outputs[0] - outputs[1]).mean() > 1.0
        assert np.abs(outputs[1] - outputs[2]).mean() > 1.0
        [again] = await engine.generate(text_job(2))
        assert np.array_equal(pixels(again), outputs[0])
        # One load: the edit pipelines hold the very modules the text-to-image one holds.
        pipelines = [engine._pipeline, *engine._edits.values()]
        denoisers = {id(getattr(p, "unet", None) or p.transformer) for p in pipelines}
        assert len(denoisers) == 1
    finally:
        await engine.close()
