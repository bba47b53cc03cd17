"""The public listener's connections: a cap on how many, a deadline for request headers, and
malformed requests answered in the API's shape.

aiohttp answers a request it cannot parse with a ``text/plain`` 400 that quotes
what it choked on (a header line: credentials leak that way) and logs a
traceback at ERROR each time; it has no deadline for headers (a client that
sends one byte a second holds its connection forever) and no connection cap.
``ClientConnection`` is aiohttp's request handler with those three changed;
``GatewayRunner`` is the app runner that uses it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import HttpVersion10, web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.config import Clients
from gateway.errors import BadRequest, TooManyConnections
from gateway.logs import END
from gateway.responses import error_response, failed

log = logging.getLogger("gateway.listener")


@dataclass
class ConnectionCount:
    """Open client connections on one listener (owned by its runner)."""

    limit: int
    open: int = 0


@dataclass
class StopBy:
    """When the listener's stop must be over (the loop's time), once it began (owned by its runner):
    ``shutdown_grace`` is one budget for the app's own shutdown steps (client streams cut, WebSocket
    sessions closed) and the requests in flight, not one for each."""

    at: float | None = None


class _Messages(list[Any]):
    """The requests a connection has parsed and not yet handled: the deque aiohttp keeps per
    connection, as a list. A connection holds one request at a time (a stream, for hours), and an
    empty deque is 760 bytes against a list's 64."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


# The buffer of every request body read to its end: always empty (a maxlen of 0 keeps nothing), so
# one serves them all. aiohttp feeds a body nothing after its end (it asserts so).
_READ_OUT: collections.deque[bytes] = collections.deque(maxlen=0)


def body_read(content: StreamReader) -> None:
    """A request body was read to its end: its reader lets go of its buffer. aiohttp keeps the
    reader as long as its request, hours for a run streamed, and an empty deque is ~600 bytes of
    an idle stream's budget."""
    if content.at_eof() and content is not EMPTY_PAYLOAD:
        content._buffer = _READ_OUT


class _Answered:
    """What aiohttp's request loop keeps of an answered response: whether the connection stays open."""

    __slots__ = ("keep_alive",)

    def __init__(self, keep_alive: bool | None) -> None:
        self.keep_alive = keep_alive


