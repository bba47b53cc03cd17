"""Transparent forwarding: headers in and out, and streaming a body through unchanged.

What the upstream says reaches the client as it said it: its headers (but for
hop-by-hop ones) and its body, byte for byte; nothing is added that it did not
send (not even a default ``Content-Type``). A client that stops reading for
``clients.write_timeout`` is cut, so it cannot hold an upstream connection forever.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import zlib
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import agentapi
from gateway.config import Clients
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout
from gateway.listener import body_read
from gateway.logs import END
from gateway.responses import ClientSocket, StallGuard, close_reason, cut, error_response, send_body, start_response
from gateway.streamclient import LegResponse
from gateway.upstream import (Answer, AnswerBody, BadUpstreamResponse, Kind, Target, UpstreamError, Upstreams,
                              as_upstream_error)

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


def _hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    named = {h.strip().lower() for v in headers.getall("Connection", []) for h in v.split(",")}
    return HOP_BY_HOP | named


def rewrite_location(value: str, target: Target) -> str:
    """Keep Location/Content-Location pointing at the gateway, under the route's prefix."""
    if value.startswith("/"):
        return target.client_path(value)
    try:
        url = URL(value)
    except ValueError:
        return value
    if url.is_absolute() and target.pool.owns(url):
        return target.client_path(url.raw_path_qs if url.raw_path else "/")
    return value


