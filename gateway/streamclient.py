"""The HTTP/1.1 client of streaming legs: the upstream connections whose bodies the gateway captures.

A captured leg is one long response read a few hundred bytes at a time, for as long as a run
lasts, and there is one per live stream. aiohttp's client costs about 0.43 ms of CPU to open a
leg and 10 KiB to hold one idle, and hands each chunk through its parser, a ``StreamReader`` and
a task (``bench/upstream_leg.py``). Here a leg is an ``asyncio.Protocol`` that parses the status
line, the headers and the chunked framing where the bytes arrive, and hands each read's payload
straight to the capture's sink (``LegResponse.attach``): no task step, no reader, no timer per
chunk.

Only what streaming legs need is built: GET, or POST with a body in memory; chunked, sized or
close-delimited bodies, passed through byte for byte (no decompression); kept-alive connections
reused per origin; TLS for https upstreams. Failures use aiohttp's exception types, so a leg from
here and a response from aiohttp are handled by the same ``except`` clauses and mapped to a
client's 502/504 in one place (``gateway.upstream.as_upstream_error``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import ssl
from typing import AsyncIterator, Callable, Literal, Mapping, cast

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import native

log = logging.getLogger("gateway.streamclient")

# A response head larger than this is refused (aiohttp's own limit is 8 KiB a line).
MAX_HEAD_BYTES = 64 * 1024
# A chunk-size line longer than this is not a chunk-size line.
MAX_CHUNK_LINE = 1024
# Bytes a reader (not a capture) may have waiting before the socket is paused.
READ_HIGH_WATER = 256 * 1024
# An idle kept-alive upstream connection is closed after this long, on this client and on the
# forwarding one (gateway.upstream), unless the upstream's config says (upstreams.<name>.keepalive):
# under uvicorn's 5 s, so a request is not sent on a connection the upstream is closing at that
# moment (a POST is never sent twice: it would meet a reset, a 502).
KEEPALIVE_SECONDS = 4.0
# Idle connections kept per origin; more are closed when released.
MAX_IDLE_PER_ORIGIN = 1024
# A new stream that finds no idle connection waits for its own connect: four loop turns, tens of ms
# each on a busy gateway, in every new stream's time to first event. While streams come faster
# than connects finish (one finds none while another connect is under way), the client connects
# ahead, up to this many per origin, and replaces each one a stream takes. Unused, they close as
# idle kept-alive connections do (after KEEPALIVE_SECONDS); a quiet gateway never opens one.
MAX_SPARES = 16

Framing = Literal["chunked", "length", "close", "none"]
Pauser = Literal["capture", "reader"]  # the capture (its log is behind), or a reader's full queue
PAUSED_BY: dict[Pauser, int] = {"capture": 1, "reader": 2}
Sink = Callable[[bytes], None]
Origin = tuple[str, int, bool]  # host, port, TLS
Head = tuple[int, str, CIMultiDict[str], bytes]  # status, reason, headers, and the head as received


class ConnectFailed(Exception):
    """No connection to the upstream could be made: nothing was sent, so trying elsewhere is safe."""


def _failure(message: str) -> aiohttp.ClientPayloadError:
    return aiohttp.ClientPayloadError(message)


class LegConnection(asyncio.Protocol):
    """One connection to an upstream: a request written, its response parsed as it arrives."""

    # One per live stream: slots keep an idle leg small.
    __slots__ = ("_client", "origin", "_loop", "transport", "lost", "_buf", "_phase", "_head", "_framing", "_left",
                 "_crlf", "_trailers", "reusable", "sink", "_queued", "_queued_bytes", "_waiter", "exc",
                 "_paused_by", "_timeout", "_timer", "last", "ended", "spare")

    def __init__(self, client: StreamClient, origin: Origin) -> None:
        self._client = client
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.spare = False  # connected ahead, not used yet (StreamClient._connect_ahead)
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._phase: Literal["idle", "head", "body", "done"] = "idle"
        self._head: asyncio.Future[Head] | None = None
        self._framing: Framing = "none"
        self._left = 0  # bytes left of the current chunk, or of a sized body
        self._crlf = False  # a chunk's closing CRLF is due
        self._trailers = False  # past the last chunk: trailer lines until an empty one
        self.reusable = False
        self.sink: Sink | None = None
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None
        self._paused_by = 0  # who stopped reading: a bit each (PAUSED_BY)
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.last = 0.0
        self.ended: asyncio.Future[None] | None = None  # someone waits for the body's end

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transport has a Transport's methods but is
        # not a subclass of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._client.forget(self)
        if self._phase == "head":
            self._fail(aiohttp.ServerDisconnectedError())
        elif self._phase == "body":
            if self._framing == "close" and exc is None:
                self._finish()
            else:
                self._fail(_failure(f"the upstream closed the connection mid-body ({exc or 'no error'})"))
        self._stop_timer()

    def data_received(self, data: bytes) -> None:
        self.last = self._loop.time()
        if self._phase == "body":
            self._body(data)
        elif self._phase == "head":
            self._buf += data
            self._parse_head()
        elif data:  # bytes past the answer, or while idle in the pool: not a connection to reuse
            self.reusable = False
            if self._phase == "idle":
                self.close()

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed upstream sends nothing more

    # --- the request --------------------------------------------------------------------------

    def send(self, request: bytes, timeout: float) -> asyncio.Future[Head]:
        assert self.transport is not None
        self._reset()
        self._phase = "head"
        self._head = self._loop.create_future()
        self._timeout = timeout
        self.last = self._loop.time()
        if timeout:
            self._timer = self._loop.call_at(self.last + timeout, self._check_idle)
        self.transport.write(request)
        return self._head

    # --- the head -----------------------------------------------------------------------------

    def _parse_head(self) -> None:
        while self._phase == "head":
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    self._abort(_failure(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes"))
                return
            head, self._buf = self._buf[:end], self._buf[end + 4:]
            try:
                status, reason, headers, version11 = _parse(head)
            except ValueError as exc:
                self._abort(_failure(f"malformed response head from the upstream ({exc})"))
                return
            if 100 <= status < 200 and status != 101:
                continue  # informational (100 Continue, 103 Early Hints): the answer follows
            self._start_body(status, headers, version11)
            answered, self._head = self._head, None  # its result holds the parsed headers: not kept here
            assert answered is not None
            if not answered.done():
                answered.set_result((status, reason, headers, head))
            rest, self._buf = self._buf, b""
            if rest:
                self.data_received(rest)  # the body's first bytes (or bytes past an empty answer)
            return

    def _start_body(self, status: int, headers: CIMultiDict[str], version11: bool) -> None:
        keep = version11 and "close" not in headers.get("Connection", "").lower()
        te = headers.get("Transfer-Encoding", "").lower()
        self._phase = "body"
        if te:
            if te.rsplit(",", 1)[-1].strip() != "chunked":
                self._framing, keep = "close", False
            else:
                self._framing = "chunked"
        elif status in (204, 304):
            self._framing = "none"
        elif (length := headers.get("Content-Length")) is not None and length.strip().isdigit():
            self._framing, self._left = "length", int(length)
        else:
            self._framing, keep = "close", False
        self.reusable = keep
        if self._framing == "none" or (self._framing == "length" and self._left == 0):
            self._finish()

    # --- the body -----------------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        framing = self._framing
        ended = False
        if framing == "chunked":
            try:
                payload, ended = self._dechunk(data)
            except ValueError as exc:
                self._abort(_failure(f"malformed chunked body from the upstream ({exc})"))
                return
        elif framing == "length":
            payload = data[:self._left]
            self._left -= len(payload)
            ended = self._left == 0
            if len(payload) < len(data):
                self.reusable = False
        else:
            payload = data
        if payload:
            self._deliver(payload)
        if ended and self._phase == "body":
            self._finish()

    def _dechunk(self, data: bytes) -> tuple[bytes, bool]:
        """The payload of the chunks in ``data`` (with what an earlier read left unparsed), and
        whether the body ended in it."""
        buf = self._buf + data if self._buf else data
        # The same state machine in C (a token's chunk: 14% of the loop's Python time), which
        # counts a chunk's size in 60 bits and hands anything bigger to Python.
        if native.ON and self._left < 1 << 60:
            got = native.dechunk(buf, self._left, self._crlf, self._trailers, MAX_CHUNK_LINE)
            if got is not None:
                payload, pos, self._left, self._crlf, self._trailers, ended = got
                if ended and pos < len(buf):
                    self.reusable = False  # bytes after the body: the connection is not clean
                self._buf = buf[pos:] if pos < len(buf) and not ended else b""
                return payload, ended
        return self._dechunk_py(buf)

    def _dechunk_py(self, buf: bytes) -> tuple[bytes, bool]:
        """``_dechunk`` in Python: also what says how a malformed body is malformed."""
        pos, end = 0, len(buf)
        out: list[bytes] = []
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("a chunk does not end with CRLF")
                pos += 2
                self._crlf = False
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ValueError("a chunk-size line is too long")
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self._trailers:
                if not line:  # the empty line after the trailers: the body is complete
                    self._buf = b""
                    if pos < end:
                        self.reusable = False
                    return _joined(out), True
                continue
            size = line.split(b";", 1)[0].strip()
            if not size or size.translate(None, b"0123456789abcdefABCDEF"):
                raise ValueError(f"bad chunk size {bytes(line[:40])!r}")
            self._left = int(size, 16)
            if not self._left:
                self._trailers = True
        self._buf = buf[pos:] if pos < end else b""
        return _joined(out), False

    def _deliver(self, payload: bytes) -> None:
        if self.exc is not None:
            return
        sink = self.sink
        if sink is not None:
            try:
                sink(payload)
            except Exception as exc:  # the capture refused it (storage failed): the leg ends with that
                self._abort(exc)
            return
        self._queued.append(payload)
        self._queued_bytes += len(payload)
        if self._queued_bytes > READ_HIGH_WATER:
            self.pause("reader")
        self._wake()

    def _finish(self) -> None:
        self._phase = "done"
        self._stop_timer()
        self._wake()
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def _abort(self, exc: BaseException) -> None:
        """The answer failed with ``exc`` and the connection cannot carry anything more."""
        self._fail(exc)
        self.close()

    def _fail(self, exc: BaseException) -> None:
        if self.exc is not None or self._phase == "done":
            return
        self.exc = exc
        self.reusable = False
        self._stop_timer()
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: a caller gone meanwhile leaves no warning behind
        self._wake()
        if self.ended is not None and not self.ended.done():
            self.ended.set_exception(exc)
            self.ended.exception()  # retrieved: a caller gone meanwhile leaves no warning behind

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    @property
    def complete(self) -> bool:
        return self._phase == "done"

    # --- the read timeout: one timer per read_timeout, not one per chunk -------------------------

    def _check_idle(self) -> None:
        self._timer = None
        if self._phase not in ("head", "body"):
            return
        now = self._loop.time()
        due = self.last + self._timeout
        if self._paused_by:  # the gateway stopped reading, not the upstream sending
            due = now + self._timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._check_idle)
            return
        self._abort(aiohttp.SocketTimeoutError(f"the upstream sent nothing for {self._timeout:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- flow control and reading -------------------------------------------------------------

    def pause(self, who: Pauser) -> None:
        if not self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused_by |= PAUSED_BY[who]

    def resume(self, who: Pauser) -> None:
        self._paused_by &= ~PAUSED_BY[who]
        if not self._paused_by:
            # The upstream's silence counts from here: the pause was the gateway's, and the idle
            # check that comes next would otherwise count it from the last byte before it.
            self.last = self._loop.time()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def park(self) -> None:
        """Idle in the pool: any byte that arrives now is not an answer to anything (see data_received)."""
        self._phase = "idle"

    def unpause(self) -> None:
        """Read again, whoever paused (the connection goes back to the pool)."""
        if self._paused_by:
            self._paused_by = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def take(self) -> bytes:
        """Everything queued for a reader, at once (b"" when nothing is)."""
        if not self._queued:
            return b""
        data = _joined(self._queued)
        self._queued.clear()
        self._queued_bytes = 0
        if self._paused_by & PAUSED_BY["reader"]:
            self.resume("reader")
        return data

    def unread(self, data: bytes) -> None:
        """Put back what a reader took beyond what it wanted: it comes first next time."""
        self._queued.insert(0, data)
        self._queued_bytes += len(data)

    async def wait(self) -> None:
        """Until something is queued, the body ended, or it failed."""
        if self._queued or self._phase == "done" or self.exc is not None:
            return
        self._waiter = self._loop.create_future()
        await self._waiter

    def close(self) -> None:
        self._stop_timer()
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _joined(parts: list[bytes]) -> bytes:
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _parse(head: bytes) -> tuple[int, str, CIMultiDict[str], bool]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"bad status line {bytes(lines[0][:80])!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {bytes(line[:80])!r}")
        headers.add(name.decode("utf-8", "surrogateescape"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
    return int(code), reason.decode("utf-8", "surrogateescape"), headers, version == b"HTTP/1.1"


class LegBody:
    """A leg's body read as a stream (an answer that is relayed rather than captured)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: LegConnection) -> None:
        self._conn = conn

    async def readany(self) -> bytes:
        conn = self._conn
        while True:
            data = conn.take()
            if data:
                return data
            if conn.exc is not None:
                raise conn.exc
            if conn.complete:
                return b""
            await conn.wait()

    async def read(self, n: int = -1) -> bytes:
        """The whole body with -1; else up to ``n`` bytes of what is there (b"" at the end), as
        aiohttp's reader does."""
        if n < 0:
            return b"".join([data async for data in self.iter_any()])
        data = await self.readany()
        if len(data) > n:
            self._conn.unread(data[n:])
            data = data[:n]
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        while data := await self.readany():
            yield data


