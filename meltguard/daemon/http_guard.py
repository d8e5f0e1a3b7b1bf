"""Request bodies the daemon refuses before (or instead of) reading them.

- A Content-Length over the body limit is answered 413 at once, as nginx and Envoy do, not
  after the client has sent (or failed to send within body_timeout) the whole thing. With
  `Expect: 100-continue` the 413 replaces the "100 Continue", so the client never sends it.
- A body whose gzip or deflate encoding is corrupt is the client's error: 400 in OpenAI's
  shape (aiohttp raises its decoder's error from `request.read()`, which was a 500 with a
  traceback in the log).
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.typedefs import Middleware

from meltguard.daemon.errors import error_response, from_http_exception
from meltguard.errors import invalid

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _too_large(max_bytes: int, length: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=length)


def body_guard(max_bytes: int, bounded: Iterable[str]) -> Middleware:
    """Middleware, inside the edge middleware (which turns what it raises into OpenAI's shape
    and closes the connection after a 413). `bounded`: the paths whose whole body is read at
    once under `max_bytes` (the JSON routes); uploads (multipart, /v1/images/edits) are
    bounded part by part by their own route."""
    paths = frozenset(bounded)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_bytes and request.path in paths:
            raise _too_large(max_bytes, length)
        try:
            return await handler(request)
        except (web.RequestPayloadError, ContentEncodingError, zlib.error):
            # aiohttp wraps its decoder's failure in RequestPayloadError; the others are that
            # failure raised bare. A malformed chunked body lands here too.
            encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip()
            if encoding:
                message = f"The request body is not valid {encoding} data."
            else:
                message = "The request body could not be read (malformed framing)."
            # The rest of the body is unreadable: end it here, or aiohttp reads it again after
            # the answer (to reuse the connection) and logs the same error as a traceback; and
            # close the connection, whose framing is lost.
            request.content.feed_eof()
            response = error_response(invalid("body", message))
            response.force_close()
            return response

    return guard


def expect_handler(max_bytes: int) -> ExpectHandler:
    """For routes with a body: refuse an over-limit `Expect: 100-continue` before the body."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        length = request.content_length
        if length is not None and length > max_bytes:
            response = error_response(from_http_exception(_too_large(max_bytes, length)))
            response.force_close()  # the body never comes: this connection is done
            return response
        # What aiohttp's default expect handler does.
        expectation = request.headers.get(hdrs.EXPECT, "")
        if request.version == HttpVersion11:
            if expectation.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expectation}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    return expect
