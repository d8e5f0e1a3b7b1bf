"""Finding and loading diffusers pipelines without ever touching the network.

torch, diffusers and transformers are imported inside the functions that need them, so
`select` can resolve a model name (and the simulator can run) without paying for them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from meltguard.inference.errors import ModelNotFound

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("meltguard.inference")

# Component-wise loading only works for the layout StableDiffusionPipeline saves; other
# pipeline classes load in one step (one log line instead of one per stage).
_SD_COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@contextlib.contextmanager
def stage(model: str, name: str, **fields: Any) -> Iterator[None]:
    """One `engine.load` line per stage with its duration: loading a real model takes
    minutes, and an operator watching the log should see which part is slow or stuck."""
    started = time.perf_counter()
    yield
    log.info(
        "engine.load",
        model=model,
        stage=name,
        seconds=round(time.perf_counter() - started, 3),
        **fields,
    )


def untyped_diffusers() -> Any:
    """diffusers, typed as Any: its constructors are wrapped by `register_to_config`, which
    strips their annotations, so every call would be an untyped call to mypy."""
    import diffusers

    return diffusers


def resolve_model_dir(model: str, *, cache_dir: Path | None = None) -> Path:
    """A local diffusers folder, or the cached snapshot of a Hugging Face id.

    Raises ModelNotFound naming the model; never downloads (`local_files_only=True`).
    `cache_dir` overrides the Hugging Face cache (HF_HUB_CACHE) for this lookup.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(
                model, f"{path} exists but is not a diffusers pipeline folder (no model_index.json)"
            )
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot = Path(snapshot_download(model, local_files_only=True, cache_dir=cache_dir))
    except HFValidationError as exc:
        raise ModelNotFound(
            model, f"it is neither an existing local path nor a valid Hugging Face id ({exc})"
        ) from exc
    except OSError as exc:  # LocalEntryNotFoundError, or an unreadable cache
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = cache_dir or HF_HUB_CACHE
        raise ModelNotFound(
            model,
            f"it is not a local path and not in the local Hugging Face cache ({cache}), and "
            f"nothing can be downloaded; fetch it on a machine with access "
            f"(`hf download {model}`) and copy the cache or the folder here",
        ) from exc
    if not (snapshot / "model_index.json").is_file():
        raise ModelNotFound(
            model, f"the cached snapshot {snapshot} has no model_index.json (not a pipeline)"
        )
    return snapshot


def load_pipeline_dir(model: str, path: Path, *, dtype: torch.dtype) -> Any:
    """Load a pipeline from a local folder, stage by stage when it has the SD layout."""
    import json

    diffusers = untyped_diffusers()
    index = json.loads((path / "model_index.json").read_text())
    if index.get("_class_name") != "StableDiffusionPipeline" or not all(
        (path / part).is_dir() for part in _SD_COMPONENTS
    ):
        # A component saved as [null, null] was left out on purpose (SD3 without its T5
        # encoder); diffusers loads such a folder only when told so by name.
        absent = {name: None for name, entry in index.items()
                  if isinstance(entry, list) and entry == [None, None]}
        with stage(model, "pipeline", kind=str(index.get("_class_name"))):
            return diffusers.DiffusionPipeline.from_pretrained(
                path, torch_dtype=dtype, local_files_only=True, **absent
            )

    from transformers import CLIPTextModel, CLIPTokenizer

    # `torch_dtype` rather than transformers 5's `dtype`: both major versions accept it.
    pretrained: dict[str, Any] = {"local_files_only": True}
    with stage(model, "tokenizer"):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **pretrained)
    with stage(model, "text_encoder"):
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", torch_dtype=dtype, **pretrained
        )
    with stage(model, "unet"):
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, **pretrained
        )
    with stage(model, "vae"):
        vae = diffusers.AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, **pretrained
        )
    with stage(model, "scheduler"):
        scheduler_class = _scheduler_class(diffusers, index)
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **pretrained)
    return text_to_image_pipeline(diffusers, vae, text_encoder, tokenizer, unet, scheduler)


def text_to_image_pipeline(
    diffusers: Any, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any
) -> Any:
    """A StableDiffusionPipeline from its parts. meltguard is an admission gate, not a content
    filter: the safety checker would need a second CLIP model in memory and is left to the
    deployment to put in front."""
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _scheduler_class(diffusers: Any, index: dict[str, Any]) -> Any:
    entry = index.get("scheduler")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else "PNDMScheduler"
    return getattr(diffusers, str(name), diffusers.PNDMScheduler)


def edit_pipelines(model: str, pipeline: Any) -> dict[str, Any]:
    """The image-to-image and inpainting pipelines of `pipeline`'s family, built from the SAME
    components (diffusers' `from_pipe`: no weights load or copy). A family diffusers has no
    such pipeline for maps to a string saying so, which the daemon shows the client."""
    diffusers = untyped_diffusers()
    family = type(pipeline).__name__
    built: dict[str, Any] = {}
    for kind, auto in (("image_to_image", diffusers.AutoPipelineForImage2Image),
                       ("inpaint", diffusers.AutoPipelineForInpainting)):
        with stage(model, kind):
            try:
                built[kind] = auto.from_pipe(pipeline)
            # Edits are optional: whatever from_pipe fails with, generations still serve.
            except Exception as exc:
                log.info("engine.edit_unsupported", model=model, kind=kind, family=family,
                         error=str(exc))
                built[kind] = (f"model {model!r} is a {family}, a family diffusers has no "
                               f"{kind.replace('_', '-')} pipeline for")
    return built
