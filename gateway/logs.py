"""Logging: text for people, JSON lines for log shippers, and the access log.

The access log has one line per request: method, path template (ids replaced
by ``{id}``: no run or thread id, no query string, so nothing a client put in a
URL ends up in the log), status, bytes, duration, how the request ended, and for
streams the stream key and the resume outcome. Header values are never logged.
aiohttp writes no line for a request whose client hung up (its handler is
cancelled): ``client_left`` writes that one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Literal

import orjson
from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger

LogFormat = Literal["text", "json"]

# How a request ended, in its access log line:
#   completed    the response was sent whole (its status says what it was);
#   client_gone  the client hung up first;
#   cut          the gateway cut the connection on purpose: a reader too slow, a capture that ended
#                under the stream, the shutdown's grace ran out (the client is expected to resume);
#   error        a failure after the response started (an upstream body broken, an error): cut.
AccessEnd = Literal["completed", "client_gone", "cut", "error"]

# What the handlers tell the access log about a request.
STREAM_KEY = web.RequestKey("gateway.stream", str)
RESUME_OUTCOME = web.RequestKey("gateway.resume", str)
END = web.RequestKey("gateway.end", str)  # an AccessEnd, when not "completed"
STARTED = web.RequestKey("gateway.started", web.StreamResponse)  # the response whose headers went out
CUT_AT = web.RequestKey("gateway.cut_at", int)  # bytes sent when the gateway cut the connection
# nginx's status for "client closed request": a client gone before any response started.
CLIENT_CLOSED = 499
# A request the gateway's shutdown gave up on before any response started: unavailable, as /readyz says.
SHUT_OUT = 503

_ID_SEGMENT = re.compile(r"/(?:[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}|\d+)(?=/|$)")
# The fields of a record that are not extra (anything else a caller passed is printed too).
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def path_template(path: str) -> str:
    """``/threads/<uuid>/runs/<uuid>/stream`` -> ``/threads/{id}/runs/{id}/stream``."""
    return _ID_SEGMENT.sub("/{id}", path)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD:
                doc[k] = v
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _access(logger: logging.Logger, request: web.BaseRequest, status: int, nbytes: int, duration: float,
            end: AccessEnd) -> None:
    """The one access log line."""
    fields: dict[str, Any] = {
        "method": request.method,
        "path": path_template(request.path),
        "status": status,
        "bytes": nbytes,
        "duration_ms": round(duration * 1000, 1),
        "end": end,
    }
    key = request.get(STREAM_KEY)
    if key is not None:
        fields["stream"] = key
        fields["resume"] = request.get(RESUME_OUTCOME)
    logger.info("%(method)s %(path)s %(status)s %(bytes)s bytes %(duration_ms)sms end=%(end)s", fields, extra=fields)


def _sent(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The bytes that went on the wire. aiohttp sets ``body_length`` only at a clean end
    (``write_eof``); a response cut before it counts what its writer had sent at the cut (aiohttp
    then still tries the end of the body on the closed connection, and counts that too)."""
    cut_at: int | None = request.get(CUT_AT)
    if cut_at is not None:
        return cut_at
    return max(response.body_length, request.writer.output_size)


def _end(request: web.BaseRequest) -> AccessEnd:
    end = request.get(END)
    return end if end == "client_gone" or end == "cut" or end == "error" else "completed"


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log hook, writing the gateway's own fields to ``gateway.access``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        _access(self.logger, request, response.status, _sent(request, response), duration, _end(request))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


_ACCESS = logging.getLogger("gateway.access")


def _closed_cleanly(ws: web.WebSocketResponse) -> bool:
    """A WebSocket session ended by a close frame (from either side), not by a dropped connection."""
    return ws.close_code not in (None, WSCloseCode.ABNORMAL_CLOSURE)


def client_left(request: web.BaseRequest, began: float) -> int:
    """A request whose handler was cancelled because its client hung up, or because the shutdown's
    grace ran out (``gateway.listener`` marks it cut): aiohttp writes no access line for it, so this
    does (``began``: the loop's time when the request came in). Returns its status, as the line says
    it: the response's if it started, else 499 (503 for one the shutdown cut)."""
    started = request.get(STARTED)
    status: int = started.status if started else SHUT_OUT if request.get(END) == "cut" else CLIENT_CLOSED
    if isinstance(started, web.WebSocketResponse) and _closed_cleanly(started):
        request[END] = request.get(END, "completed")  # the client hung up after the closing handshake
    request[END] = request.get(END, "client_gone")
    if _ACCESS.isEnabledFor(logging.INFO):
        _access(_ACCESS, request, status, request.writer.output_size if started else 0,  # bytes: as aiohttp counts
                asyncio.get_running_loop().time() - began, _end(request))
    return status


def client_reset(request: web.BaseRequest) -> web.StreamResponse:
    """What aiohttp logs for a request whose client reset the connection under its handler."""
    request[END] = "client_gone"
    sent = request.get(STARTED)
    return web.Response(status=CLIENT_CLOSED) if sent is None else sent


def answered(request: web.BaseRequest, resp: web.StreamResponse) -> web.StreamResponse:
    """Marks how a request its handler answered ended, for aiohttp's access line; returns ``resp``."""
    if isinstance(resp, web.WebSocketResponse):  # closed either way once it returns: the close says how
        if not _closed_cleanly(resp):
            request[END] = request.get(END, "client_gone")
    elif END not in request and (request.transport is None or request.transport.is_closing()):
        request[END] = "client_gone"  # a handler that saw the client go and returned
    return resp