def client_headers(resp: Answer, target: Target, *, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """The upstream's response headers as the client should get them."""
    headers = resp.headers  # once: a leg's may be parsed anew on each read (LegResponse.headers)
    skip = _hop_by_hop(headers) | {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in skip:
            continue
        if lk in ("location", "content-location"):
            v = rewrite_location(v, target)
        out.add(k, v)
    return out


class UpstreamHeaders(web.StreamResponse):
    """Headers as the upstream sent them: aiohttp adds no ``Content-Type`` the upstream did not send."""

    async def _prepare_headers(self) -> None:
        had_type = hdrs.CONTENT_TYPE in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall(hdrs.CONTENT_TYPE, None)


class RelayedResponse(UpstreamHeaders):
    """An upstream response streamed through."""


class RelayedBody(UpstreamHeaders, web.Response):
    """An upstream response the gateway read whole before answering (a background run's JSON that names
    no run in its Content-Location)."""


class Forwarder:
    """Forwards any request to its upstream and streams the answer back."""

    def __init__(self, upstreams: Upstreams, clients: Clients, max_message: int, heartbeat: float) -> None:
        self.upstreams = upstreams
        self.clients = clients
        # streams.max_request_body: the largest request body, forwarded or read here, and the largest
        # WebSocket message (held whole: bounded as a request body).
        self.max_body = self.max_message = max_message
        # WebSocket clients are pinged this often: the upstream's pings are answered by the gateway, so
        # only the gateway can find a client that vanished and let go of its upstream socket. And the
        # upstreams: the client's pings are answered by the gateway too.
        self.heartbeat = heartbeat
        # The proxied WebSocket sessions: for each, a future done when the gateway stops, and one
        # done once the session closed (``going_away``).
        self._sessions: dict[asyncio.Future[None], asyncio.Future[None]] = {}
        self._going_away = False

    async def going_away(self, timeout: float) -> None:
        """The gateway stops: close every proxied WebSocket session on both sides with 1001 (going
        away), and wait (at most ``timeout``) until they are closed. Before aiohttp's own shutdown,
        which stops reading the clients' sockets: a close frame sent then never hears its answer,
        and a session left to it is held for the grace and then dropped without a close frame."""
        self._going_away = True
        for stop in self._sessions:
            if not stop.done():
                stop.set_result(None)
        if self._sessions:
            await asyncio.wait(list(self._sessions.values()), timeout=timeout)

    def upstream_headers(self, request: web.Request, *, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
        """The client's headers as the upstream should get them.

        ``X-Forwarded-Host``/``-Proto`` say what the gateway saw, unless the peer is a
        proxy the operator trusts (``clients.trusted_proxies``): a client cannot make the
        upstream believe it came in over HTTPS, or for another host.
        """
        skip = _hop_by_hop(request.headers) | {"host"} | {d.lower() for d in drop}
        out = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in skip)
        peer = request.remote or ""
        # Several lines of one header are one list (RFC 9110, 5.3): every hop of the chain is kept.
        prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        trusted = self._trusted(peer)
        out["X-Forwarded-Proto"] = (request.headers.get("X-Forwarded-Proto") if trusted else None) or request.scheme
        out["X-Forwarded-Host"] = (request.headers.get("X-Forwarded-Host") if trusted else None) or request.host
        return out

    def _trusted(self, peer: str) -> bool:
        if not self.clients.trusted_proxies or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.clients.trusted_proxies)

    def check_headers(self, request: web.Request) -> CIMultiDict[str]:
        """The client's headers for a quick GET the gateway makes on its behalf (no body, JSON answer)."""
        headers = self.upstream_headers(request, drop=("Last-Event-ID", "Content-Length", "Content-Type", "Accept"))
        headers["Accept"] = "application/json"
        return headers

    async def open(self, request: web.Request, target: Target, *, data: Any = None,
                   headers: CIMultiDict[str] | None = None, query: str | None = None,
                   kind: Kind = "forward") -> aiohttp.ClientResponse:
        """Send the request upstream; returns the response with headers read."""
        pq = _upstream_path(request, target, query)
        streamed: _StreamedBody | None = None
        if data is None and request.body_exists:
            head, ended = await self._read_head(request)
            data = head if ended else (streamed := _StreamedBody(request.content, head, self.clients.body_timeout,
                                                                 self.max_body))
        try:
            return await self.upstreams.send(target.pool, request.method, pq,
                                             headers if headers is not None else self.upstream_headers(request),
                                             data, kind=kind,
                                             again=streamed is None and agentapi.may_send_again(request.method, target.path))
        except UpstreamError:
            if streamed is not None and streamed.failure is not None:  # the client's body failed, not the upstream
                raise streamed.failure from None
            raise

    async def _read_head(self, request: web.Request) -> tuple[bytes, bool]:
        """The body, read before any upstream connection is taken for it, if it is at most
        ``clients.body_buffer_bytes``; else what was read of it, and False (the rest streams)."""
        limit = self.clients.body_buffer_bytes
        if request.content_length is not None and request.content_length > self.max_body:
            raise _too_large(self.max_body, request.content_length)
        if request.content_length is not None and request.content_length > limit:
            return b"", False
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.clients.body_timeout):
                while size <= limit:
                    chunk = await request.content.readany()
                    if not chunk:
                        body_read(request.content)
                        return b"".join(parts), True
                    parts.append(chunk)
                    size += len(chunk)
                    if size > self.max_body:  # a chunked body: its size is known only as it comes
                        raise _too_large(self.max_body)
        except TimeoutError:
            raise _body_timeout(self.clients.body_timeout) from None
        return b"".join(parts), False

    async def read_body(self, request: web.Request, limit: int) -> bytes:
        """A whole request body the gateway reads itself (a run to create), within
        ``clients.body_timeout``; 413 past ``limit``, 408 when it comes too slowly."""
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit, request.content_length)
        try:
            async with asyncio.timeout(self.clients.body_timeout):
                body = await read_limited(request.content, limit)
        except TimeoutError:
            raise _body_timeout(self.clients.body_timeout) from None
        if body is None:
            raise _too_large(limit)
        body_read(request.content)
        return body

    async def open_stream(self, request: web.Request, target: Target, data: bytes,
                          headers: CIMultiDict[str]) -> LegResponse:
        """POST a request whose answer may be a stream to capture (a run created streaming), on the
        streaming client; returns the answer with its head read."""
        return await self.upstreams.send_stream(target.pool, "POST", _upstream_path(request, target), headers, data)

    async def relay(self, request: web.Request, target: Target, resp: Answer) -> web.StreamResponse:
        """Stream an upstream response to the client unchanged (but for hop-by-hop headers)."""
        try:
            out = RelayedResponse(status=resp.status, reason=resp.reason, headers=client_headers(resp, target))
            await start_response(request, out)
            await self._pipe_body(request, resp, out)
            return out
        finally:
            resp.release()

    async def _pipe_body(self, request: web.Request, resp: Answer, out: web.StreamResponse) -> None:
        """Copy the upstream body to the client chunk by chunk; a broken side cuts the other."""
        guard = StallGuard(self.clients.write_timeout)
        try:
            await self._copy_body(request, resp, out, guard)
        finally:
            guard.close()

    async def _copy_body(self, request: web.Request, resp: Answer, out: web.StreamResponse, guard: StallGuard) -> None:
        try:
            async for chunk in resp.content.iter_any():
                try:
                    await send_body(request, out, chunk, guard)
                except TimeoutError:
                    log.info("client on %s %s stopped reading for %gs; cut, and its upstream connection freed",
                             request.method, request.path, self.clients.write_timeout)
                    resp.close()
                    cut(request)
                    return
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectionResetError) and _client_gone(request):
                resp.close()
                return  # the client hung up: nothing to tell anyone
            # Headers are gone already: the only honest signal left is a cut connection.
            log.warning("upstream body broke mid-response on %s %s: %r", request.method, request.path, exc)
            cut(request, "error")
            return
        await out.write_eof()

    async def forward(self, request: web.Request, target: Target) -> web.StreamResponse:
        resp = await self.open(request, target)
        return await self.relay(request, target, resp)

    async def websocket(self, request: web.Request, target: Target) -> web.StreamResponse:
        """Proxy a WebSocket upgrade: the upstream's answer to the handshake decides, then messages go
        both ways as they come (each side's reader waits for the other's writer: backpressure), and a
        close on either side closes the other with the same code."""
        headers = self.upstream_headers(request, drop=_WS_HANDSHAKE)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            async with self.upstreams.websocket(target.pool, _upstream_path(request, target), headers,
                                                protocols, self.max_message, self.heartbeat) as upstream:
                # autoclose off: a close frame from either side is answered once the other side closed.
                client = ClientSocket(protocols=[upstream.protocol] if upstream.protocol else [],
                                               max_msg_size=self.max_message, autoclose=False,
                                               heartbeat=self.heartbeat)
                await start_response(request, client)
                loop = asyncio.get_running_loop()
                stop: asyncio.Future[None] = loop.create_future()
                closed: asyncio.Future[None] = loop.create_future()
                if self._going_away:
                    stop.set_result(None)
                self._sessions[stop] = closed
                try:
                    await _splice(client, upstream, stop)
                finally:
                    del self._sessions[stop]
                    closed.set_result(None)
                    if stop.done():  # closed by the gateway with a close frame: whole, even if the
                        request[END] = request.get(END, "completed")  # client hung up as it answered
                return client
        except aiohttp.WSServerHandshakeError as exc:  # before anything was sent to the client
            return error_response(exc.status if exc.status >= 400 else 502,
                                  f"upstream '{target.pool.name}' refused the WebSocket upgrade: "
                                  f"HTTP {exc.status} {exc.message}")

    async def read_json_response(self, resp: Answer, limit: int) -> bytes:
        """Read a small upstream body whole (run JSON), mapping failures to 502/504."""
        try:
            body = await read_limited(resp.content, limit)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise as_upstream_error(exc, "the upstream, mid-body,") from None
        if body is None:
            raise BadUpstreamResponse(f"upstream response body exceeds the {limit}-byte limit")
        return body


