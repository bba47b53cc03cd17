"""The official clients' own reconnect paths through the gateway, in front of a real `langgraph dev`.

A small TCP "chaos" proxy sits between the client and the gateway. On the first event-stream
response it relays, it cuts the client's connection right after K complete SSE frames. The
client library must then reconnect by itself (`GET <Location>` + `Last-Event-ID`) and still see
every event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp_sse_client.client import EventSource
from langgraph_sdk import get_client
from langgraph_sdk.schema import StreamMode

from tests.support.sse import read_events

pytestmark = pytest.mark.timeout(60)

N = 30
TICKER = {"n": N, "delay": 0.02}
MODES: list[StreamMode] = ["custom", "values"]

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
            if up is not None:
                up.cancel()
                await asyncio.gather(up, return_exceptions=True)
            for w in (c_writer, u_writer):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()
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
            if _SSE_TYPE.search(head) and _CHUNKED.search(head) and self.cut_count < self.cuts:
                if await self._relay_stream_with_cut(reader, writer):
                    return
            elif _CHUNKED.search(head):
                await self._relay_chunked(reader, writer)
            elif m := _LENGTH.search(head):
                writer.write(await reader.readexactly(int(m.group(1))))
            else:  # body runs to EOF
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
                return
            await writer.drain()

    async def _relay_chunked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for data in _chunks(reader):
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def _relay_stream_with_cut(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Relay an SSE body frame by frame; True if it was cut (the connection is then done)."""
        self.cut_count += 1
        frames = 0
        pending = b""
        async for data in _chunks(reader):
            pending += data
            while m := _FRAME_END.search(pending):
                one, pending = pending[:m.end()], pending[m.end():]
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
        out.append(Request(m.group(1).decode(), m.group(2).decode(), headers))
        pos = end + 4
    return out


@pytest.fixture
async def chaos() -> Any:
    proxies: list[ChaosProxy] = []

    async def make(upstream: str, after_events: int, **kw: Any) -> ChaosProxy:
        p = await ChaosProxy(upstream, after_events, **kw).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        await p.stop()


async def _replay(http: aiohttp.ClientSession, base: str, path: str) -> list[tuple[str, Any, str | None]]:
    """The whole stream as the gateway holds it (Last-Event-ID: -1), for comparison."""
    async with http.get(base + path, headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 200, await r.text()
        return [(e.event, e.json, e.id) for e in await read_events(r)]


# --- the Python SDK -------------------------------------------------------------------------------

# The SDK waits about 1 s before it reconnects, so with the fast ticker the resume finds the run
# finished (pure replay); with delay 0.1 (a 3 s run) it lands mid-run (replay, then live).
@pytest.mark.parametrize("k,delay", [(2, 0.02), (5, 0.02), (17, 0.02), (5, 0.1)])
async def test_python_sdk_reconnects_exactly_once_through_gateway(lg_gateway: Any, chaos: Any,
                                                                  http: aiohttp.ClientSession,
                                                                  k: int, delay: float) -> None:
    proxy = await chaos(lg_gateway.url, k)
    async with get_client(url=proxy.url, api_key=None) as client:
        async with asyncio.timeout(30):
            tid = (await client.threads.create())["thread_id"]
            parts = [p async for p in client.runs.stream(tid, "ticker", input={**TICKER, "delay": delay},
                                                         stream_mode=MODES)]

    assert proxy.cut_count == 1, "the proxy never cut a stream"
    custom = [p.data["i"] for p in parts if p.event == "custom"]
    assert custom == list(range(N)), f"custom events after a cut at {k}: {custom}"

    assert all(p.id is not None for p in parts), "every part carries an id"
    ids = [int(p.id) for p in parts if p.id is not None]
    assert ids == sorted(set(ids)), f"duplicate or out-of-order ids: {ids}"

    run_id = parts[0].data["run_id"]
    location = f"/threads/{tid}/runs/{run_id}/stream"
    resumes = [r for r in proxy.requests if r.method == "GET" and r.target == location]
    assert resumes, [(r.method, r.target) for r in proxy.requests]
    assert resumes[0].headers.get("last-event-id") == parts[k - 1].id, \
        "the SDK resumed from an id other than the last one it got before the cut"

    # Nothing lost or doubled anywhere (values too): the SDK saw exactly what the gateway holds.
    assert [(p.event, p.data, p.id) for p in parts] == await _replay(http, lg_gateway.url, location)


# --- aiohttp-sse-client's EventSource -------------------------------------------------------------

async def test_eventsource_reconnects_exactly_once_through_gateway(lg_gateway: Any, chaos: Any,
                                                                   http: aiohttp.ClientSession) -> None:
    k = 7
    # EventSource only reconnects on an ordinary end of stream (a broken body raises out of its
    # iterator), so this proxy closes the response cleanly after k frames.
    proxy = await chaos(lg_gateway.url, k, clean=True)
    async with asyncio.timeout(40):
        async with http.post(lg_gateway.url + "/threads", json={}) as r:
            tid = (await r.json())["thread_id"]
        async with http.post(lg_gateway.url + f"/threads/{tid}/runs",
                             json={"assistant_id": "ticker", "input": TICKER, "stream_mode": MODES}) as r:
            assert r.status == 200, await r.text()
            rid = (await r.json())["run_id"]
        path = f"/threads/{tid}/runs/{rid}/stream"

        got: list[tuple[str, Any, str]] = []
        ends = 0

        def on_error() -> None:
            nonlocal ends
            ends += 1

        async def listen() -> None:
            async with EventSource(proxy.url + path + "?last_event_id=-1", on_error=on_error,
                                   reconnection_time=timedelta(milliseconds=100)) as es:
                async for ev in es:
                    got.append((ev.type, ev.data, ev.last_event_id))

        task = asyncio.create_task(listen())
        try:
            async with http.get(lg_gateway.url + f"/threads/{tid}/runs/{rid}/join") as r:
                assert r.status == 200
            expected = await _replay(http, lg_gateway.url, path)
            # The natural end: every event is in, and the stream has ended (and been re-opened,
            # since EventSource reconnects forever) once more after the cut.
            while len(got) < len(expected) or ends < 2:
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # room for a late duplicate to show up
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert [(t, orjson.loads(d), i) for t, d, i in got] == expected
    assert [d["i"] for t, d, _ in expected if t == "custom"] == list(range(N))
    resumes = [r for r in proxy.requests if r.method == "GET" and r.target.startswith(path)]
    assert len(resumes) >= 2
    assert "last-event-id" not in resumes[0].headers
    assert resumes[1].headers.get("last-event-id") == expected[k - 1][2]
