"""Upstream legs of captured streams: the one place their GET request is built and sent.

A leg is one upstream connection of a stream the gateway captures. The hub
opens them all through ``Legs.open``, with the Last-Event-ID that
``gateway.rejoin.leg_last_event_id`` decided, either on a client's behalf (its
forwarded headers) or on its own (the upstream's service headers plus the
credentials of the client that started the capture).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator, Mapping

import aiohttp
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.agentapi import THREAD_CAPTURE_QUERY
from gateway.sessions import CAPTURE_BODY as SESSION_CAPTURE_BODY
from gateway.eventlog import StreamMeta
from gateway.upstream import Upstreams


class Legs:
    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    async def open(self, meta: StreamMeta, last_event_id: str | None, *,
                   client_headers: CIMultiDict[str] | None = None, auth: Mapping[str, str] | None = None,
                   query: str = "") -> aiohttp.ClientResponse:
        """Open the stream's upstream path (GET; a session's events: POST asking for every channel); the
        response has its headers read (GatewayError if none).

        ``client_headers``: the forwarded headers of the client this leg is opened for;
        without them the gateway goes on its own, with the pool's service headers and
        ``auth`` (the captor's credentials win over the service headers).
        """
        pool = self.upstreams.pools[meta.upstream]
        headers: CIMultiDict[str]
        if client_headers is not None:
            headers = CIMultiDict(client_headers)
        else:
            headers = CIMultiDict(pool.cfg.headers)
            headers.update(auth or {})
        headers["Accept"] = "text/event-stream"
        headers.popall("Last-Event-ID", None)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        if meta.kind == "thread":
            query = THREAD_CAPTURE_QUERY
        path = meta.path + (f"?{query}" if query else "")
        if meta.kind == "session":
            headers.popall("Content-Length", None)
            headers["Content-Type"] = "application/json"
            return await self.upstreams.send(pool, "POST", path, headers, data=SESSION_CAPTURE_BODY, kind="stream")
        return await self.upstreams.send(pool, "GET", path, headers, kind="stream")


class IdleWatch:
    """Ends a leg the upstream sent nothing on for its pool's ``read_timeout``, with the error
    aiohttp's own ``sock_read`` raises, at the cost of one timer per ``read_timeout`` instead of
    one per chunk.

    aiohttp re-arms its read timer on every chunk it receives (a cancel, a new timer handle, a
    heap push): on a token stream that is once per event. A capture marks each chunk with
    ``seen()`` (one clock read) and the watch's single timer, when it fires, either finds a
    recent chunk and sleeps again until ``read_timeout`` after it, or ends the leg.
    """

    __slots__ = ("_resp", "_timeout", "_loop", "_handle", "last")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._handle: asyncio.TimerHandle | None = None
        proto = resp.connection.protocol if resp.connection is not None else None
        timeout = proto.read_timeout if proto is not None else None
        self._timeout = timeout or 0.0
        if proto is not None and timeout:
            # The response's headers are in: from its next chunk on, aiohttp arms no timer.
            proto.read_timeout = None
            self._handle = self._loop.call_at(self.last + timeout, self._check)

    def seen(self) -> None:
        self.last = self._loop.time()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        due = self.last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self._resp.content.set_exception(
            aiohttp.SocketTimeoutError(f"the upstream sent nothing for {self._timeout:g} s"))


class InlineBodies:
    """Legs whose body is handed to a callback as it arrives, without a task step per chunk.

    A capture reading ``resp.content`` chunk by chunk wakes its task for every chunk: a future,
    a loop callback, a task step and the reader's bookkeeping. Attached here, a leg's reader
    keeps the chunks aiohttp's parser hands it and passes them, joined, to the callback (which
    parses and submits them) once per turn of the loop: every chunk that arrived in one turn is
    one submit, as a reader that fell behind would have read them. The capture's task only
    waits for the end of the body (``InlineLeg.end``); an error of the leg (a reset, the idle
    timeout) still reaches it through the reader.

    The reader's class is swapped for a subclass that adds no state (aiohttp's reader has
    ``__slots__``): which leg a reader feeds is kept here, by the reader's id, while attached.
    """

    def __init__(self) -> None:
        legs: dict[int, InlineLeg] = {}
        self._legs = legs

        class _Reader(StreamReader):
            __slots__ = ()

            def feed_data(self, data: bytes, size: int = 0) -> bool:
                leg = legs.get(id(self))
                if leg is None:
                    return StreamReader.feed_data(self, data, size)
                if data:
                    leg.gather(data)
                return False  # nothing left waiting in this reader

        self._reader_class = _Reader

    @contextlib.contextmanager
    def attach(self, resp: aiohttp.ClientResponse, sink: Callable[[bytes], None]) -> Iterator[InlineLeg]:
        """Feed ``sink`` whatever ``resp`` had buffered, then what arrives, until the block ends.
        A ``sink`` that raises ends the leg with that error (``InlineLeg.end`` raises it)."""
        reader = resp.content
        leg = InlineLeg(reader, sink)
        # What came with the headers, and what the parser held back while the reader was full: each
        # read lets aiohttp resume its parser, which refills the reader there and then.
        while chunk := reader.read_nowait():
            leg.gather(chunk)
        reader.__class__ = self._reader_class
        self._legs[id(reader)] = leg
        try:
            yield leg
        finally:
            del self._legs[id(reader)]
            leg.close()


class InlineLeg:
    __slots__ = ("_reader", "_sink", "_gathered", "_due", "_loop")

    def __init__(self, reader: StreamReader, sink: Callable[[bytes], None]) -> None:
        self._reader = reader
        self._sink = sink
        self._gathered: list[bytes] = []
        self._due = False
        self._loop = asyncio.get_running_loop()

    def gather(self, data: bytes) -> None:
        self._gathered.append(data)
        if not self._due:
            self._due = True
            self._loop.call_soon(self.flush)

    def close(self) -> None:
        """The capture left (cancelled, or the leg failed): what is gathered is never handed on, not
        even by a flush already scheduled."""
        self._gathered.clear()
        self._sink = _discard

    def flush(self) -> None:
        self._due = False
        if not self._gathered:
            return
        data = self._gathered[0] if len(self._gathered) == 1 else b"".join(self._gathered)
        self._gathered.clear()
        if self._reader.exception() is not None:
            return  # the leg already failed: the rest is not read
        try:
            self._sink(data)
        except Exception as exc:  # into the capture's task, through the reader
            self._reader.set_exception(exc)

    async def end(self) -> None:
        """Until the leg's body ended, everything gathered handed on; raises what ended it otherwise
        (aiohttp's ``wait_eof`` alone would wait for ever after an error set before it was called,
        and returns at an end that came after an error)."""
        reader = self._reader
        if reader.exception() is None and not reader.is_eof():
            await reader.wait_eof()
        self.flush()
        exc = reader.exception()
        if exc is not None:
            raise exc


def _discard(_data: bytes) -> None:
    pass


def pause_leg(resp: aiohttp.ClientResponse) -> Callable[[], None]:
    """Stop reading a leg's socket; returns the call that resumes it.

    The transport only: pausing aiohttp's protocol would pause its parser too, and a parser
    paused while it has nothing to parse stays paused for the next data, which then waits for a
    resume nobody sends."""
    transport = resp.connection.transport if resp.connection is not None else None
    if transport is None or transport.is_closing():
        return lambda: None
    transport.pause_reading()

    def resume() -> None:
        if not transport.is_closing():
            transport.resume_reading()

    return resume