class LegResponse:
    """An upstream's answer on a streaming leg, its head read."""

    __slots__ = ("status", "reason", "_headers", "_head", "content", "_conn", "_on_release", "_released")

    def __init__(self, conn: LegConnection, status: int, reason: str, headers: CIMultiDict[str], head: bytes,
                 on_release: Callable[[], None]) -> None:
        self.status = status
        self.reason = reason
        self._headers: CIMultiDictProxy[str] | None = CIMultiDictProxy(headers)
        self._head = head  # the head as received: the headers again for a late reader
        self.content = LegBody(conn)
        self._conn = conn
        self._on_release = on_release
        self._released = False

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The answer's headers. Parsed they take ~1.5 KiB, the head as received a fifth of that: a
        leg keeps only the latter once its body is being read (``attach``), for hours on an idle
        stream, and a reader after that (rare) parses it again."""
        if self._headers is None:
            return CIMultiDictProxy(_parse(self._head)[2])
        return self._headers

    def attach(self, sink: Sink) -> LegResponse:
        """Hand ``sink`` what was queued, then each read's payload as it arrives, until ``detach``
        (or the end of a ``with`` block around this call: the response is its own context manager).
        A sink that raises ends the leg with that error (``end`` raises it)."""
        self._headers = None  # see headers
        conn = self._conn
        queued = conn.take()
        conn.sink = sink
        try:
            if queued:
                conn._deliver(queued)
        except BaseException:
            conn.sink = None
            raise
        return self

    def detach(self) -> None:
        """No more reads to the sink given to ``attach``."""
        self._conn.sink = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        self.detach()

    def end(self) -> asyncio.Future[None]:
        """Done when the body ended; it raises what ended it otherwise. A future, not a coroutine:
        a capture waits on it for hours."""
        conn = self._conn
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if conn.exc is not None:
            fut.set_exception(conn.exc)
        elif conn.complete:
            fut.set_result(None)
        else:
            conn.ended = fut
        return fut

    def abort(self, exc: BaseException) -> None:
        """End the leg now with ``exc``, as a broken read would (``end`` raises it): its reader
        cannot go on. The connection is closed."""
        self._conn._abort(exc)

    def pause(self) -> Callable[[], None]:
        """Stop reading the leg's socket; returns the call that resumes it."""
        self._conn.pause("capture")
        return functools.partial(self._conn.resume, "capture")

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read whole."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.sink = None
        if not (conn.complete and conn.reusable) or conn.lost:
            conn.close()
        else:
            conn.unpause()  # a leg can end in the read that paused it: the next request must be read
            conn._client.keep(conn)
        self._on_release()

    def __del__(self) -> None:
        # Dropped without a release (a path that forgot it): its connection and its slot in the
        # upstream's stream budget come back, as aiohttp's responses do.
        if not getattr(self, "_released", True):
            self._released = True
            with contextlib.suppress(Exception):
                self._conn.close()
            self._on_release()

    def close(self) -> None:
        """Done with the answer, its connection closed; once released, the connection is not this
        answer's any more (it may carry another request) and is left alone."""
        if self._released:
            return
        self._conn.close()
        self.release()


