"""Answers the gateway makes itself, and the one place errors become HTTP responses.

Every error a client sees has the Agent Server API's own shape: ``{"detail": "..."}`` with
``application/json``. Nothing else turns exceptions into responses.

Once a response has started (its headers are on the wire) an error cannot become a second
response: the only honest signal left is to cut the connection, so a client never takes a
broken stream for a complete one. Handlers start responses with ``start_response`` so this
rule can see them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import orjson
from aiohttp import WSCloseCode, web
from aiohttp.http import StreamWriter

from gateway import native
from gateway.errors import GatewayError, describe
from gateway.eventlog import Entry, StorageError, StorageFull
from gateway.follower import ExpressWriter, StreamCut
from gateway.logs import CUT_AT, END, STARTED, AccessEnd
from gateway.sse import frame

log = logging.getLogger("gateway.responses")


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"detail": detail}),
        content_type="application/json",
        headers=headers,
    )


async def start_response(request: web.Request, response: web.StreamResponse) -> None:
    """Send a response's headers; from here on an error cuts the connection instead."""
    request[STARTED] = response
    await response.prepare(request)


def cut(request: web.Request, end: AccessEnd = "cut") -> None:
    """End a response whose headers are sent by dropping the connection: a clean end would look
    complete. ``end``: what the access log says (``error`` for a failure, ``cut`` on purpose)."""
    request[END] = end
    request[CUT_AT] = request.writer.output_size
    if request.transport is not None:
        request.transport.close()


# A write that leaves at most this much in the transport's buffer stays below its high-water mark
# (64 KiB), so it returns without waiting for the client: no deadline needs arming for it.
_UNBLOCKING_WRITE = 16 << 10
# Bigger writes go out in slices of about this size, waiting for the client between them: a replayed
# page (up to megabytes, shared by every client replaying it) is never copied whole into each
# client's buffer, so a thousand slow readers hold a thousand slices, not a thousand pages.
_SLICE = 64 << 10


class StallGuard:
    """Cuts a response's client once a write has waited on it ``stall`` seconds without it taking
    anything: a slow reader is never cut, only a stalled one. One per response, with one timer,
    moved only when it fires and finds the client took something meanwhile: a deadline moved at
    every slice the client took was a tenth of a replay storm's CPU (a timer made and one dropped
    each time). Made in the task that writes: the write waiting there is interrupted, as
    ``asyncio.timeout`` does, and says TimeoutError (what was written stays whole for ``cut``)."""

    __slots__ = ("stall", "fired", "_task", "_loop", "_since", "_waiting", "_timer")

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.fired = False
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._since = 0.0  # when the client last took something, or the waiting write began
        self._waiting = False
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A write that may wait on the client starts."""
        self._since, self._waiting = self._loop.time(), True
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self.stall, self._check)

    def took(self) -> None:
        """The client took what was written."""
        self._since = self._loop.time()

    def end(self) -> None:
        self._waiting = False

    def close(self) -> None:
        """The response is over: its timer goes now, not when it fires."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # armed again by the next write that may wait
        due = self._since + self.stall
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self.fired = True
            self._task.cancel()


async def send_body(request: web.Request, response: web.StreamResponse, data: bytes, guard: StallGuard,
                    boundary: bytes | None = None, stopping: Callable[[], bool] | None = None) -> None:
    """Write part of a started response; TimeoutError when the client stops reading (``guard``).

    A write into a nearly empty buffer cannot wait, so only a write that may wait is guarded. With
    ``boundary`` (b"\\n\\n" for SSE) every slice ends on one: a client cut for stalling then holds
    whole events only, never half of one, whatever it does with an event pending at the end of a body.
    ``stopping`` is asked between slices: once it says yes (the gateway is shutting down) the rest is
    not written (StreamCut). A replayed page is megabytes, minutes of a slow reader: a stop looked at
    only between pages fed it on to the page's end, or to the end of the shutdown's grace.
    """
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(data) <= _UNBLOCKING_WRITE:
        await response.write(data)
        return
    view, start = memoryview(data), 0
    guard.begin()
    try:
        while start < len(data):
            if start and stopping is not None and stopping():
                raise StreamCut("the gateway is shutting down")
            end = _slice_end(data, start, boundary)
            await response.write(view[start:end])  # a slice this big makes aiohttp drain after it
            start = end
            guard.took()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if guard.fired and task is not None and task.uncancel() == 0:  # its own cut, nobody else's cancel
            raise TimeoutError(f"the client took nothing for {guard.stall:g}s") from None
        raise
    finally:
        guard.end()


