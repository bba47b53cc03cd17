"""A TCP relay between a client and the gateway that cuts event streams at a frame boundary.

It re-chunks an event-stream body one frame per chunk, so it can stop exactly at a frame
boundary: after ``after_events`` frames of the first ``cuts`` event-stream responses, it aborts
the connection (``clean=False``: the client sees a transport error) or ends the chunked body
properly (``clean=True``: an ordinary end of stream, as an intermediary closing a long stream).
It records what the client sent (request heads and bodies) and the frames each event-stream
response carried, so a test can check the wire, not only what a client library made of it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_SSE_TYPE = re.compile(rb"^content-type:[ \t]*text/event-stream", re.I | re.M)
_CHUNKED = re.compile(rb"^transfer-encoding:[ \t]*chunked", re.I | re.M)
_LENGTH = re.compile(rb"^content-length:[ \t]*(\d+)", re.I | re.M)
_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) (\S+) HTTP/1\.[01]\r\n")
_FRAME_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class ChaosProxy:
    """TCP relay that cuts the first `cuts` event-stream responses after `after_events` frames.

    It re-chunks an event-stream body one frame per chunk, so it can stop exactly at a frame
    boundary. `clean=False` aborts the TCP connection there (the client sees a truncated body,
    a transport error). `clean=True` ends the chunked body properly first, as an intermediary
    closing a long stream would: the client sees an ordinary end of stream.
    """

    upstream: str
    after_events: int
    cuts: int = 1
    clean: bool = False
    cut_count: int = 0
    # What each event-stream response carried to the client, in order: its frames (or, once no more
    # cuts are due, its chunks), as the bytes that went over the wire.
    streams: list[list[bytes]] = field(default_factory=list)
    _conn_requests: list[list[Request]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Request]:
        """Request heads the client sent, by connection then order."""
        return [r for conn in self._conn_requests for r in conn]

    async def start(self) -> "ChaosProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        u = urlsplit(self.upstream)
        u_writer: asyncio.StreamWriter | None = None
        up: asyncio.Task[None] | None = None
        try:
            u_reader, u_writer = await asyncio.open_connection(u.hostname, u.port)
            heads: list[Request] = []
            self._conn_requests.append(heads)
            up = asyncio.create_task(self._client_to_gateway(c_reader, u_writer, heads))
            await self._gateway_to_client(u_reader, c_writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, OSError):
            pass
        finally:
            # Sockets first and synchronously: a second cancel (stop() during this cleanup) must
            # not leave one open, and asyncio's accept callback must never see this task cancelled.
            for w in (c_writer, u_writer):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()
            if up is not None:
                up.cancel()
                try:
                    await asyncio.gather(up, return_exceptions=True)
                except asyncio.CancelledError:
                    pass
            self._tasks.discard(me)

    async def _client_to_gateway(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 heads: list[Request]) -> None:
        seen = b""
        while chunk := await reader.read(65536):
            seen += chunk
            heads[:] = _parse_heads(seen)
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _gateway_to_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # one response per turn (keep-alive)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                writer.write(exc.partial)
                await writer.drain()
                return
            writer.write(head)
            record: list[bytes] | None = None
            if _SSE_TYPE.search(head):
                self.streams.append(record := [])
            if record is not None and _CHUNKED.search(head) and self.cut_count < self.cuts:
                if await self._relay_stream_with_cut(reader, writer, record):
                    return
            elif _CHUNKED.search(head):
                await self._relay_chunked(reader, writer, record)
            elif m := _LENGTH.search(head):
                writer.write(await reader.readexactly(int(m.group(1))))
            else:  # body runs to EOF
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
                return
            await writer.drain()

    async def _relay_chunked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             record: list[bytes] | None = None) -> None:
        async for data in _chunks(reader):
            if record is not None:
                record.append(data)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def _relay_stream_with_cut(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                     record: list[bytes]) -> bool:
        """Relay an SSE body frame by frame; True if it was cut (the connection is then done)."""
        self.cut_count += 1
        frames = 0
        pending = b""
        async for data in _chunks(reader):
            pending += data
            while m := _FRAME_END.search(pending):
                one, pending = pending[:m.end()], pending[m.end():]
                record.append(one)
                writer.write(b"%x\r\n%s\r\n" % (len(one), one))
                frames += 1
                if frames >= self.after_events:
                    if self.clean:
                        writer.write(b"0\r\n\r\n")
                        await writer.drain()
                        writer.close()
                    else:
                        await writer.drain()
                        writer.transport.abort()
                    return True
            await writer.drain()
        if pending:
            writer.write(b"%x\r\n%s\r\n" % (len(pending), pending))
        writer.write(b"0\r\n\r\n")
        return False


async def _chunks(reader: asyncio.StreamReader) -> Any:
    """The data of each chunk of a chunked body; consumes the terminating chunk and trailers."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


def _parse_heads(seen: bytes) -> list[Request]:
    out = []
    pos = 0
    while m := _REQUEST_LINE.search(seen, pos):
        end = seen.find(b"\r\n\r\n", m.end() - 2)
        if end < 0:
            break
        lines = seen[m.end():end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        length = int(headers.get("content-length", "0") or 0)
        out.append(Request(m.group(1).decode(), m.group(2).decode(), headers, seen[end + 4:end + 4 + length]))
        pos = end + 4 + length
    return out
