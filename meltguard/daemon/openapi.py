"""The OpenAPI document served at /openapi.json; schemathesis tests the daemon against it.

Built from the policy in force, so the limits it states (n, steps, prompt length) and
whether a key is required are the ones the daemon enforces right now. What a schema cannot
say (sizes in multiples of 8 within max_size, refusals under GPU pressure) is in the
descriptions and in the 400/429/503 responses.
"""

from __future__ import annotations

from typing import Any

from meltguard import __version__
from meltguard.admission.policy import Limits, Policy
from meltguard.daemon.edit_request import EDIT_IGNORED, MAX_UPLOAD_PIXELS, MIN_STRENGTH
from meltguard.daemon.image_request import IGNORED, MAX_SEED, QUALITIES, RESPONSE_FORMATS
from meltguard.errors import ErrorCode

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string",
                         "enum": ["invalid_request_error", "rate_limit_error", "server_error"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
            },
        }
    },
}

_REQUEST_ID = {"x-request-id": {"description": "Echoes a well-formed incoming x-request-id, "
                                               "else a new one.",
                                "schema": {"type": "string"}}}
_RETRY = {
    "Retry-After": {"required": True, "description": "Seconds, 1 to 60.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "retry-after-ms": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
}
_RATELIMIT = {
    name: {"schema": {"type": "string"}}
    for name in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                 "x-ratelimit-reset-requests", "RateLimit-Policy", "RateLimit")
}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    headers = {**_REQUEST_ID, **(_RETRY if retry else {})}
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema_ref: str, description: str, headers: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID, **(headers or {})},
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


_401 = _error("invalid_api_key: missing, unknown or malformed key; one shape for all three.")
_429 = _error("rate_limit_exceeded or daily_quota_exceeded (x-should-retry: false).", retry=True)
_503 = _error("server_overloaded, queue_timeout, gpu_out_of_memory, quota_store_unavailable "
              "or shutting_down.", retry=True)


def _image_request(limits: Limits) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars,
                       "pattern": "\\S",
                       "description": "Not blank; no NUL characters or lone surrogates."},
            "model": {**nullable_string, "description": "Must name the model in /v1/models."},
            "n": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_n},
            "size": {"type": ["string", "null"],
                     "pattern": "^(auto|[1-9][0-9]{0,5}x[1-9][0-9]{0,5})$",
                     "description": f"WIDTHxHEIGHT in multiples of 8, within {limits.max_size} "
                                    f"(default {limits.default_size})."},
            "response_format": {"type": ["string", "null"], "enum": [*RESPONSE_FORMATS, None]},
            "quality": {"type": ["string", "null"], "enum": [*QUALITIES, None]},
            "user": nullable_string,
            "output_format": {"type": ["string", "null"], "enum": ["png", None]},
            "stream": {"type": ["boolean", "null"], "enum": [False, None]},
            "steps": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_steps,
                      "description": "meltguard extension: denoising steps "
                                     f"(default {limits.default_steps})."},
            "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED,
                     "description": "meltguard extension: same seed, same pixels."},
            **{name: {"description": "Accepted for OpenAI compatibility and ignored."}
               for name in IGNORED},
        },
    }


def _edit_request(limits: Limits) -> dict[str, Any]:
    """multipart/form-data: every value travels as text or a file."""
    image = {"type": "string", "format": "binary",
             "description": f"PNG, JPEG or WebP, at most {limits.max_upload_bytes} bytes and "
                            f"{MAX_UPLOAD_PIXELS} pixels; larger pictures are shrunk to fit "
                            f"{limits.max_size}."}
    return {
        "type": "object",
        "required": ["image", "prompt"],
        "additionalProperties": False,
        "properties": {
            "image": image,
            "mask": {"type": "string", "format": "binary",
                     "description": "PNG with alpha, the image's size: transparent pixels "
                                    "mark where to edit (inpainting). Without it the whole "
                                    "picture is redrawn (image-to-image)."},
            "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars,
                       "pattern": "\\S"},
            "model": {"type": "string"},
            "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
            "size": {"type": "string", "pattern": "^(auto|[1-9][0-9]{0,5}x[1-9][0-9]{0,5})$",
                     "description": "WIDTHxHEIGHT in multiples of 8 within "
                                    f"{limits.max_size}; default: the picture's size."},
            "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
            "quality": {"type": "string", "enum": list(QUALITIES)},
            "user": {"type": "string"},
            "output_format": {"type": "string", "enum": ["png"]},
            "stream": {"type": "string", "enum": ["false"]},
            "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps,
                      "description": "meltguard extension: denoising steps, charged as for a "
                                     "generation."},
            "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
            "strength": {"type": "number", "minimum": MIN_STRENGTH, "maximum": 1,
                         "description": "meltguard extension: how far from the picture the "
                                        "result may move (default 0.8, or 1.0 with a mask)."},
            **{name: {"type": "string", "description": "Accepted for OpenAI compatibility "
                                                       "and ignored."}
               for name in EDIT_IGNORED},
        },
    }


_IMAGES_RESPONSE = {
    "type": "object",
    "required": ["created", "data", "usage"],
    "properties": {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"b64_json": {"type": "string"}, "url": {"type": "string"},
                               "revised_prompt": {"type": ["string", "null"]}},
            },
        },
        "usage": {
            "type": "object",
            "required": ["images", "size", "steps", "cost"],
            "properties": {"images": {"type": "integer"}, "size": {"type": "string"},
                           "steps": {"type": "integer"}, "cost": {"type": "number"},
                           "energy_j": {"type": "number", "description":
                                        "meltguard extension: this request's share of the "
                                        "GPU's energy while its batch ran, in joules; absent "
                                        "where the telemetry reports neither energy nor power"}},
        },
    },
}

