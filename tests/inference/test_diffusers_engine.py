from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from PIL import Image

from meltguard.clock import SystemClock
from meltguard.inference.diffusers_engine import DiffusersEngine, folder_factory, tiny_factory
from meltguard.inference.errors import EngineFailure, EngineOutOfMemory, ModelNotFound
from meltguard.inference.loading import resolve_model_dir
from meltguard.inference.select import build_engine
from meltguard.inference.sim import SimEngine
from meltguard.protocols import Engine
from meltguard.values import GenerationJob, Size

from .pngs import decode, pixels

SMALL = Size(64, 64)


def job(seed: int, *, n: int = 1, prompt: str = "a red cat", size: Size = SMALL) -> GenerationJob:
    return GenerationJob(prompt=prompt, size=size, steps=2, n=n, seed=seed)


def assert_same_picture(a: bytes, b: bytes) -> None:
    """Equal up to float rounding in batch-size-dependent kernels: oneDNN (and cuDNN)
    convolutions accumulate in a different order for another batch size, which moves a
    few channel values across a rounding boundary by one level out of 255."""
    left, right = pixels(a), pixels(b)
    assert left.shape == right.shape
    assert np.abs(left - right).max() <= 1
    assert (left != right).mean() < 0.01


async def test_tiny_engine_is_an_engine(tiny_engine: DiffusersEngine) -> None:
    assert isinstance(tiny_engine, Engine)
    assert tiny_engine.name == "tiny"


async def test_two_images_of_the_requested_size(tiny_engine: DiffusersEngine) -> None:
    images = await tiny_engine.generate(job(1, n=2))

    assert len(images) == 2
    for png in images:
        image = decode(png)
        assert image.format == "PNG"
        assert image.size == (64, 64)
    assert (pixels(images[0]) != pixels(images[1])).any()


async def test_sizes_off_the_latent_grid_come_back_exact(tiny_engine: DiffusersEngine) -> None:
    [png] = await tiny_engine.generate(job(1, size=Size(72, 36)))
    assert decode(png).size == (72, 36)


async def test_same_seed_same_bytes(tiny_engine: DiffusersEngine) -> None:
    first = await tiny_engine.generate(job(5, n=2))
    again = await tiny_engine.generate(job(5, n=2))
    assert first == again


async def test_different_seed_different_pixels(tiny_engine: DiffusersEngine) -> None:
    [a] = await tiny_engine.generate(job(5))
    [b] = await tiny_engine.generate(job(6))
    assert np.abs(pixels(a) - pixels(b)).mean() > 1.0


async def test_batched_with_others_gives_the_same_pixels(tiny_engine: DiffusersEngine) -> None:
    [alone] = await tiny_engine.generate(job(11))
    results = await asyncio.gather(
        tiny_engine.generate(job(1, prompt="something else")),
        tiny_engine.generate(job(11)),
        tiny_engine.generate(job(2, n=2, prompt="and more")),
    )
    assert_same_picture(alone, results[1][0])
    # image i of a job is seeded seed+i, whatever batch it lands in
    [second] = await tiny_engine.generate(job(3, prompt="and more"))
    assert_same_picture(results[2][1], second)


async def test_warm_up_makes_the_engine_ready(tiny_engine: DiffusersEngine) -> None:
    assert not tiny_engine.health().ready
    await tiny_engine.warm_up()

    health = tiny_engine.health()
    assert health.ready
    assert health.device == "cpu"
    assert "float32" in health.detail
    assert tiny_engine.busy_seconds() > 0
    await tiny_engine.close()
    assert not tiny_engine.health().ready


async def test_a_fresh_build_logs_every_stage_and_has_the_same_weights(
    tiny_engine: DiffusersEngine,
) -> None:
    engine = DiffusersEngine("tiny", tiny_factory, max_batch=2, clock=SystemClock(), device="cpu")
    with structlog.testing.capture_logs() as logs:
        await engine.warm_up()
    fresh = await engine.generate(job(8))
    await engine.close()

    assert fresh == await tiny_engine.generate(job(8))

    stages = [e["stage"] for e in logs if e["event"] == "engine.load"]
    assert stages == [
        "tokenizer",
        "text_encoder",
        "unet",
        "vae",
        "scheduler",
        "to_device",
        "image_to_image",
        "inpaint",
        "warm_up",
    ]
    assert all(e["seconds"] >= 0 for e in logs if e["event"] == "engine.load")
    assert any(e["event"] == "engine.loaded" for e in logs)


