"""POST /v1/images/edits: the generations route's admission, quotas, headers and errors, with
a picture (and maybe a mask) to start from.

The upload is read and checked before the gate sees the request, so a refused upload costs
no quota; the admitted job is the one a generation of the same output size, n and steps
would get (same cost, same degradation), and the picture joins it after admission.
"""

from __future__ import annotations

from aiohttp import web

from meltguard.daemon.admission_events import set_endpoint
from meltguard.daemon.app import image_caller, serve_images
from meltguard.daemon.edit_request import read_edit_request


async def create_edit(request: web.Request) -> web.Response:
    set_endpoint("edits")
    runtime, caller = image_caller(request)
    parsed = await read_edit_request(request, runtime.loaded.policy.limits,
                                     seconds=runtime.settings.body_timeout)
    return await serve_images(request, runtime, caller, parsed.ask, model=parsed.model,
                              response_format=parsed.response_format, edit=parsed.edit)