_QUOTA = {
    "type": "object",
    "required": ["tenant", "tier", "level", "windows"],
    "properties": {
        "tenant": {"type": "string"},
        "tier": {"type": "string"},
        "level": {"type": "string"},
        "windows": {"type": "array", "items": {
            "type": "object",
            "required": ["window", "limit", "used", "remaining", "resets_at",
                         "resets_in_seconds"],
            "properties": {"window": {"type": "integer"}, "limit": {"type": "number"},
                           "used": {"type": "number"}, "remaining": {"type": "number"},
                           "resets_at": {"type": "integer"},
                           "resets_in_seconds": {"type": "number"}}}},
    },
}

_MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                           "created": {"type": "integer"}, "owned_by": {"type": "string"}}}},
    },
}


def _key_security(policy: Policy) -> list[dict[str, list[str]]]:
    # Anonymous callers are served on anonymous_tier; a policy without keys ignores the header.
    if policy.anonymous_tier is not None:
        return [{"bearer": []}, {}]
    return [{"bearer": []}]


def openapi_document(policy: Policy | None = None) -> dict[str, Any]:
    limits = policy.limits if policy is not None else Limits()
    security = _key_security(policy) if policy is not None else [{"bearer": []}, {}]
    public: list[dict[str, list[str]]] = []
    admin: list[dict[str, list[str]]] = [{"admin": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "meltguard", "version": __version__,
                 "description": "OpenAI-compatible image generation behind GPU-aware admission."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key whose SHA-256 is in the policy."},
                "admin": {"type": "http", "scheme": "bearer",
                          "description": "The admin key (admin_key_sha256); admin routes also "
                                         "answer loopback peers only unless --admin-remote."},
            },
            "schemas": {
                "Error": _ERROR,
                "ImageRequest": _image_request(limits),
                "ImageEditRequest": _edit_request(limits),
                "ImagesResponse": _IMAGES_RESPONSE,
                "Quota": _QUOTA,
                "Models": _MODELS,
                "Object": {"type": "object"},
            },
        },
        "security": security,
        "paths": {
            "/v1/images/generations": {
                "post": {
                    "operationId": "createImage",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ImageRequest"}}},
                    },
                    "responses": {
                        "200": _json("ImagesResponse", "The generated images; "
                                     "x-meltguard-degraded names what pressure changed.",
                                     _RATELIMIT),
                        "400": _error("invalid_request_error with the offending param."),
                        "401": _401,
                        "408": _error("request_timeout: the body did not arrive in time."),
                        "413": _error("payload_too_large: body over the size limit."),
                        "429": _429,
                        "500": _error("generation_failed: the engine failed; quota refunded."),
                        "503": _503,
                    },
                }
            },
            "/v1/images/edits": {
                "post": {
                    "operationId": "createImageEdit",
                    "description": "Admitted, charged, degraded and shed exactly like a "
                                   "generation of the same output size, n and steps; the "
                                   "upload is checked first, so a refused one costs nothing.",
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {
                            "schema": {"$ref": "#/components/schemas/ImageEditRequest"}}},
                    },
                    "responses": {
                        "200": _json("ImagesResponse", "The edited images; "
                                     "x-meltguard-degraded names what pressure changed.",
                                     _RATELIMIT),
                        "400": _error("invalid_request_error with the offending param "
                                      "(image, mask, prompt, ...): a file too large, not an "
                                      "image, too many pixels, a mask without alpha or of "
                                      "another size, or an edit this model cannot run."),
                        "401": _401,
                        "408": _error("request_timeout: the body did not arrive in time."),
                        "413": _error("payload_too_large: body over the size limit."),
                        "429": _429,
                        "500": _error("generation_failed: the engine failed; quota refunded."),
                        "503": _503,
                    },
                }
            },
            "/v1/images/files/{name}": {
                "get": {
                    "operationId": "getImageFile",
                    "security": public,
                    "description": "Images made with response_format=url, for a limited time.",
                    "parameters": [{"name": "name", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "PNG", "content": {"image/png": {}}},
                        "404": _error("Unknown or expired image."),
                    },
                }
            },
            "/v1/models": {"get": {"operationId": "listModels", "responses": {
                "200": _json("Models", "Models served."), "401": _401}}},
            "/v1/quota": {"get": {"operationId": "getQuota", "responses": {
                "200": _json("Quota", "The caller's remaining quota per window.", _RATELIMIT),
                "401": _401,
                "503": _503}}},
            "/healthz": {"get": {"operationId": "healthz", "security": public, "responses": {
                "200": _json("Object", "The process is alive (status ok or draining).")}}},
            "/readyz": {"get": {"operationId": "readyz", "security": public, "responses": {
                "200": _json("Object", "Ready: model warm, accepting."),
                "503": _json("Object", "Not ready; details say why.")}}},
            "/metrics": {"get": {"operationId": "metrics", "security": public, "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": public,
                                      "responses": {"200": _json("Object", "This document.")}}},
            "/admin/state": {"get": {"operationId": "adminState", "security": admin,
                                     "responses": {
                "200": _json("Object", "Pressure, queues, policy and process state."),
                "401": _error("The admin key is missing or wrong."),
                "403": _error("permission_denied: not a loopback peer.")}}},
            "/admin/reload": {"post": {"operationId": "adminReload", "security": admin,
                                       "responses": {
                "200": _json("Object", "The policy file was reloaded."),
                "400": _error("The file is invalid; the previous policy stays in force."),
                "401": _error("The admin key is missing or wrong."),
                "403": _error("permission_denied: not a loopback peer.")}}},
        },
    }
