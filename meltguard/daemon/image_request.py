"""Parse an OpenAI Images request body into an ImageAsk; every refusal names its `param`.

Hostile bodies end here as 400s: invalid UTF-8, JSON nested past the recursion limit,
lone surrogate escapes (valid JSON, but text no encoder accepts, so an engine would fail on
them and take the other requests batched with it down too), NUL bytes, and numbers of any
size or type. Client text is echoed in messages only when short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meltguard.admission.cost import ImageAsk
from meltguard.errors import invalid
from meltguard.values import Size

RESPONSE_FORMATS = ("b64_json", "url")
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
# OpenAI parameters we accept and ignore: they do not change what a diffusion pipeline does.
IGNORED = ("style", "background", "moderation", "output_compression")
KNOWN = (
    "prompt", "model", "n", "size", "response_format", "quality", "user", "steps", "seed",
    "output_format", "stream", *IGNORED,
)
MAX_SEED = 2**63 - 1
_ECHO = 64  # longest client text quoted back in an error message


@dataclass(frozen=True, slots=True)
class ImageRequest:
    ask: ImageAsk
    response_format: str
    model: str | None
    user: str | None


def parse_image_request(body: bytes, content_type: str) -> ImageRequest:
    if content_type != "application/json":
        raise invalid(None, "Content-Type must be application/json.")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise invalid(None, "The request body is not valid UTF-8.") from None
    except RecursionError:
        raise invalid(None, "The request body is nested too deeply.") from None
    except ValueError as exc:
        raise invalid(None, f"The request body is not valid JSON: {_clip(str(exc))}.") from None
    if not isinstance(data, dict):
        raise invalid(None, "The request body must be a JSON object.")
    for key in data:
        if key not in KNOWN:
            raise invalid(_clip(key), f"Unrecognized request argument supplied: {_clip(key)}.")
    for key, value in data.items():
        if isinstance(value, str):
            _check_text(key, value)

    prompt = data.get("prompt")
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt", "'prompt' must be a non-empty string.")
    if "\x00" in prompt:
        raise invalid("prompt", "'prompt' must not contain NUL characters.")

    size: Size | None = None
    if data.get("size") not in (None, "auto"):
        raw_size = data["size"]
        if not isinstance(raw_size, str):
            raise invalid("size", "'size' must be a string like '512x512'.")
        try:
            size = Size.parse(raw_size[:_ECHO])
        except ValueError as exc:
            raise invalid("size", f"Invalid size: {exc}.") from None
        if len(raw_size) > _ECHO:
            raise invalid("size", "'size' must be a string like '512x512'.")

    response_format = data.get("response_format")
    if response_format is None:
        response_format = "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"'response_format' must be one of {RESPONSE_FORMATS}.")
    if data.get("quality") is not None and data["quality"] not in QUALITIES:
        raise invalid("quality", f"'quality' must be one of {QUALITIES}.")
    if data.get("output_format") not in (None, "png"):
        raise invalid("output_format", "Only 'png' output is supported.")
    if data.get("stream") is not None and data["stream"] is not False:  # 0 == False in Python
        raise invalid("stream", "Streaming image generation is not supported.")
    for key in ("model", "user"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise invalid(key, f"'{key}' must be a string.")

    ask = ImageAsk(
        prompt=prompt,
        size=size,
        steps=_optional_int(data, "steps", 1, 10_000),
        n=_optional_int(data, "n", 1, 10_000) or 1,
        seed=_optional_int(data, "seed", 0, MAX_SEED),
    )
    return ImageRequest(ask, response_format, data.get("model"), data.get("user"))


def _check_text(key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(key, f"'{key}' is not valid Unicode text (it contains a lone surrogate "
                           "escape such as \\ud800).") from None


def _clip(text: str) -> str:
    return text if len(text) <= _ECHO else text[:_ECHO] + "..."


def _optional_int(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    # JSON Schema counts 2.0 as an integer, and so do clients that serialise every number as
    # a float; 2.5, true and "2" are still refused.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"'{key}' must be an integer.")
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**_ECHO else "a number that large"
        raise invalid(key, f"'{key}' must be between {low} and {high}, got {shown}.")
    return value