class FakePipeline:
    """Stands in for a diffusers pipeline at our factory seam: fails as told, else paints."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)
        size = (kwargs["width"], kwargs["height"])
        return SimpleNamespace(images=[Image.new("RGB", size, "gray") for _ in kwargs["prompt"]])


def fake_engine(pipeline: FakePipeline, max_batch: int = 4) -> DiffusersEngine:
    return DiffusersEngine(
        "fake", lambda _device, _dtype: pipeline, max_batch=max_batch, clock=SystemClock()
    )


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
)
async def test_out_of_memory_becomes_engine_out_of_memory(error: BaseException) -> None:
    pipeline = FakePipeline([error])
    engine = fake_engine(pipeline)

    with pytest.raises(EngineOutOfMemory) as caught:
        await engine.generate(job(1))
    assert caught.value.__cause__ is error
    # OOM is transient: the next batch runs
    [png] = await engine.generate(job(1))
    assert decode(png).size == (64, 64)
    await engine.close()


async def test_out_of_memory_reaches_every_job_in_the_batch() -> None:
    pipeline = FakePipeline([])
    engine = fake_engine(pipeline)
    await engine.warm_up()  # loaded first, so the three jobs queue together
    pipeline.calls.clear()
    pipeline.failures.append(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    results = await asyncio.gather(
        *(engine.generate(job(seed)) for seed in range(3)), return_exceptions=True
    )
    assert len(pipeline.calls) == 1
    assert len(pipeline.calls[0]["prompt"]) == 3
    assert all(isinstance(r, EngineOutOfMemory) for r in results)
    await engine.close()


async def test_other_errors_become_engine_failure() -> None:
    error = ValueError("bad tensor shape")
    engine = fake_engine(FakePipeline([error]))
    with pytest.raises(EngineFailure, match="bad tensor shape") as caught:
        await engine.generate(job(1))
    assert caught.value.__cause__ is error
    await engine.close()


async def test_a_failing_load_is_reported_in_health() -> None:
    def broken(_device: str, _dtype: torch.dtype) -> Any:
        raise OSError("disk on fire")

    engine = DiffusersEngine("broken", broken, max_batch=1, clock=SystemClock())
    with pytest.raises(EngineFailure, match="disk on fire"):
        await engine.warm_up()
    health = engine.health()
    assert not health.ready
    assert "disk on fire" in health.detail
    await engine.close()


async def test_the_pipeline_gets_one_generator_per_image() -> None:
    pipeline = FakePipeline([])
    engine = fake_engine(pipeline)
    await engine.warm_up()
    pipeline.calls.clear()
    await asyncio.gather(engine.generate(job(10, n=2)), engine.generate(job(20)))

    [call] = pipeline.calls
    assert call["prompt"] == ["a red cat"] * 3
    assert call["negative_prompt"] == [""] * 3
    seeds = [g.initial_seed() for g in call["generator"]]
    assert seeds == [10, 11, 20]
    await engine.close()


def test_unknown_hugging_face_id_is_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "meltguard-tests/no-such-model"
    with pytest.raises(ModelNotFound) as caught:
        build_engine(model, max_batch=1, clock=SystemClock())
    message = str(caught.value)
    assert model in message
    assert "not in the local Hugging Face cache" in message
    assert "nothing can be downloaded" in message


def test_a_folder_without_model_index_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no model_index\.json") as caught:
        build_engine(str(tmp_path), max_batch=1, clock=SystemClock())
    assert str(tmp_path) in str(caught.value)


def test_select_picks_the_engine() -> None:
    assert isinstance(build_engine("sim", max_batch=2, clock=SystemClock()), SimEngine)
    tiny = build_engine("tiny", max_batch=2, clock=SystemClock())
    assert isinstance(tiny, DiffusersEngine)
    assert tiny.name == "tiny"
    assert not tiny.health().ready  # nothing loads before warm_up


@pytest.fixture(scope="module")
def saved_tiny(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline.save_pretrained(folder)
    return folder


async def test_a_local_folder_loads_stage_by_stage(saved_tiny: Path, tiny_engine: Any) -> None:
    engine = build_engine(str(saved_tiny), max_batch=2, clock=SystemClock(), device="cpu")
    with structlog.testing.capture_logs() as logs:
        [from_folder] = await engine.generate(job(4))
    await engine.close()

    stages = [e["stage"] for e in logs if e["event"] == "engine.load"]
    assert stages[:4] == ["tokenizer", "text_encoder", "unet", "vae"]
    [built] = await tiny_engine.generate(job(4))
    assert from_folder == built


async def test_a_cached_hugging_face_id_loads_from_the_cache(
    saved_tiny: Path, tmp_path: Path
) -> None:
    # The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/...}
    revision = "0" * 40
    repo = tmp_path / "models--meltguard--tiny"
    shutil.copytree(saved_tiny, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    path = resolve_model_dir("meltguard/tiny", cache_dir=tmp_path)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline"
    )
    engine = DiffusersEngine(
        "meltguard/tiny",
        folder_factory("meltguard/tiny", path),
        max_batch=1,
        clock=SystemClock(),
        device="cpu",
    )
    [png] = await engine.generate(job(4))
    assert decode(png).size == (64, 64)
    await engine.close()