class _StreamedBody:
    """A request body too big to read first, streamed upstream as it comes: each read within
    ``timeout`` of the last, or the request fails (and says the client was too slow). ``failure``:
    what the client is told when its body failed (too slow, past ``limit`` bytes, or broken off
    malformed), not the upstream."""

    def __init__(self, content: aiohttp.StreamReader, head: bytes, timeout: float, limit: int) -> None:
        self._content = content
        self._head = head
        self._timeout = timeout
        self._limit = limit
        self._size = len(head)
        self.failure: GatewayError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.failure = _body_timeout(self._timeout)
                raise self.failure from None
            except GatewayError as exc:  # a malformed end (gateway.listener)
                self.failure = exc
                raise
            if not chunk:
                return
            self._size += len(chunk)
            if self._size > self._limit:  # the upstream gets a body that breaks off, never a whole one
                self.failure = _too_large(self._limit)
                raise self.failure
            yield chunk


def _too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    """413 for a body past streams.max_request_body; the connection closes (the rest is not read)."""
    what = "request body" + (f" of {size} bytes" if size is not None else "")
    return PayloadTooLarge(f"{what} exceeds the {limit}-byte limit (streams.max_request_body)",
                           headers={"Connection": "close"})


def _body_timeout(seconds: float) -> RequestTimeout:
    return RequestTimeout(f"request body not received within {seconds:g}s (clients.body_timeout)",
                          headers={"Connection": "close"})


# Handshake headers the upstream connection makes its own (aiohttp's client sets them).
_WS_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                 "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept")