class StreamClient:
    """Kept-alive connections per origin, and the sending of one request on one of them."""

    def __init__(self, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.keepalive = keepalive  # an idle connection, kept-alive or spare, is closed after this long
        self._idle: dict[Origin, list[LegConnection]] = {}
        self._timers: dict[LegConnection, asyncio.TimerHandle] = {}
        self._open: set[LegConnection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._connecting: dict[Origin, int] = {}  # connects under way, spares' included
        self._ahead: dict[Origin, int] = {}  # spares' connects under way
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None, *,
                      connect_timeout: float | None, read_timeout: float | None,
                      on_release: Callable[[], None]) -> LegResponse:
        """Send one request; returns its answer with the head read.

        Raises ConnectFailed when no connection could be made (nothing was sent: safe to try
        elsewhere); aiohttp's errors once the request was on its way."""
        origin: Origin = (url.raw_host or "", url.port or 80, url.scheme == "https")
        data = _request_bytes(method, url, headers, body)
        reused = self._take_idle(origin)
        if reused is None:
            ahead = bool(self._connecting.get(origin))  # another's connect is under way: streams come faster
        else:
            ahead, reused.spare = reused.spare, False  # a spare taken is replaced
        if ahead and self.keepalive > 0:  # a spare would be closed unused: it is an idle connection
            self._connect_ahead(origin, connect_timeout)
        while True:
            conn = reused or await self._connect(origin, connect_timeout)
            try:
                status, reason, parsed, head = await conn.send(data, read_timeout or 0.0)
            except aiohttp.ServerDisconnectedError:
                conn.close()
                # A kept-alive connection the upstream closed as this request went out: a GET is
                # sent again on a new one; a POST never is (it may have created a run).
                if reused is not None and method == "GET":
                    reused = None
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return LegResponse(conn, status, reason, parsed, head, on_release)

    def _connect_ahead(self, origin: Origin, timeout: float | None) -> None:
        """Connect a spare for the next stream to ``origin``, unless enough are idle or on their way."""
        if self._ahead.get(origin, 0) + len(self._idle.get(origin, ())) >= MAX_SPARES:
            return
        self._ahead[origin] = self._ahead.get(origin, 0) + 1
        task = asyncio.create_task(self._spare(origin, timeout), name=f"spare-connect:{origin[0]}:{origin[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spare(self, origin: Origin, timeout: float | None) -> None:
        try:
            conn = await self._connect(origin, timeout)
        except ConnectFailed as exc:  # the stream that needs the upstream finds out for itself
            log.debug("a spare connection to %s:%s failed: %s", origin[0], origin[1], exc)
            return
        except Exception:
            log.exception("a spare connection to %s:%s crashed", origin[0], origin[1])
            return
        finally:
            self._ahead[origin] -= 1
        if conn.lost or conn.transport is None or conn.transport.is_closing():
            return
        conn.spare = conn.reusable = True
        conn.last = asyncio.get_running_loop().time()  # its keep-alive counts from the connect
        self.keep(conn)

    async def _connect(self, origin: Origin, timeout: float | None) -> LegConnection:
        self._connecting[origin] = self._connecting.get(origin, 0) + 1
        try:
            return await self._open_connection(origin, timeout)
        finally:
            self._connecting[origin] -= 1

    async def _open_connection(self, origin: Origin, timeout: float | None) -> LegConnection:
        host, port, tls = origin
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(timeout):
                _transport, conn = await loop.create_connection(
                    lambda: LegConnection(self, origin), host, port, ssl=context,
                    server_hostname=host if tls else None)
        except TimeoutError:
            raise ConnectFailed(f"no connection within {timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(f"{exc.__class__.__name__}: {exc}") from None
        self._open.add(conn)
        return conn

    def _take_idle(self, origin: Origin) -> LegConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            timer = self._timers.pop(conn, None)
            if timer is not None:
                timer.cancel()
            if conn.reusable and not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    def keep(self, conn: LegConnection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        # Idle since the upstream's last byte (not since the release, which a slow client can delay).
        due = conn.last + self.keepalive
        loop = asyncio.get_running_loop()
        if len(idle) >= MAX_IDLE_PER_ORIGIN or due <= loop.time():
            conn.close()
            return
        conn.park()
        idle.append(conn)
        self._timers[conn] = loop.call_at(due, self._expire, conn)

    def _expire(self, conn: LegConnection) -> None:
        self._timers.pop(conn, None)
        conn.close()

    def forget(self, conn: LegConnection) -> None:
        """A connection closed: out of the pool."""
        self._open.discard(conn)
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in list(self._open):
            conn.close()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._idle.clear()


def _request_bytes(method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> bytes:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if not url.is_default_port():
        host = f"{host}:{url.port}"
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {host}"]
    auth = None
    if url.raw_user or url.raw_password:  # the caller keeps them only when the request has no Authorization
        auth = "Basic " + base64.b64encode(f"{url.user or ''}:{url.password or ''}".encode("latin-1")).decode()
    for name, value in headers.items():
        low = name.lower()
        if low in ("host", "content-length", "transfer-encoding") or (auth is not None and low == "authorization"):
            continue
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return head + body if body else head