def express_writer(request: web.Request) -> ExpressWriter | None:
    """A started event-stream response's writer of live events straight from the commit (see
    ``gateway.follower.Follower``): it writes only what cannot wait (the client's buffer then holds
    at most ``_UNBLOCKING_WRITE``), so no deadline is needed, and says False otherwise; the events
    then reach the client through ``send_body``, deadline and all. It writes the transport itself,
    the events as ``gateway.sse.frame`` frames them, framed as aiohttp frames a body (chunked or
    not) and counted where aiohttp counts the bytes sent (the access log's ``bytes``). The gateway
    never compresses an event stream (which would need aiohttp's writer). None when the response
    has no connection left."""
    writer, transport = request.writer, request.transport
    if transport is None or not isinstance(writer, StreamWriter):
        return None
    return _ExpressWriter(transport, writer)


class _ExpressWriter:
    """``express_writer``'s writer: an object with slots, not a closure (a function and a cell per
    variable it holds), as a stream keeps it for hours."""

    __slots__ = ("transport", "writer", "chunked")

    def __init__(self, transport: asyncio.Transport, writer: StreamWriter) -> None:
        self.transport, self.writer, self.chunked = transport, writer, writer.chunked

    def __call__(self, entries: list[Entry]) -> bool:
        transport = self.transport
        if not entries or transport.is_closing() or transport.get_write_buffer_size() >= _UNBLOCKING_WRITE:
            return False  # refused before framing: the task frames what it is handed anyway
        wire = _wire(entries, self.chunked)
        # What send_body writes without a deadline, and nothing else: a bigger batch goes in slices
        # that end on event boundaries.
        if transport.get_write_buffer_size() + len(wire) > _UNBLOCKING_WRITE:
            return False
        transport.write(wire)
        self.writer.output_size += len(wire)
        return True


def _wire(entries: list[Entry], chunked: bool) -> bytes:
    """``frame``'s bytes of some entries (not none: an empty chunk ends a body), as one chunk of a
    chunked body when ``chunked``: in C, the events and the chunk in one go, one copy."""
    if native.ON:
        return native.frame_entries(entries, chunked)
    data = frame(entries)
    return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data


def _slice_end(data: bytes, start: int, boundary: bytes | None) -> int:
    end = start + _SLICE
    if end >= len(data) or boundary is None:
        return min(end, len(data))
    last = data.rfind(boundary, start, end)
    if last >= 0:
        return last + len(boundary)
    after = data.find(boundary, end)  # one event longer than a slice: the slice is that event
    return len(data) if after < 0 else after + len(boundary)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionResetError:
        raise  # the client left; nothing to answer
    except Exception as exc:
        return failed(request, exc)


def failed(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer to a request whose handler raised ``exc``: an error in the API's shape, or, once
    the response has started, the started response on a connection cut here."""
    started: web.StreamResponse | None = request.get(STARTED)
    if started is not None and started.prepared:
        log.error("%s %s failed after its response started; connection cut: %s",
                  request.method, request.path, describe(exc), exc_info=not isinstance(exc, GatewayError))
        cut(request, "error")
        return started  # already sent: aiohttp's end-of-response on a cut transport is a no-op
    return _as_response(request, exc)


def _as_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, GatewayError):
        return error_response(exc.status, exc.detail, exc.headers)
    if isinstance(exc, StorageFull):
        return error_response(503, f"capture refused: {exc}")
    if isinstance(exc, StorageError):
        return error_response(503, f"event log unavailable: {exc}")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        # aiohttp's own refusals (413 body too large, 405, ...) in the API's shape.
        return error_response(exc.status, exc.reason)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal gateway error (logged)")


def close_reason(text: str) -> bytes:
    """``text`` as a close frame's reason: at most 123 bytes of UTF-8 (a control frame's payload is
    125 with the code), cut on a character's boundary."""
    return text.encode()[:123].decode(errors="ignore").encode()


class ClientSocket(web.WebSocketResponse):
    """A client's WebSocket, let go with a close frame when it stops answering pings.

    aiohttp drops such a client without one (its heartbeat closes the TCP connection), so a client
    that is only slow (a busy event loop, a link that stalled and recovers) sees 1006 and no reason,
    as for a crash. While the connection can still carry it, the frame goes first: 1011 and the
    reason, as the ``websockets`` library closes on a keepalive timeout.
    """

    def _pong_not_received(self) -> None:
        try:
            self._say_no_pong()
        except AttributeError:  # an aiohttp whose internals differ: its own drop, without the frame
            pass
        super()._pong_not_received()

    def _say_no_pong(self) -> None:
        transport = self._req.transport if self._req is not None else None
        if (transport is not None and not transport.is_closing() and not self._closed and not self._closing
                and not transport.get_write_buffer_size()):
            # Written whole and at once (aiohttp writes its frames so too, and this runs between
            # them): the connection is closed right after, which sends what is buffered first.
            reason = f"no pong within {self._pong_heartbeat:g}s".encode()
            transport.write(bytes([0x88, 2 + len(reason)]) + WSCloseCode.INTERNAL_ERROR.to_bytes(2, "big") + reason)
            if transport.get_write_buffer_size():
                # The peer takes nothing more (its window is shut): a close would wait to flush the
                # frame for as long as it stays so, holding the connection this lets go of.
                transport.abort()