class ClientConnection(RequestHandler):
    """One client connection (aiohttp's protocol, with the gateway's limits)."""

    # Slots: an idle stream keeps its connection for hours; no instance dict beside aiohttp's slots.
    __slots__ = ("_clients", "_count", "_stop_by", "_counted", "over_cap", "_header_deadline", "_between_requests",
                 "_body")

    def __init__(self, manager: Any, *, clients: Clients, count: ConnectionCount, stop_by: StopBy,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._messages = cast(Any, _Messages())  # used as a deque: append, popleft, len, truth
        self._clients = clients
        self._count = count
        self._stop_by = stop_by
        self._counted = False
        self.over_cap = False  # read by refusal: this connection is answered with a 503
        self._header_deadline: asyncio.TimerHandle | None = None
        self._between_requests = True
        self._body: StreamReader | None = None  # the body of the last request parsed

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._count.open += 1
        self._counted = True
        self.over_cap = self._count.open > self._count.limit
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._count.open -= 1
            self._counted = False
        self._disarm()
        self._body = None
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """The request in flight gets what is left of ``timeout`` (shutdown_grace, counted from the start
        of the listener's stop: ``StopBy``) in all, then its handler is cancelled.
        aiohttp waits ``timeout``, then only fails the request's body and waits ``timeout`` again
        before it cancels: a handler waiting on a silent upstream held the process twice its grace
        (a worker past the supervisor's margin was SIGKILLed).

        The grace is waited here, and the handler cancelled, before aiohttp's own wait begins: a
        cancel on a timer of its own met aiohttp's wait timing out in the same loop turn, and the
        handler's end then resolved aiohttp's waiter after that timeout had cancelled it (an
        "Unhandled exception ... InvalidStateError" traceback per request)."""
        task = self._task_handler
        if timeout is not None and task is not None and not task.done() and self._request_in_progress:
            self._force_close = True  # aiohttp's first step too: no request after this one on the connection
            left = timeout
            if self._stop_by.at is not None:
                left = max(0.0, min(timeout, self._stop_by.at - asyncio.get_running_loop().time()))
            done, _ = await asyncio.wait([task], timeout=left)
            if not done:
                if (request := self._current_request) is not None:
                    request[END] = "cut"  # the gateway gave up on it: its client did not hang up
                task.cancel()  # aiohttp's wait below then sees the handler end, as after a graceful finish
        await super().shutdown(timeout)

    def data_received(self, data: bytes) -> None:
        before, queued = self._request_count, len(self._messages)
        if self._between_requests:
            self._arm()  # the first bytes of a request: its headers must be in within header_timeout
        super().data_received(data)
        if self._request_count != before:  # a request's headers are complete
            self._between_requests = False
            self._disarm()
            self._fail_broken_body(cast(list[Any], self._messages)[queued:])

    def _fail_broken_body(self, parsed: list[Any]) -> None:
        """A body that breaks off malformed (a bad chunk) while its handler reads it: aiohttp's parser
        queues a 400 for after that request and leaves the body open, so the handler waited out
        body_timeout and answered 408. Its read fails now instead: a 400, and the connection closes
        (the parser cannot go on). A request queued behind another (pipelined) gets the same 400 when
        its turn comes; the one being answered before it is not cut for it."""
        for entry in parsed:
            message, payload = entry
            if isinstance(message, RawRequestMessage):
                self._body = payload
            elif self._body is not None and not self._body.is_eof():
                log.info("refused a request whose body broke off malformed")
                self._body.set_exception(BadRequest("malformed HTTP request body", headers={"Connection": "close"}))
                self._body.feed_eof()
                # Its handler answers it, once (a 400 that ends the connection: finish_response),
                # being answered now or queued (pipelined): not the parser's 400 too.
                if entry in self._messages:
                    self._messages.remove(entry)

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            # aiohttp's router answers a request target that is no path (``OPTIONS *``, CONNECT's
            # host:port, ``http://host`` without one) itself, before the gateway's route: in the API's shape.
            resp = failed(request, resp)
        # A response that says Connection: close (an unread or broken body: the parser cannot go on),
        # or the answer to a request whose body broke while it waited its turn (pipelined), ends the
        # connection once written: aiohttp would read on, or linger 10 s over a body nobody reads.
        closing = (resp.headers.get("Connection", "").lower() == "close"
                   or isinstance(request.content.exception(), BadRequest))
        sent, reset = await super().finish_response(request, resp, start_time)
        if closing:
            self.force_close()
        self._between_requests = True
        self._body = None  # it holds this connection: kept, it would make a reference cycle per request
        # aiohttp's request loop keeps what this returns until the connection's next request is
        # answered, and reads only its keep_alive: the response itself (headers, body, writer) would
        # stay alive beside the next one, a stream held for hours (a client creates its thread, then
        # streams a run on the same connection).
        return cast(web.StreamResponse, _Answered(sent.keep_alive)), reset

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = asyncio.get_running_loop().call_later(
                self._clients.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport is not None and self._between_requests:
            log.info("closed a client connection that did not send its request headers within %gs",
                     self._clients.header_timeout)
            self.transport.close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request that cannot be handled: a JSON answer that quotes nothing of the request.

        One INFO line at most, naming only the kind of problem: never header values.
        """
        if request.writer.output_size > 0:  # part of a response is out: it cannot be replaced
            raise ConnectionError("response already started; connection closed")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            detail = "internal gateway error (logged)"
        else:
            if isinstance(exc, LineTooLong) or "too many headers" in (message or "").lower():
                status, detail = 431, "request header fields too large"
            else:
                detail = "malformed HTTP request"
            log.info("refused a malformed request from %s: %s", request.remote,
                     exc.__class__.__name__ if exc is not None else status)
        resp = error_response(status, detail)
        resp.force_close()
        return resp


class ClientServer(web.Server):
    """aiohttp's low-level server, making ``ClientConnection``s."""

    def __init__(self, *args: Any, clients: Clients, count: ConnectionCount, stop_by: StopBy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients = clients
        self._count = count
        self._stop_by = stop_by

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, loop=self._loop, clients=self._clients, count=self._count,
                                stop_by=self._stop_by, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An app runner whose server makes ``ClientConnection``s."""

    def __init__(self, app: web.Application, *, clients: Clients, **kwargs: Any) -> None:
        # auto_decompress off: a request body goes upstream as the client sent it, Content-Encoding
        # and all (the upstream decides what a gzip body means). Decoded here, it went with the
        # client's Content-Length and Content-Encoding, which no longer described it (a 504 after
        # read_timeout), and a body that did not decode was a 500 or a 400 the upstream never gives.
        kwargs.update(max_line_size=clients.max_header_bytes, max_field_size=clients.max_header_bytes,
                      max_headers=clients.max_headers, auto_decompress=False)
        super().__init__(app, **kwargs)
        self.count = ConnectionCount(clients.max_connections)
        self.stop_by = StopBy()
        self._grace: float | None = kwargs.get("shutdown_timeout")
        self._clients = clients
        self._server_kwargs = kwargs

    async def shutdown(self) -> None:
        """The app's shutdown steps, the first of the listener's stop once it stopped accepting: the
        grace is counted from here."""
        if self._grace is not None:
            self.stop_by.at = asyncio.get_running_loop().time() + self._grace
        await super().shutdown()

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup, and its request handler
        kwargs = {k: v for k, v in self._server_kwargs.items() if k not in ("shutdown_timeout", "handle_signals")}
        return ClientServer(plain.request_handler, request_factory=plain.request_factory,
                            clients=self._clients, count=self.count, stop_by=self.stop_by, **kwargs)


_NO_VERSION = orjson.dumps({"detail": "malformed HTTP request: no HTTP version"})
_NO_VERSION_RESPONSE = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(_NO_VERSION)).encode() + b"\r\nServer: " + SERVER_SOFTWARE.encode()
                        + b"\r\nConnection: close\r\n\r\n" + _NO_VERSION)


def refusal(request: web.Request) -> web.StreamResponse | None:
    """The answer to a request refused before anything else looks at it; None: not refused.

    A connection beyond ``clients.max_connections`` gets a 503 saying so, and is closed.
    A request line without an HTTP version (HTTP/0.9 to aiohttp, which would answer with an
    ``HTTP/0.9`` status line no client parses) gets a 400 in HTTP/1.1, written as is.
    """
    if request.version < HttpVersion10:
        log.info("refused a request without an HTTP version from %s", request.remote)
        if request.transport is not None:
            request.transport.write(_NO_VERSION_RESPONSE)
            request.transport.close()
        return web.Response(status=400)  # the connection is closed: this one is never sent
    if getattr(request.protocol, "over_cap", False):
        resp = error_response(TooManyConnections.status,
                              "the gateway holds as many client connections as it is configured for "
                              "(clients.max_connections); try again later", {"Retry-After": "1"})
        resp.force_close()
        return resp
    return None

