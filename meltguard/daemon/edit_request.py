"""Read a `/v1/images/edits` multipart body into an EditRequest; uploads are hostile input.

Every refusal is a 400 in OpenAI's shape naming its `param`, raised before admission, so a
refused upload never costs quota:
- each file is read in chunks and refused at `limits.max_upload_bytes` + 1 bytes, without
  buffering the rest; text fields and the number of parts are capped the same way;
- only PNG, JPEG and WebP are opened (a mask only as PNG), by Pillow's header parsers alone;
- the pixel count the header declares is checked before any pixel is decoded, so a small
  PNG declaring 20000x20000 is refused without allocating it (MAX_UPLOAD_PIXELS; Pillow's own
  MAX_IMAGE_PIXELS is set to the same number, so its bomb check backs this one up);
- a truncated or corrupt file, a mask without alpha or of another size than the image, a
  missing image, several images: each refused by name.

The decoded picture is shrunk to fit `limits.max_size` at once (the engine resizes it to the
admitted output size anyway), so a request holds at most a few MB of pixels while it waits.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
import warnings
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, ImageOps, UnidentifiedImageError

from meltguard.admission.cost import ImageAsk, fit_size
from meltguard.admission.policy import Limits
from meltguard.daemon.image_request import IGNORED, MAX_SEED, QUALITIES, RESPONSE_FORMATS
from meltguard.errors import ErrorCode, ServiceError, invalid
from meltguard.values import EditInput, Picture, Size

# 4096x4096: the largest photo a phone takes today, and 64 MiB as RGBA while it decodes.
MAX_UPLOAD_PIXELS = 4096 * 4096
# Pillow's own guard, process-wide: it refuses at twice this in Image.open and warns above it.
# Ours refuses above it with a 400 before any pixel is decoded, so the warning only repeats it.
Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MASK_FORMATS = ("PNG",)
IMAGE_FIELDS = ("image", "image[]")
FILE_FIELDS = (*IMAGE_FIELDS, "mask")
# Edit parameters the OpenAI SDK may send that do not change what a diffusion pipeline does.
EDIT_IGNORED = (*IGNORED, "input_fidelity", "partial_images")
TEXT_FIELDS = ("prompt", "model", "n", "size", "response_format", "quality", "user", "steps",
               "seed", "strength", "output_format", "stream", *EDIT_IGNORED)
MAX_PARTS = 32
# diffusers' own defaults: an edit without a mask keeps some of the picture; inpainting
# redraws the masked area from noise.
DEFAULT_STRENGTH = {"image_to_image": 0.8, "inpaint": 1.0}
MIN_STRENGTH = 0.01
_ECHO = 64
_INT = re.compile(r"^[0-9]{1,25}$")
_FLOAT = re.compile(r"^([0-9]{1,6}(\.[0-9]{1,12})?|\.[0-9]{1,12})$")
_SIZE = re.compile(r"^[1-9][0-9]{0,5}x[1-9][0-9]{0,5}$")
_CHUNK = 64 * 1024
TOO_MANY_IMAGES = "This model edits one image at a time; send a single 'image'."


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EditForm:
    """The body as read: files by field, text fields by name."""

    images: tuple[Upload, ...]
    mask: Upload | None
    text: dict[str, str]


@dataclass(frozen=True, slots=True)
class EditRequest:
    ask: ImageAsk
    edit: EditInput
    response_format: str
    model: str | None
    user: str | None


async def read_edit_request(request: web.Request, limits: Limits, *,
                            seconds: float) -> EditRequest:
    """The whole body within `seconds` (408 after), then parsed off the event loop:
    decoding a large photo takes tens of milliseconds."""
    try:
        async with asyncio.timeout(seconds):
            form = await read_form(request, limits)
    except TimeoutError:
        raise ServiceError(ErrorCode.REQUEST_TIMEOUT,
                           f"The request body did not arrive within {seconds:g} s.") from None
    return await asyncio.to_thread(parse_edit_form, form, limits)


async def read_form(request: web.Request, limits: Limits) -> EditForm:
    if request.content_type != "multipart/form-data":
        raise invalid(None, "Content-Type must be multipart/form-data (an image upload).")
    try:
        reader = await request.multipart()
    except _MALFORMED as exc:
        raise _malformed(None, exc) from None
    images: list[Upload] = []
    mask: Upload | None = None
    text: dict[str, str] = {}
    max_text = limits.max_prompt_chars * 4 + 256  # UTF-8 takes at most 4 bytes a character
    parts = 0
    while True:
        try:
            part = await reader.next()
        except _MALFORMED as exc:
            raise _malformed(None, exc) from None
        if part is None:
            break
        parts += 1
        if parts > MAX_PARTS:
            raise invalid(None, f"The multipart body has more than {MAX_PARTS} parts.")
        if not isinstance(part, BodyPartReader):
            raise invalid(None, "Nested multipart bodies are not accepted.")
        name = part.name
        if name is None:
            raise invalid(None, "Every multipart part needs a name (Content-Disposition).")
        if name in FILE_FIELDS:
            param = "image" if name in IMAGE_FIELDS else "mask"
            if images and param == "image":
                # Refused before reading it: a request holds at most one image and one mask.
                raise invalid("image", TOO_MANY_IMAGES)
            data = await _read_part(part, limits.max_upload_bytes, param, "file")
            if name == "mask":
                if mask is not None:
                    raise invalid("mask", "Send at most one mask.")
                mask = Upload("mask", data)
            else:
                images.append(Upload(name, data))
        elif name in TEXT_FIELDS:
            if name in text:
                raise invalid(_clip(name), f"'{_clip(name)}' is given more than once.")
            raw = await _read_part(part, max_text, name, "field")
            try:
                text[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(name, f"'{name}' is not valid UTF-8 text.") from None
        else:
            raise invalid(_clip(name), f"Unrecognized request argument supplied: {_clip(name)}.")
    return EditForm(tuple(images), mask, text)


# What aiohttp's multipart reader raises for a body that breaks the format: a missing or
# wrong boundary, a header line that is not one, a body that ends too early.
_MALFORMED = (ValueError, AssertionError, KeyError, HttpProcessingError)


def _malformed(param: str | None, exc: BaseException) -> ServiceError:
    # A bad header line comes back quoting the client's bytes: name the kind of error only.
    detail = type(exc).__name__ if isinstance(exc, HttpProcessingError) else _clip(str(exc))
    return invalid(param, f"The multipart body is malformed ({detail}).")


async def _read_part(part: BodyPartReader, limit: int, param: str, what: str) -> bytes:
    buffer = bytearray()
    while True:
        try:
            chunk = await part.read_chunk(_CHUNK)
        except _MALFORMED as exc:
            raise _malformed(param, exc) from None
        if not chunk:
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > limit:
            raise invalid(param, f"The '{param}' {what} is larger than the {_bytes(limit)} "
                                 "limit.")


def parse_edit_form(form: EditForm, limits: Limits) -> EditRequest:
    """Check the fields, decode the picture and mask; raises INVALID_REQUEST naming the param."""
    text = form.text
    for key, value in text.items():
        if "\x00" in value:
            raise invalid(key, f"'{key}' must not contain NUL characters.")
    prompt = text.get("prompt")
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.")
    if not prompt.strip():
        raise invalid("prompt", "'prompt' must be a non-empty string.")
    for key in ("size", "n", "steps", "seed", "strength", "response_format"):
        if text.get(key) == "":
            raise invalid(key, f"'{key}' is empty; leave it out for the default.")
    response_format = text.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"'response_format' must be one of {RESPONSE_FORMATS}.")
    if text.get("quality") not in (None, *QUALITIES):
        raise invalid("quality", f"'quality' must be one of {QUALITIES}.")
    if text.get("output_format") not in (None, "png"):
        raise invalid("output_format", "Only 'png' output is supported.")
    if text.get("stream") not in (None, "false", "False"):
        raise invalid("stream", "Streaming image edits are not supported.")
    size: Size | None = None
    if text.get("size") not in (None, "auto"):
        raw_size = text["size"]
        if not _SIZE.match(raw_size):
            raise invalid("size", f"'size' must look like 512x512 (WIDTHxHEIGHT) or 'auto', "
                                  f"got {_clip(raw_size)!r}.")
        size = Size.parse(raw_size)

    if not form.images:
        raise invalid("image", "Missing required parameter: 'image' (a PNG, JPEG or WebP file).")
    if len(form.images) > 1:
        raise invalid("image", TOO_MANY_IMAGES)
    image = _open(form.images[0].data, "image", IMAGE_FORMATS)
    mask_image = None
    if form.mask is not None:
        mask_image = _open(form.mask.data, "mask", MASK_FORMATS)
        if mask_image.size != image.size:
            raise invalid("mask", f"The mask is {_dims(mask_image.size)} but the image is "
                                  f"{_dims(image.size)}; they must be the same size.")
        if not _has_alpha(mask_image):
            raise invalid("mask", "The mask must be a PNG with an alpha channel: its transparent "
                                  "pixels mark where to edit.")
    picture, mask = _pictures(image, mask_image, limits.max_size)

    kind = "image_to_image" if mask is None else "inpaint"
    strength = _strength(text.get("strength"), DEFAULT_STRENGTH[kind])
    if size is None:
        # Unsaid, the result is the picture's size (within max_size, in multiples of 8).
        size = Size(max(8, picture.width // 8 * 8), max(8, picture.height // 8 * 8))
    ask = ImageAsk(
        prompt=prompt,
        size=size,
        steps=_int(text, "steps", 1, 10_000),
        n=_int(text, "n", 1, 10_000) or 1,
        seed=_int(text, "seed", 0, MAX_SEED),
    )
    return EditRequest(ask, EditInput(picture, mask, strength), response_format,
                       text.get("model") or None, text.get("user"))


def _open(data: bytes, param: str, formats: tuple[str, ...]) -> Image.Image:
    """Open by header, check the declared pixel count, and only then decode."""
    names = "PNG, JPEG or WebP" if formats == IMAGE_FORMATS else "PNG"
    if not data:
        raise invalid(param, f"The '{param}' file is empty.")
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, None) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise invalid(param, f"The '{param}' file is not a {names} image.") from None
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise _too_many_pixels(param, image.size)
    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, image.size) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError):
        raise invalid(param, f"The '{param}' file could not be decoded (truncated or corrupt "
                             f"{image.format or names}).") from None
    return image


def _too_many_pixels(param: str, size: tuple[int, int] | None) -> ServiceError:
    declared = f" ({_dims(size)})" if size is not None else ""
    return invalid(param, f"The '{param}' image declares too many pixels{declared}; the limit "
                          f"is {MAX_UPLOAD_PIXELS:,} (4096x4096).")


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def _pictures(image: Image.Image, mask_image: Image.Image | None,
              limit: Size) -> tuple[Picture, Picture | None]:
    try:
        rgb = image.convert("RGB")
        # Transparent (alpha 0) marks where to edit; diffusers wants white there.
        mask = ImageOps.invert(mask_image.convert("RGBA").getchannel("A")) if (
            mask_image is not None) else None
    except (OSError, ValueError) as exc:
        raise invalid("image", f"The image's pixel format cannot be read: {_clip(str(exc))}."
                      ) from None
    fitted = fit_size(Size(rgb.width, rgb.height), limit)
    if (fitted.width, fitted.height) != rgb.size:
        # Aspect kept to the pixel; fit_size rounds to multiples of 8, which is not needed here.
        scale = min(limit.width / rgb.width, limit.height / rgb.height)
        target = (max(1, math.floor(rgb.width * scale)), max(1, math.floor(rgb.height * scale)))
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        if mask is not None:
            mask = mask.resize(target, Image.Resampling.NEAREST)
    picture = Picture(rgb.width, rgb.height, "RGB", rgb.tobytes())
    return picture, (Picture(mask.width, mask.height, "L", mask.tobytes())
                     if mask is not None else None)


def _strength(raw: str | None, default: float) -> float:
    if raw is None:
        return default
    if not _FLOAT.match(raw):
        raise invalid("strength", f"'strength' must be a number from {MIN_STRENGTH} to 1.")
    value = float(raw)
    if not MIN_STRENGTH <= value <= 1.0:
        raise invalid("strength", f"'strength' must be from {MIN_STRENGTH} to 1, got {value:g}.")
    return value


def _int(text: dict[str, str], key: str, low: int, high: int) -> int | None:
    raw = text.get(key)
    if raw is None:
        return None
    if not _INT.match(raw):
        raise invalid(key, f"'{key}' must be an integer.")
    value = int(raw)
    if not low <= value <= high:
        raise invalid(key, f"'{key}' must be between {low} and {high}, got {_clip(raw)}.")
    return value


def _dims(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _bytes(count: int) -> str:
    if count >= 1 << 20 and count % (1 << 20) == 0:
        return f"{count >> 20} MiB"
    if count >= 1024 and count % 1024 == 0:
        return f"{count >> 10} KiB"
    return f"{count} bytes"


def _clip(text: str) -> str:
    return text if len(text) <= _ECHO else text[:_ECHO] + "..."
