"""What an engine can fail with; daemon/errors.py maps these to `gpu_out_of_memory` and
`generation_failed`, and a ModelNotFound at startup to a clear exit."""

from __future__ import annotations


class EngineOutOfMemory(Exception):
    """The accelerator ran out of memory for this batch. Transient: the engine stays usable,
    and admission should take it as a signal to tighten (the permit is settled as dropped)."""


class EngineFailure(Exception):
    """Generation failed for any other reason; the cause is chained for the log line."""


class ModelNotFound(Exception):
    """The requested model is neither built in, a local diffusers folder, nor in the local
    Hugging Face cache. Raised before any weights load, so `serve` can exit with the message."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(
            f"model {model!r} not found: {reason}. meltguard never downloads weights; use "
            "--model tiny or sim, a local diffusers pipeline folder (the one holding "
            "model_index.json), or a Hugging Face id that is already in the local cache."
        )


class EditUnsupported(EngineFailure):
    """The model's pipeline family has no pipeline for this kind of edit. The daemon asks
    `Engine.edit_support` before admission, so a client sees this only in a race with a load."""
