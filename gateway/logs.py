"""Logging: text for people, JSON lines for log shippers, and the access log.

The access log has one line per request: method, path template (ids replaced
by ``{id}``: no run or thread id, no query string, so nothing a client put in a
URL ends up in the log), status, bytes, duration, and for streams the stream
key and the resume outcome. Header values are never logged.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

LogFormat = Literal["text", "json"]

# What the stream handlers tell the access log about a request.
STREAM_KEY = web.RequestKey("gateway.stream", str)
RESUME_OUTCOME = web.RequestKey("gateway.resume", str)

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


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log hook, writing the gateway's own fields to ``gateway.access``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": path_template(request.path),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(duration * 1000, 1),
        }
        key = request.get(STREAM_KEY)
        if key is not None:
            fields["stream"] = key
            fields["resume"] = request.get(RESUME_OUTCOME)
        self.logger.info("%(method)s %(path)s %(status)s %(bytes)s bytes %(duration_ms)sms", fields, extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
