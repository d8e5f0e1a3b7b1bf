"""Hostile uploads to /v1/images/edits, at the parser: every one is a 400 naming its field
(never another exception), a decompression bomb is refused without its pixels ever being
allocated, and what is accepted reaches the engine as bounded, well-formed pixels."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from meltguard.admission.policy import Limits
from meltguard.daemon.edit_request import (
    MAX_UPLOAD_PIXELS,
    EditForm,
    EditRequest,
    Upload,
    parse_edit_form,
)
from meltguard.errors import ErrorCode, ServiceError
from meltguard.values import Size
from tests.daemon.conftest import KEYS
from tests.hardening.conftest import Probe, auth, client_for, hardening_policy

LIMITS = Limits(max_size=Size(512, 512))
ROOT = Path(__file__).resolve().parents[2]


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, "red" if mode in ("RGB", "RGBA") else 128)
    return image


def bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG declaring side x side pixels: about 50 KB on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0,
                                                              0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def parse(image: bytes | None = None, mask: bytes | None = None,
          **text: str) -> EditRequest:
    images = (Upload("image", image),) if image is not None else ()
    return parse_edit_form(
        EditForm(images, Upload("mask", mask) if mask is not None else None,
                 {"prompt": "edit it", **text}), LIMITS)


def refused(param: str, **kwargs: object) -> str:
    with pytest.raises(ServiceError) as caught:
        parse(**kwargs)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.param == param, caught.value.message
    return caught.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_listed_formats_are_accepted(fmt: str) -> None:
    request = parse(encoded(photo((80, 48)), fmt))
    picture = request.edit.image
    assert (picture.width, picture.height, picture.mode) == (80, 48, "RGB")
    assert request.edit.mask is None and request.edit.kind == "image_to_image"
    assert request.edit.strength == 0.8
    assert str(request.ask.size) == "80x48"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused(fmt: str) -> None:
    message = refused("image", image=encoded(photo(), fmt))
    assert message == "The 'image' file is not a PNG, JPEG or WebP image."


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    data = bomb()
    assert len(data) < 100_000
    assert "declares too many pixels" in refused("image", image=data)
    # Just over the cap, where Pillow's own check would only warn, ours refuses with the size.
    side = int(MAX_UPLOAD_PIXELS ** 0.5) + 1
    assert f"({side}x{side})" in refused("image", image=bomb(side))
    assert "too many pixels" in refused("mask", image=encoded(photo(), "PNG"), mask=bomb(side))


@pytest.mark.parametrize("side", [20000, 5000])
def test_a_bomb_never_allocates_its_pixels(side: int) -> None:
    """Peak memory of a fresh process around the parse: decoding 20000x20000 would take
    400 MB, 5000x5000 (under the size where Pillow's own check refuses) 25 MB and 75 MB more
    as RGB; refusing either from the header takes nothing measurable."""
    script = (
        "import resource, sys\n"
        "from tests.hardening.test_uploads import bomb, parse\n"
        "from meltguard.errors import ServiceError\n"
        f"data = bomb({side})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    parse(data)\n"
        "except ServiceError as exc:\n"
        "    assert exc.param == 'image', exc.message\n"
        "else:\n"
        "    sys.exit('accepted')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    grown_kib = int(result.stdout.strip().splitlines()[-1])
    assert grown_kib < 20 * 1024


def test_truncated_empty_and_lying_files_are_refused() -> None:
    good = encoded(photo(), "PNG")
    assert "truncated or corrupt" in refused("image", image=good[:-30])
    assert "empty" in refused("image", image=b"")
    assert "not a PNG, JPEG or WebP" in refused("image", image=b"GIF89a" + good)
    jpeg = encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    assert "truncated or corrupt" in refused("image", image=jpeg[: len(jpeg) * 3 // 4])
    # Cut inside its headers, a JPEG is no longer recognisable as one.
    assert "not a PNG, JPEG or WebP" in refused("image", image=jpeg[:200])
    assert "Missing required parameter: 'image'" in refused("image")


def test_masks_must_be_png_with_alpha_and_the_image_size() -> None:
    image = encoded(photo(), "PNG")
    assert "alpha channel" in refused("mask", image=image, mask=encoded(photo(), "PNG"))
    assert "alpha channel" in refused("mask", image=image, mask=encoded(photo(mode="L"), "PNG"))
    assert "not a PNG image" in refused("mask", image=image,
                                        mask=encoded(photo(mode="RGB"), "JPEG"))
    assert "The mask is 32x64 but the image is 64x64" in refused(
        "mask", image=image, mask=encoded(photo((32, 64), "RGBA"), "PNG"))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_in_any_png_form_marks_the_edit(mode: str) -> None:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 64))  # transparent left quarter: edit there
    if mode == "P":
        data = encoded(mask.convert("P"), "PNG", transparency=mask.convert("P").getpixel((0, 0)))
    else:
        data = encoded(mask.convert(mode), "PNG")
    request = parse(encoded(photo(), "PNG"), data)
    edit = request.edit
    assert edit.kind == "inpaint" and edit.strength == 1.0
    assert edit.mask is not None
    decoded = Image.frombytes("L", (64, 64), edit.mask.data)
    assert decoded.getpixel((0, 0)) == 255
    assert decoded.getpixel((40, 0)) == 0


def test_large_pictures_are_shrunk_to_the_largest_output_at_once() -> None:
    request = parse(encoded(photo((2000, 1000)), "JPEG"),
                    encoded(photo((2000, 1000), "RGBA"), "PNG"))
    picture, mask = request.edit.image, request.edit.mask
    assert (picture.width, picture.height) == (512, 256)
    assert mask is not None and (mask.width, mask.height) == (512, 256)
    assert str(request.ask.size) == "512x256"
    # Odd pictures get an output in multiples of 8 within them.
    assert str(parse(encoded(photo((101, 33)), "PNG")).ask.size) == "96x32"


def test_unusual_pixel_formats_decode_or_are_refused_cleanly() -> None:
    for image in (Image.new("I;16", (16, 16), 300), Image.new("1", (16, 16), 1),
                  Image.new("RGBA", (16, 16), (1, 2, 3, 0)), Image.new("P", (16, 16), 3)):
        try:
            request = parse(encoded(image, "PNG"))
        except ServiceError as exc:
            assert exc.param == "image"
        else:
            assert request.edit.image.mode == "RGB"
    cmyk = encoded(Image.new("CMYK", (16, 16), (0, 50, 50, 0)), "JPEG")
    assert parse(cmyk).edit.image.mode == "RGB"


@pytest.mark.parametrize(("field", "value"), [
    ("strength", "0"), ("strength", "1.01"), ("strength", "-0.5"), ("strength", "inf"),
    ("strength", "1e-1"), ("strength", ""), ("n", "2.5"), ("n", ""), ("n", "+2"),
    ("n", " 2"), ("steps", "0x10"), ("seed", "9" * 30), ("size", " 64x64"),
    ("size", ""), ("size", "64x64 "), ("response_format", ""), ("quality", "ultra"),
    ("output_format", "webp"),
])
def test_text_fields_are_strict(field: str, value: str) -> None:
    refused(field, image=encoded(photo(), "PNG"), **{field: value})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]))
def test_mangled_files_are_400s_or_decode(data: st.DataObject, fmt: str) -> None:
    """Flip, cut and splice bytes of a real file: the parser answers a 400 naming the field
    or a picture of the size the header declares, never anything else."""
    original = bytearray(encoded(photo((24, 16)), fmt))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1),
                                         st.integers(0, 255)), max_size=8))
    for position, value in edits:
        original[position] = value
    cut = data.draw(st.integers(0, len(original)))
    mangled = bytes(original[:cut]) if data.draw(st.booleans()) else bytes(original)
    try:
        request = parse(mangled)
    except ServiceError as exc:
        assert exc.code is ErrorCode.INVALID_REQUEST and exc.param == "image"
    else:
        picture = request.edit.image
        assert picture.width * picture.height <= MAX_UPLOAD_PIXELS
        assert len(picture.data) == picture.width * picture.height * 3


def test_the_policy_caps_uploads_in_bytes() -> None:
    assert Limits().max_upload_bytes == 4 << 20
    with pytest.raises(ValidationError, match="max_upload_bytes"):
        Limits(max_upload_bytes=10)


# -- over HTTP --------------------------------------------------------------------------------


def _form(image: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in {"prompt": "edit it", "size": "64x64", **fields}.items():
        form.add_field(name, value)
    form.add_field("image", image, filename="a.png", content_type="image/png")
    return form


async def test_the_byte_cap_is_exact_and_refusals_cost_nothing(aiohttp_client: Any,
                                                               build: Any) -> None:
    cap = 4096
    policy = hardening_policy().replace("default_steps: 2}",
                                        f"default_steps: 2, max_upload_bytes: {cap}}}")
    assembly = build(policy)
    probe = Probe(await client_for(aiohttp_client, assembly), assembly)
    image = encoded(photo(), "PNG")
    at_cap = image + b"\x00" * (cap - len(image))  # PNG readers stop at IEND
    probe.sent += 2
    over = await probe.client.post("/v1/images/edits", headers=auth("free"),
                                   data=_form(at_cap + b"\x00"))
    assert over.status == 400
    error = (await over.json())["error"]
    assert error["param"] == "image"
    assert error["message"] == "The 'image' file is larger than the 4 KiB limit."
    huge = await probe.client.post("/v1/images/edits", headers=auth("free"),
                                   data=_form(image + b"\x00" * (8 << 20)))
    assert huge.status == 400
    assert await probe.quota_used("free") == 0.0
    probe.sent += 1
    accepted = await probe.client.post("/v1/images/edits", headers=auth("free"),
                                       data=_form(at_cap))
    assert accepted.status == 200, await accepted.text()
    assert await probe.quota_used("free") == 1.0
    await probe.settled()


async def test_an_upload_that_never_finishes_is_408(aiohttp_client: Any, build: Any) -> None:
    assembly = build(hardening_policy(), body_timeout=0.5)
    probe = Probe(await client_for(aiohttp_client, assembly), assembly)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    head = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + encoded(photo(), "PNG")[:40])
    writer.write(b"POST /v1/images/edits HTTP/1.1\r\nHost: t\r\n"
                 b"Authorization: Bearer " + KEYS["free"].encode() + b"\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n" + head)
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    elapsed = time.monotonic() - started
    length = next(int(line.split(b":")[1]) for line in answer.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    probe.sent += 1
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.4 < elapsed < 3
    assert await probe.quota_used("free") == 0.0
    await probe.settled()


async def test_a_second_image_is_refused_before_it_is_read(aiohttp_client: Any,
                                                           build: Any) -> None:
    """The second image part is refused as soon as its headers arrive: the rest of its body
    (here never sent) is not awaited, so a request holds at most one image and one mask.
    (aiohttp's part reader reads one chunk ahead, so some of it is sent.)"""
    assembly = build(hardening_policy(), body_timeout=5)
    probe = Probe(await client_for(aiohttp_client, assembly), assembly)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    image = encoded(photo(), "PNG")
    part = (b"--b\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    body = part + image + b"\r\n" + part + image + b"\x00" * 200_000
    writer.write(b"POST /v1/images/edits HTTP/1.1\r\nHost: t\r\n"
                 b"Authorization: Bearer " + KEYS["free"].encode() + b"\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 1000000\r\n\r\n" + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    length = next(int(line.split(b":")[1]) for line in answer.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    error = json.loads(await asyncio.wait_for(reader.readexactly(length), 2))["error"]
    writer.close()
    probe.sent += 1
    assert answer.startswith(b"HTTP/1.1 400")
    assert error["param"] == "image" and "one image at a time" in error["message"]
    await probe.settled()
