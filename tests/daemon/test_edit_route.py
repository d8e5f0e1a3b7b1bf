"""/v1/images/edits in process: the generations route's gate, cost, degradation, headers and
errors; the picture reaching the engine after admission; refusals before admission costing
nothing; the endpoint on the decision's series and line."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import pytest
from PIL import Image
from structlog.testing import capture_logs

from meltguard.values import GenerationJob
from tests.daemon.conftest import FixedSource, ScriptedEngine, auth, gpu, wait_until

pytestmark = pytest.mark.asyncio


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB",
        color: Any = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(size: tuple[int, int] = (64, 64)) -> bytes:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))  # the left half is to be edited
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def form(fields: dict[str, str | None] | None = None, *, image: bytes | None = None,
         mask: bytes | None = None) -> aiohttp.FormData:
    """The fields given over the defaults; a field given as None is left out."""
    data = aiohttp.FormData()
    for name, value in {"prompt": "at night", "size": "64x64", **(fields or {})}.items():
        if value is not None:
            data.add_field(name, value)
    data.add_field("image", png() if image is None else image, filename="photo.png",
                   content_type="image/png")
    if mask is not None:
        data.add_field("mask", mask, filename="mask.png", content_type="image/png")
    return data


async def _client(aiohttp_client: Any, build: Any, **kwargs: Any) -> tuple[Any, Any]:
    assembly = build(**kwargs)
    client = await aiohttp_client(assembly.app)
    await wait_until(lambda: assembly.runtime.engine.health().ready)
    return client, assembly.runtime


async def _used(client: Any, tier: str) -> float:
    quota = await (await client.get("/v1/quota", headers=auth(tier))).json()
    return float(quota["windows"][0]["used"])


async def test_an_edit_is_admitted_and_charged_like_a_generation(aiohttp_client: Any,
                                                                 build: Any) -> None:
    client, _ = await _client(aiohttp_client, build)
    with capture_logs() as logs:
        edit = await client.post("/v1/images/edits", headers=auth("pro"),
                                 data=form({"n": "2", "seed": "5"}, mask=mask_png()))
        assert edit.status == 200, await edit.text()
        generation = await client.post("/v1/images/generations", headers=auth("pro"),
                                       json={"prompt": "at night", "size": "64x64", "n": 2})
    body = await edit.json()
    usage, generation_usage = body["usage"], (await generation.json())["usage"]
    # Charged alike; the energy each batch drew is its own.
    assert usage.pop("energy_j") > 0 and generation_usage.pop("energy_j") > 0
    assert usage == generation_usage
    assert len(body["data"]) == 2
    assert edit.headers["x-meltguard-seed"] == "5"
    assert int(edit.headers["x-ratelimit-remaining-requests"]) == 998
    assert await _used(client, "pro") == pytest.approx(4.0)
    decided = [line for line in logs if line["event"] == "admission.decided"]
    assert [(line["endpoint"], line["path"]) for line in decided] == [
        ("edits", "/v1/images/edits"), ("generations", "/v1/images/generations")]
    text = await (await client.get("/metrics")).text()
    assert ('meltguard_admission_decisions_total{decision="admit",endpoint="edits",'
            'reason="ok",tier="pro"} 1.0') in text


async def test_the_engine_gets_the_picture_after_admission(aiohttp_client: Any,
                                                           build: Any) -> None:
    async def paint(job: GenerationJob) -> list[bytes]:
        return [png((job.size.width, job.size.height))] * job.n

    engine = ScriptedEngine(paint)
    client, _ = await _client(aiohttp_client, build, engine=engine)
    resp = await client.post("/v1/images/edits", headers=auth("plus"),
                             data=form({"strength": "0.35", "size": "32x16"}, mask=mask_png()))
    assert resp.status == 200, await resp.text()
    [job] = engine.calls
    assert job.edit is not None
    assert (job.size.width, job.size.height, job.steps) == (32, 16, 2)
    assert job.edit.kind == "inpaint" and job.edit.strength == 0.35
    assert (job.edit.image.width, job.edit.image.height) == (64, 64)
    # Transparent pixels (the left half) mark where to edit: white in the engine's mask.
    mask = Image.frombytes("L", (64, 64), job.edit.mask.data)  # type: ignore[union-attr]
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((63, 0)) == 0
    image = Image.frombytes("RGB", (64, 64), job.edit.image.data)
    assert image.getpixel((10, 10)) == (200, 40, 40)

    # No size: the picture's own, in multiples of 8.
    engine.calls.clear()
    resp = await client.post("/v1/images/edits", headers=auth("plus"),
                             data=form({"size": None}, image=png((100, 60))))
    assert resp.status == 200, await resp.text()
    assert str(engine.calls[0].size) == "96x56"
    assert engine.calls[0].edit.kind == "image_to_image"  # type: ignore[union-attr]


async def test_edits_degrade_under_pressure_like_generations(aiohttp_client: Any,
                                                             build: Any) -> None:
    # Elevated: free requests are cut to 1 step.
    client, runtime = await _client(aiohttp_client, build, source=FixedSource([gpu(80)]))
    await wait_until(lambda: runtime.level.label == "elevated")
    resp = await client.post("/v1/images/edits", headers=auth("free"), data=form({"steps": "2"}))
    assert resp.status == 200
    assert resp.headers["x-meltguard-degraded"] == "steps:2->1"
    assert (await resp.json())["usage"]["steps"] == 1


async def test_an_edit_the_model_cannot_run_is_refused_before_admission(
    aiohttp_client: Any, build: Any,
) -> None:
    class NoInpainting(ScriptedEngine):
        def edit_support(self, kind: str) -> str | None:
            return "model 'x' is a FooPipeline, a family diffusers has no inpaint pipeline for" \
                if kind == "inpaint" else None

    async def paint(job: GenerationJob) -> list[bytes]:
        return [png()] * job.n

    client, _ = await _client(aiohttp_client, build, engine=NoInpainting(paint))
    resp = await client.post("/v1/images/edits", headers=auth("free"),
                             data=form(mask=mask_png()))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "mask" and "FooPipeline" in error["message"]
    assert resp.headers["x-ratelimit-limit-requests"]  # the caller is known: headers too
    assert await _used(client, "free") == 0.0
    # Without a mask the same model edits.
    assert (await client.post("/v1/images/edits", headers=auth("free"), data=form())).status \
        == 200


@pytest.mark.parametrize(("fields", "param"), [
    ({"model": "dall-e-2"}, "model"),
    ({"n": "99"}, "n"),
    ({"size": "1000x1000"}, "size"),
    ({"size": "65x64"}, "size"),
    ({"steps": "0"}, "steps"),
    ({"response_format": "jpeg"}, "response_format"),
    ({"strength": "1.5"}, "strength"),
    ({"strength": "nan"}, "strength"),
    ({"n": "1e3"}, "n"),
    ({"seed": "-1"}, "seed"),
    ({"prompt": " "}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({"stream": "true"}, "stream"),
    ({"colour": "red"}, "colour"),
])
async def test_bad_fields_are_400s_naming_the_field(
    aiohttp_client: Any, build: Any, fields: dict[str, str | None], param: str,
) -> None:
    client, _ = await _client(aiohttp_client, build)
    resp = await client.post("/v1/images/edits", headers=auth("free"), data=form(fields))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("invalid_request_error", param)
    assert await _used(client, "free") == 0.0


async def test_the_request_shape_is_checked(aiohttp_client: Any, build: Any) -> None:
    client, _ = await _client(aiohttp_client, build)
    unauthenticated = await client.post("/v1/images/edits", data=form())
    assert unauthenticated.status == 401
    as_json = await client.post("/v1/images/edits", headers=auth("free"),
                                json={"prompt": "x", "image": base64.b64encode(png()).decode()})
    assert as_json.status == 400
    assert "multipart/form-data" in (await as_json.json())["error"]["message"]
    broken = await client.post(
        "/v1/images/edits", data=b"--xyz\r\n[True, None]--xyz--\r\n",
        headers={**auth("free"), "Content-Type": "multipart/form-data; boundary=xyz"})
    assert broken.status == 400
    assert "malformed" in (await broken.json())["error"]["message"]
    twice = form()
    twice.add_field("prompt", "again")
    repeated = await client.post("/v1/images/edits", headers=auth("free"), data=twice)
    assert (await repeated.json())["error"]["message"] == "'prompt' is given more than once."
    assert await _used(client, "free") == 0.0
