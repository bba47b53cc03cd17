"""The gateway's error types: each carries the HTTP status it means. ``gateway.responses`` turns
them into answers, once; nothing here knows HTTP beyond the number, so the core (hub, log,
upstream legs) raises and catches them without importing the web layer.

Upstream failures have their own types in ``gateway.upstream``, with the one rule for what they
mean to a caller (try again, or not).
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(GatewayError):
    """A request the gateway cannot pass on: its body broke off malformed (a bad chunk)."""

    status = 400


class NotFound(GatewayError):
    status = 404


class RequestTimeout(GatewayError):
    """The client did not send its request body in time."""

    status = 408


class PayloadTooLarge(GatewayError):
    status = 413


class Unprocessable(GatewayError):
    status = 422


class InvalidEventId(Unprocessable):
    """A Last-Event-ID the gateway cannot place."""


class TooManyConnections(GatewayError):
    """The public listener holds as many client connections as it is configured for."""

    status = 503


class StorageUnavailable(GatewayError):
    status = 503


class StreamBusy(GatewayError):
    """Another gateway process holds the stream's claim and has not begun it within pool_timeout."""

    status = 503


def describe(exc: BaseException) -> str:
    """An exception as one line of a log or a detail: its type, and its text when it has one."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__