async def _splice(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                  stop: asyncio.Future[None]) -> None:
    """Copy messages both ways until one side closes, then close the other with its code and reason;
    or, once ``stop`` is done (the gateway stops), close both with 1001 (going away).

    The closes are shielded: a client that sends its close frame and hangs up at once cancels this
    handler, and the upstream must still hear that client's code, not a default.
    """
    closed: dict[str, tuple[int, bytes]] = {}  # which side closed first, with what code and reason
    down = asyncio.create_task(_copy(upstream, client, closed, "upstream"))
    up = asyncio.create_task(_copy(client, upstream, closed, "client"))
    try:
        await asyncio.wait({down, up, stop}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done() and not closed:
            closed["gateway"] = (aiohttp.WSCloseCode.GOING_AWAY, b"gateway shutting down")
    finally:
        await asyncio.shield(_close_both(client, upstream, closed, down, up))


async def _close_both(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                      closed: dict[str, tuple[int, bytes]], down: asyncio.Task[None], up: asyncio.Task[None]) -> None:
    """The side that closed first hears the other side's answer, as it would direct. Each close reads
    its answer only if no copy was cancelled in that side's receive first: aiohttp's client takes a
    cancelled receive for an abnormal end (and reads no answer), so the upstream's close breaks the
    copy's receive itself; the client's side is read once its copy is cancelled."""
    if "client" in closed:
        code, reason = closed["client"]
        await upstream.close(code=code, message=reason)
        await _stop(down, up)
        if (answer := _answer(upstream.close_code)) is not None:
            await client.close(code=answer)
    elif "upstream" in closed:
        await _stop(down, up)
        code, reason = closed["upstream"]
        await client.close(code=code, message=reason)
        if (answer := _answer(client.close_code)) is not None:
            await upstream.close(code=answer)
    else:
        await _stop(down, up)
        if "gateway" in closed:  # the upstream first: the client may hang up once it has its close frame
            code, reason = closed["gateway"]
            await upstream.close(code=code, message=reason)
            await client.close(code=code, message=reason)
    # Whatever ended without a close frame: the other side hears that it is gone.
    await client.close(code=_LOST["upstream"][0], message=_LOST["upstream"][1])
    await upstream.close(code=_LOST["client"][0], message=_LOST["client"][1])


# What a side hears when the other ended without a close frame it can pass on: 1014 ("bad gateway")
# or 1001 ("going away"). The client with a reason: a bare 1014 does not say the upstream went.
_LOST = {"upstream": (aiohttp.WSCloseCode.BAD_GATEWAY, b"the upstream's socket ended without a close"),
         "client": (aiohttp.WSCloseCode.GOING_AWAY, b"")}


async def _stop(*copies: asyncio.Task[None]) -> None:
    for t in copies:
        t.cancel()
    await asyncio.gather(*copies, return_exceptions=True)


def _sendable(code: int) -> int | None:
    """A peer's close code as it may go on the wire, or None when no endpoint may send it.

    A close frame without one (aiohttp's 0, the RFC's 1005, a browser's ``ws.close()``) is a normal
    close. aiohttp takes from a peer 1006 (in its enum) and any code past 4999, which a client
    library that checks (browsers, ``ws``, ``websockets``) fails the connection over: such a close is
    taken as an end without a close frame (RFC 6455, 7.4: 1000-1003, 1007-1014 and 3000-4999 are
    sent)."""
    if code in (0, 1005):
        return aiohttp.WSCloseCode.OK
    if 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999:
        return code
    return None


def _answer(code: int | None) -> int | None:
    """The code a side answered a close with, to pass on; None when it sent none (gone, timed out)."""
    return None if code is None else _sendable(code)


async def _copy(src: Any, dst: Any, closed: dict[str, tuple[int, bytes]], side: str) -> None:
    """Messages from ``src`` to ``dst`` until ``src`` closes (its code noted under ``side``) or breaks."""
    while True:
        msg = await src.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.CLOSE:
            code = _sendable(int(msg.data))
            # A code no endpoint may send: as an end without a close frame, said as one is.
            closed.setdefault(side, (code, (msg.extra or "").encode()) if code is not None else _LOST[side])
            return
        elif msg.type == aiohttp.WSMsgType.ERROR:
            # aiohttp closed ``src`` itself (1009 for a message past the bound, 1002 for a broken
            # frame). An upstream's message too big: the client hears 1009 and why, not a bare 1014
            # (a client's: the upstream hears 1001, the gateway let go of its socket).
            if (side == "upstream" and isinstance(msg.data, aiohttp.WebSocketError)
                    and msg.data.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
                closed.setdefault(side, (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                         close_reason(f"upstream message too big: {msg.data}")))
            return
        elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return


def _upstream_path(request: web.Request, target: Target, query: str | None = None) -> str:
    """The upstream path and query of a client's request (``query`` instead of the client's, if given)."""
    qs = request.rel_url.raw_query_string if query is None else query
    return target.path + (f"?{qs}" if qs else "")


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def decoded_body(body: bytes, coding: str, limit: int) -> bytes | None:
    """A whole body the gateway reads itself (a run's JSON), decoded from its Content-Encoding
    (gzip or zlib deflate: a proxy in front of the upstream may compress JSON); None when it cannot
    be decoded, or inflates past ``limit`` bytes. What the client gets is the body as it came."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        return None
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error:
        return None
    return None if len(out) > limit or inflate.unconsumed_tail else out


async def read_limited(stream: AnswerBody, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (read() alone may return a part)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
