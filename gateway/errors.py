"""The gateway's error types and the one place they become HTTP responses.

Every error a client sees has the Agent Server API's own shape:
``{"detail": "..."}`` with ``application/json``. Nothing else turns
exceptions into responses.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.eventlog import StorageFull

log = logging.getLogger("gateway.errors")


class GatewayError(Exception):
    status = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(GatewayError):
    status = 400


class NotFound(GatewayError):
    status = 404


class PayloadTooLarge(GatewayError):
    status = 413


class Unprocessable(GatewayError):
    status = 422


class InvalidEventId(Unprocessable):
    """A Last-Event-ID the gateway cannot place."""


class UpstreamUnreachable(GatewayError):
    """No replica accepted the connection, or the upstream broke the exchange."""

    status = 502


class BadUpstreamResponse(GatewayError):
    status = 502


class NoHealthyReplica(GatewayError):
    status = 503


class StorageUnavailable(GatewayError):
    status = 503


class UpstreamTimeout(GatewayError, TimeoutError):
    status = 504


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"detail": detail}),
        content_type="application/json",
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc.status, exc.detail, exc.headers)
    except StorageFull as exc:
        return error_response(503, f"capture refused: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (413 body too large, 405, ...) in the API's shape.
        return error_response(exc.status, exc.reason)
    except ConnectionResetError:
        raise  # the client left; nothing to answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal gateway error (logged)")
