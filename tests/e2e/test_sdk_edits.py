"""The official `openai` SDK's `images.edit`, unchanged, against a real daemon (`--model sim`
on the fake NVML library): edits without and with a mask, n > 1, url and b64 answers, the same
quotas and shedding as generations, and hostile uploads refused by name without costing quota.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator

import openai
import pytest
from PIL import Image

from tests.e2e.conftest import (
    KEYS,
    Daemons,
    log_events,
    metric,
    metric_sum,
    policy_yaml,
    pressure_level,
    wait_for,
)
from tests.fakenvml import FakeNvml
from tests.process import Daemon

pytestmark = pytest.mark.slow

UPLOAD_CAP = 256 * 1024


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB",
        color: tuple[int, ...] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """Opaque, with a transparent top-left quarter: edit there."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG declaring side x side pixels in a few tens of KB of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    row = b"\x00" * (1 + side // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(
        b"IEND", b"")


def sdk(daemon: Daemon, tenant: str, *, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEYS[tenant][1],
                         max_retries=max_retries, timeout=30.0)


def edit(client: openai.OpenAI, **overrides: object) -> object:
    arguments: dict[str, object] = {
        "image": ("photo.png", png(), "image/png"), "prompt": "make it night",
        "size": "64x64", "extra_body": {"steps": 2, "seed": 7},
    }
    arguments.update(overrides)
    return client.images.edit(**arguments)  # type: ignore[arg-type]


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture
def daemon(daemons: Daemons) -> Iterator[Daemon]:
    policy = policy_yaml(elevated_dwell="0s", high_dwell="1s").replace(
        "default_steps: 2}", f"default_steps: 2, max_upload_bytes: {UPLOAD_CAP}}}")
    d = daemons.make(policy=policy, store="memory")
    daemons.start(d)
    yield d


