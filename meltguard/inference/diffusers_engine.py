"""The real engine: a diffusers pipeline behind the shared batcher.

The pipeline is blocking and its scheduler is stateful, so every call runs on ONE
dedicated worker thread (a single-thread executor): the event loop never blocks, and two
calls never interleave. CUDA with fp16 when present, else CPU with fp32.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import torch

from meltguard.inference.batcher import Batcher, BatchListener
from meltguard.inference.errors import (
    EditUnsupported,
    EngineFailure,
    EngineOutOfMemory,
    ModelNotFound,
)
from meltguard.inference.loading import edit_pipelines, load_pipeline_dir, stage
from meltguard.protocols import Clock
from meltguard.values import EditInput, EngineHealth, GenerationJob, Picture, Size

log = structlog.get_logger("meltguard.inference")

# (device, dtype) -> a pipeline already on that device. The seam tests use to hand in a
# fake; it is called once, on the engine's worker thread, so it may block for minutes.
# The pipeline is called with StableDiffusionPipeline's keyword arguments (prompt,
# negative_prompt, height, width, num_inference_steps, generator, output_type="pil") and
# must return an object whose `.images` is a list of PIL images.
PipelineFactory = Callable[[str, torch.dtype], Any]

WARM_UP_JOB = GenerationJob(prompt="warm-up", size=Size(64, 64), steps=2, n=1, seed=0)
_SEED_MASK = (1 << 64) - 1  # torch seeds are unsigned 64-bit


def pick_device(device: str | None = None) -> tuple[str, torch.dtype]:
    """CUDA with fp16 when available (half the memory, tensor cores), else CPU with fp32
    (CPU fp16 kernels are slow or missing). An explicit device keeps the same dtype rule."""
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if chosen.startswith("cuda") else torch.float32
    return chosen, dtype


def on_device(model: str, pipeline: Any, device: str, dtype: torch.dtype) -> Any:
    with stage(model, "to_device", device=device, dtype=str(dtype).removeprefix("torch.")):
        # Cast only when needed: diffusers warns on every dtype cast through `to()`.
        if getattr(pipeline, "dtype", dtype) != dtype:
            pipeline = pipeline.to(device=device, dtype=dtype)
        else:
            pipeline = pipeline.to(device)
    return pipeline


def tiny_factory(device: str, dtype: torch.dtype) -> Any:
    from meltguard.inference.tiny import TINY_NAME, build_tiny_pipeline

    return on_device(TINY_NAME, build_tiny_pipeline(), device, dtype)


def folder_factory(model: str, path: Path) -> PipelineFactory:
    """Load from a local folder (a Hugging Face id is resolved to its cached snapshot first)."""

    def factory(device: str, dtype: torch.dtype) -> Any:
        return on_device(model, load_pipeline_dir(model, path, dtype=dtype), device, dtype)

    return factory


def _is_out_of_memory(exc: BaseException) -> bool:
    # Older torch and some backends (MPS, cuDNN paths) raise a plain RuntimeError.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


class DiffusersEngine:
    """Implements protocols.Engine over any pipeline the factory builds."""

    def __init__(
        self,
        name: str,
        factory: PipelineFactory,
        *,
        max_batch: int,
        clock: Clock,
        device: str | None = None,
        size_multiple: int = 8,
    ) -> None:
        self._name = name
        self._factory = factory
        self._device, self._dtype = pick_device(device)
        # The VAE downsamples by 8: other sizes are generated at the next multiple and
        # resized, so the caller always gets exactly the size it asked for.
        self._size_multiple = size_multiple
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._batcher = Batcher(self._run_batch, max_batch=max_batch, clock=clock)
        self._pipeline: Any | None = None
        # kind -> the pipeline serving that kind of edit, or why this model cannot.
        self._edits: dict[str, Any] = {}
        self._load_lock: asyncio.Lock | None = None
        self._ready = False
        self._closed = False
        self._detail = "not loaded yet: warm_up() loads the model"

    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return self._device

    async def warm_up(self) -> None:
        """Load the model if needed and run one small generation, so the first client does
        not pay for lazy initialisation (CUDA context, kernel selection, allocator)."""
        await self._ensure_loaded()
        started = time.perf_counter()
        await self.generate(WARM_UP_JOB)
        seconds = round(time.perf_counter() - started, 3)
        log.info("engine.load", model=self._name, stage="warm_up", seconds=seconds)

    async def generate(self, job: GenerationJob) -> list[bytes]:
        await self._ensure_loaded()
        images = await self._batcher.submit(job)
        if not self._ready and not self._closed:
            # A daemon that skipped warm_up() still becomes ready once a generation works.
            self._ready = True
            self._detail = f"ready on {self._device} ({self._dtype_name})"
        return images

    def health(self) -> EngineHealth:
        return EngineHealth(ready=self._ready, detail=self._detail, device=self._device)

    def edit_support(self, kind: str) -> str | None:
        """None when edits of `kind` can run (or the model is not loaded yet, so nobody
        knows); else why not, in words for the client."""
        reason = self._edits.get(kind)
        return reason if isinstance(reason, str) else None

    def busy_seconds(self) -> float:
        return self._batcher.busy_seconds()

    def on_batch(self, listener: BatchListener) -> None:
        self._batcher.add_listener(listener)

    async def close(self) -> None:
        self._closed = True
        self._ready = False
        self._detail = "closed"
        await self._batcher.close()
        # Wait for a batch still on the worker thread before dropping the weights under it.
        await asyncio.to_thread(self._executor.shutdown, True)
        self._pipeline = None
        self._edits = {}
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    @property
    def _dtype_name(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    async def _ensure_loaded(self) -> None:
        if self._pipeline is not None:
            return
        if self._closed:
            raise EngineFailure("engine is closed")
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self._pipeline is not None:
                return
            self._detail = f"loading {self._name} on {self._device} ({self._dtype_name})"
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                pipeline = await loop.run_in_executor(
                    self._executor, self._factory, self._device, self._dtype
                )
                self._edits = await loop.run_in_executor(
                    self._executor, edit_pipelines, self._name, pipeline
                )
                self._pipeline = pipeline
            except ModelNotFound as exc:
                self._detail = str(exc)
                raise
            except Exception as exc:
                self._detail = f"loading {self._name} failed: {exc!r}"
                log.error("engine.load_failed", model=self._name, error=repr(exc))
                if _is_out_of_memory(exc):
                    raise EngineOutOfMemory(
                        f"out of memory loading {self._name} on {self._device}"
                    ) from exc
                raise EngineFailure(f"loading {self._name} failed: {exc}") from exc
            # tqdm bars would write to stderr on every request of a daemon; the setting
            # holds for every later call of this pipeline.
            for each in (self._pipeline, *self._edits.values()):
                configure = getattr(each, "set_progress_bar_config", None)
                if callable(configure):
                    configure(disable=True)
            self._detail = f"loaded on {self._device} ({self._dtype_name}), not warmed up"
            log.info(
                "engine.loaded",
                model=self._name,
                device=self._device,
                dtype=self._dtype_name,
                seconds=round(time.perf_counter() - started, 3),
            )

    async def _run_batch(self, jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate_sync, list(jobs))

    def _generate_sync(self, jobs: list[GenerationJob]) -> list[list[bytes]]:
        """Runs on the worker thread. Every job in `jobs` has the same batch_key()."""
        pipeline = self._pipeline
        if pipeline is None:
            raise EngineFailure("engine is closed")
        size, steps, edit = jobs[0].size, jobs[0].steps, jobs[0].edit
        height = _round_up(size.height, self._size_multiple)
        width = _round_up(size.width, self._size_multiple)
        arguments: dict[str, Any] = {"num_inference_steps": steps}
        if edit is not None:
            pipeline = self._edits.get(edit.kind)
            if pipeline is None or isinstance(pipeline, str):
                raise EditUnsupported(pipeline or f"{self._name} cannot run {edit.kind} edits")
            arguments = {"strength": edit.strength,
                         "num_inference_steps": edit_schedule(steps, edit.strength)}
        prompts: list[str] = []
        negatives: list[str] = []
        starts: list[Any] = []
        masks: list[Any] = []
        generators: list[torch.Generator] = []
        for job in jobs:
            start = _edit_images(job.edit, width, height) if job.edit is not None else None
            for index in range(job.n):
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt or "")
                if start is not None:
                    starts.append(start[0])
                    if start[1] is not None:
                        masks.append(start[1])
                # One CPU generator per image, seeded seed+i: image i of a job is the same
                # pixels whatever else shares the batch, and on any device.
                generators.append(
                    torch.Generator("cpu").manual_seed((job.seed + index) & _SEED_MASK)
                )
        if starts:
            arguments["image"] = starts
        if masks:
            arguments["mask_image"] = masks
        try:
            with torch.inference_mode():
                output = _call(
                    pipeline,
                    prompt=prompts,
                    negative_prompt=negatives,
                    height=height,
                    width=width,
                    generator=generators,
                    output_type="pil",
                    **arguments,
                )
            pngs = [_png(image, size) for image in output.images]
        except Exception as exc:
            images = len(prompts)
            if _is_out_of_memory(exc):
                if self._device.startswith("cuda"):
                    torch.cuda.empty_cache()
                log.warning("engine.out_of_memory", model=self._name, images=images, size=str(size))
                raise EngineOutOfMemory(
                    f"{self._device} ran out of memory generating {images} image(s) of "
                    f"{size} at {steps} steps"
                ) from exc
            raise EngineFailure(f"generation failed: {exc!r}") from exc
        if len(pngs) != len(prompts):
            raise EngineFailure(f"pipeline returned {len(pngs)} images for {len(prompts)} asked")
        results: list[list[bytes]] = []
        offset = 0
        for job in jobs:
            results.append(pngs[offset : offset + job.n])
            offset += job.n
        return results


def edit_schedule(steps: int, strength: float) -> int:
    """The schedule length for an edit: diffusers runs int(length x strength) of its steps,
    so a short, weak edit would run none; it runs at least one."""
    if int(steps * strength) >= 1:
        return steps
    return max(steps, math.ceil(1 / strength))


def _call(pipeline: Any, **arguments: Any) -> Any:
    """Call with the arguments this pipeline's family names: image-to-image pipelines take
    their size from the image, and some families have no negative prompt."""
    accepted = inspect.signature(pipeline.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return pipeline(**arguments)  # diffusers' **kwargs takes (and drops) the rest
    return pipeline(**{key: value for key, value in arguments.items() if key in accepted})


def _edit_images(edit: EditInput, width: int, height: int) -> tuple[Any, Any | None]:
    """The picture (and mask) at the size the pipeline runs at: the output's size."""
    from PIL import Image

    def at_size(picture: Picture, resample: Image.Resampling) -> Any:
        image = Image.frombytes(picture.mode, (picture.width, picture.height), picture.data)
        if image.size != (width, height):
            image = image.resize((width, height), resample)
        return image

    mask = edit.mask
    return (at_size(edit.image, Image.Resampling.LANCZOS),
            at_size(mask, Image.Resampling.NEAREST) if mask is not None else None)


def _png(image: Any, size: Size) -> bytes:
    from PIL import Image

    if image.size != (size.width, size.height):
        image = image.resize((size.width, size.height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