def test_edit_without_a_mask_n2_b64(daemon: Daemon) -> None:
    client = sdk(daemon, "pro")
    raw = client.images.with_raw_response.edit(
        image=("photo.png", png(), "image/png"), prompt="make it night", n=2, size="64x64",
        response_format="b64_json", extra_body={"steps": 2, "seed": 7})
    result = raw.parse()
    assert len(result.data) == 2
    pictures = [decoded(item.b64_json) for item in result.data]
    assert all(picture.size == (64, 64) for picture in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()  # seed 7 and 8
    assert raw.headers["x-ratelimit-limit-requests"]
    assert raw.headers["x-meltguard-seed"] == "7"
    # Charged like a generation of the same size, n and steps: 2 reference images.
    usage = json.loads(raw.content)["usage"]
    assert usage.pop("energy_j") > 0  # the batch's share of the card's energy
    assert usage == {"images": 2, "size": "64x64", "steps": 2, "cost": 2.0}

    # The picture matters: another one, same prompt and seed, gives other pixels.
    other = edit(client, image=("other.png", png(color=(10, 200, 10)), "image/png"), n=1)
    assert decoded(other.data[0].b64_json).tobytes() != pictures[0].tobytes()  # type: ignore[attr-defined]

    assert metric(daemon, "meltguard_admission_decisions_total",
                  {"tier": "pro", "decision": "admit", "endpoint": "edits"}) == 2.0
    lines = log_events(daemon, "admission.decided")
    assert [line["endpoint"] for line in lines] == ["edits", "edits"]
    assert all(line["path"] == "/v1/images/edits" for line in lines)


def test_edit_with_a_mask_as_urls(daemon: Daemon) -> None:
    client = sdk(daemon, "pro")
    result = client.images.edit(
        image=("photo.png", png((128, 64)), "image/png"),
        mask=("mask.png", mask_png((128, 64)), "image/png"), prompt="a moon in the corner",
        n=2, size="128x64", response_format="url", extra_body={"steps": 2})
    assert len(result.data) == 2
    for item in result.data:
        assert item.url is not None and item.url.startswith(daemon.url)
        with urllib.request.urlopen(item.url, timeout=10) as answer:
            assert Image.open(io.BytesIO(answer.read())).size == (128, 64)
    # Without a size the result is the picture's size.
    unsized = client.images.edit(image=("photo.png", png((96, 64)), "image/png"),
                                 mask=("mask.png", mask_png((96, 64)), "image/png"),
                                 prompt="a moon", extra_body={"steps": 2})
    assert decoded(unsized.data[0].b64_json).size == (96, 64)


def test_a_fourth_free_edit_of_three_a_day_is_refused(daemon: Daemon) -> None:
    client = sdk(daemon, "free-a", max_retries=2)
    for _ in range(3):
        edit(client)
    with pytest.raises(openai.RateLimitError) as refused:
        edit(client)
    assert refused.value.code == "daily_quota_exceeded"
    assert refused.value.response.headers["x-should-retry"] == "false"
    # x-should-retry: false kept the SDK from retrying: four requests in all.
    assert metric_sum(daemon, "meltguard_requests_total", {"tier": "free"}) == 4.0
    assert metric(daemon, "meltguard_admission_decisions_total",
                  {"tier": "free", "decision": "reject", "reason": "daily_quota_exceeded",
                   "endpoint": "edits"}) == 1.0


def test_edits_are_shed_under_pressure_like_generations(daemon: Daemon,
                                                        fake_gpu: FakeNvml) -> None:
    fake_gpu.write({"gpu_count": 1, "driver_version": "550.54.15", "0.temperature": 88})
    wait_for(lambda: pressure_level(daemon) == 2.0, "the high pressure level")
    with pytest.raises(openai.InternalServerError) as shed:
        edit(sdk(daemon, "free-b"))
    assert shed.value.status_code == 503
    assert shed.value.code == "server_overloaded"
    assert int(shed.value.response.headers["retry-after-ms"]) > 0
    # A higher tier is still served at the same level.
    assert len(edit(sdk(daemon, "pro")).data) == 1  # type: ignore[attr-defined]
    assert metric(daemon, "meltguard_admission_decisions_total",
                  {"tier": "free", "decision": "reject", "reason": "server_overloaded",
                   "endpoint": "edits"}) == 1.0


def _multipart(files: list[tuple[str, str, bytes, str]],
               fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, filename, data, content_type in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(daemon: Daemon, tenant: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        daemon.url + "/v1/images/edits", data=body, method="POST",
        headers={"Content-Type": content_type,
                 "Authorization": f"Bearer {KEYS[tenant][1]}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _used(daemon: Daemon, tenant: str) -> float:
    status, _, body = daemon.request("GET", "/v1/quota", None,
                                     {"Authorization": f"Bearer {KEYS[tenant][1]}"})
    assert status == 200
    return float(sum(window["used"] for window in body["windows"]))


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="GIF")
    return buffer.getvalue()


HOSTILE = [
    # (what, files, param, words in the message)
    ("too many bytes", [("image", "big.png", b"\x89PNG" + b"\x00" * UPLOAD_CAP, "image/png")],
     "image", "larger than the 256 KiB limit"),
    ("a decompression bomb", [("image", "bomb.png", bomb_png(), "image/png")],
     "image", "declares too many pixels"),
    ("a format not listed", [("image", "a.gif", _gif(), "image/gif")],
     "image", "not a PNG, JPEG or WebP image"),
    ("a non-image", [("image", "notes.txt", b"just some text, honestly", "text/plain")],
     "image", "not a PNG, JPEG or WebP image"),
    ("a truncated PNG", [("image", "cut.png", png()[:60], "image/png")],
     "image", "truncated or corrupt"),
    ("a missing image", [], "image", "Missing required parameter: 'image'"),
    ("a mask of the wrong size", [("image", "a.png", png(), "image/png"),
                                  ("mask", "m.png", mask_png((32, 32)), "image/png")],
     "mask", "the same size"),
    ("a mask without alpha", [("image", "a.png", png(), "image/png"),
                              ("mask", "m.png", png(), "image/png")],
     "mask", "alpha channel"),
    ("a JPEG mask", [("image", "a.png", png(), "image/png"),
                     ("mask", "m.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg")],
     "mask", "not a PNG image"),
    ("two images", [("image[]", "a.png", png(), "image/png"),
                    ("image[]", "b.png", png(), "image/png")],
     "image", "one image at a time"),
]


def test_hostile_uploads_are_refused_by_name_and_cost_nothing(daemon: Daemon) -> None:
    before = _used(daemon, "free-a")
    for what, files, param, words in HOSTILE:
        body, content_type = _multipart(files, {"prompt": "anything", "size": "64x64"})
        status, answer = _post(daemon, "free-a", body, content_type)
        assert status == 400, (what, answer)
        error = answer["error"]
        assert error["code"] == "invalid_request_error", what
        assert error["param"] == param, (what, error)
        assert words in error["message"], (what, error["message"])
    # More refusals than the 3-a-day quota has, and none charged, none reached the gate.
    assert _used(daemon, "free-a") == before
    assert metric_sum(daemon, "meltguard_admission_decisions_total", {"tier": "free"}) == 0.0
    assert metric(daemon, "meltguard_requests_total", {"tier": "free", "code": "500"}) == 0.0
    # The SDK's own errors for one of them: a BadRequestError naming the field.
    with pytest.raises(openai.BadRequestError) as refused:
        edit(sdk(daemon, "free-a"), image=("notes.txt", b"not an image", "text/plain"))
    assert refused.value.code == "invalid_request_error"
    assert refused.value.body["param"] == "image"  # type: ignore[index]
    assert _used(daemon, "free-a") == before
    # And the daemon still serves the same tenant afterwards.
    assert len(edit(sdk(daemon, "free-a")).data) == 1  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.inference.families import build_lcm, build_sd3, build_sdxl

    return {"tiny": "tiny",
            "sdxl": str(build_sdxl(tmp_path_factory.mktemp("sdxl"))),
            "sd3": str(build_sd3(tmp_path_factory.mktemp("sd3"))),
            "lcm": str(build_lcm(tmp_path_factory.mktemp("lcm") / "lcm"))}


@pytest.mark.parametrize("family", ["tiny", "sdxl", "sd3"])
def test_real_pipelines_serve_both_endpoints(daemons: Daemons, model_folders: dict[str, str],
                                             family: str) -> None:
    """The embedded tiny model and `--model PATH` folders of two other families (built in
    code, saved, loaded by the daemon): generations, edits and masked edits through the SDK."""
    model = model_folders[family]
    d = daemons.make(policy=policy_yaml(), store="memory", name=family,
                     args=["--model", model])
    daemons.start(d)
    client = sdk(d, "pro")
    assert [m.id for m in client.models.list()] == [model]
    made = client.images.generate(prompt="a lighthouse", size="64x64", n=2,
                                  extra_body={"steps": 2, "seed": 3})
    redrawn = edit(client, n=2)
    inpainted = edit(client, n=2, mask=("mask.png", mask_png(), "image/png"))
    pictures = [decoded(item.b64_json) for result in (made, redrawn, inpainted)
                for item in result.data]  # type: ignore[attr-defined]
    assert [p.size for p in pictures] == [(64, 64)] * 6
    assert len({p.tobytes() for p in pictures}) == 6
    lines = log_events(d, "admission.decided")
    assert [line["endpoint"] for line in lines] == ["generations", "edits", "edits"]


def test_a_family_without_inpainting_refuses_masked_edits_by_name(
    daemons: Daemons, model_folders: dict[str, str],
) -> None:
    """An LCM folder: generations and edits without a mask are served; a masked edit is a 400
    naming the mask and the family, before admission, so it costs nothing."""
    d = daemons.make(policy=policy_yaml(), store="memory", name="lcm",
                     args=["--model", model_folders["lcm"]])
    daemons.start(d)
    client = sdk(d, "free-a")
    assert len(edit(client).data) == 1  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:
        edit(client, mask=("mask.png", mask_png(), "image/png"))
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "mask"
    assert "LatentConsistencyModelPipeline" in body["message"]
    assert "no inpaint pipeline" in body["message"]
    assert _used(d, "free-a") == 1.0
    assert metric_sum(d, "meltguard_admission_decisions_total", {"endpoint": "edits"}) == 1.0
