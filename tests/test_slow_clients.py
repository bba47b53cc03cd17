"""Writing to slow clients, at the write itself: a real aiohttp server and a raw-socket client with
small socket buffers, so that how fast the client reads is what the server sees (on loopback the
kernel would otherwise take megabytes at once). The gateway-level cut is in test_resume.py."""

from __future__ import annotations

import asyncio
import socket
from typing import AsyncIterator

import pytest
from aiohttp import web

from gateway.responses import StallGuard, cut, send_body, start_response
from gateway.sse import EVENT_END, frame
from tests.support.sse import dechunk, parse_all

BODY = b'event: messages\ndata: {"token":"' + b"y" * 180 + b'"}\n'
PAGE = frame((i, BODY) for i in range(1, 10_001))  # ~2.2 MB of whole events
STALL = 0.3  # seconds a client may go without taking anything


class Server:
    """Serves PAGE once per request through send_body; records how each response ended."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.pause = 0.0  # PAGE goes in two writes this far apart (0: one write)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await start_response(request, out)
        guard = StallGuard(STALL)
        try:
            if self.pause:
                half = PAGE.index(b"\n\n", len(PAGE) // 2) + 2
                await send_body(request, out, PAGE[:half], guard, EVENT_END)
                await asyncio.sleep(self.pause)
                await send_body(request, out, PAGE[half:], guard, EVENT_END)
            else:
                await send_body(request, out, PAGE, guard, EVENT_END)
            await out.write_eof()
            self.outcomes.append("ended")
        except TimeoutError:
            cut(request)
            self.outcomes.append("cut")
        finally:
            guard.close()
        return out


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_get("/", srv.handle)
    srv.runner = web.AppRunner(app)
    await srv.runner.setup()
    site = web.TCPSite(srv.runner, "127.0.0.1", 0)
    await site.start()
    srv.address = srv.runner.addresses[0][:2]
    yield srv
    await srv.runner.cleanup()


async def fetch(address: tuple[str, int], stall: float = 0.0, every: float = 0.0, stall_at: int = 0) -> tuple[bytes, bool]:
    """The de-chunked body and whether it ended cleanly, reading 8 KiB every ``every`` seconds
    through an 8 KiB receive buffer, with ``stall`` seconds of reading nothing once it holds
    ``stall_at`` bytes."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while True:
            if stall and len(raw) >= stall_at:
                await asyncio.sleep(stall)
                stall = 0.0
            chunk = await loop.sock_recv(sock, 8192)
            if not chunk:
                break
            raw += chunk
            await asyncio.sleep(every)
    finally:
        sock.close()
    return dechunk(raw.partition(b"\r\n\r\n")[2])


async def test_a_slow_but_steady_reader_is_never_cut(server: Server) -> None:
    # ~1.6 MB/s: the 2.2 MB write takes over a second, four stall timeouts, though the client
    # never goes anywhere near STALL without taking something. The deadline is for a stall.
    body, clean = await fetch(server.address, every=0.005)
    assert server.outcomes == ["ended"] and clean
    assert body == PAGE


async def test_a_stalled_reader_is_cut_after_a_whole_event(server: Server) -> None:
    body, clean = await fetch(server.address, stall=4 * STALL)
    assert server.outcomes == ["cut"] and not clean
    assert 0 < len(body) < len(PAGE) and body.endswith(b"\n\n"), body[-60:]
    assert body == PAGE[:len(body)]
    assert len(parse_all(body.decode())) == body.count(b"\n\n")


async def test_a_pause_in_the_writes_is_not_the_client_stalling(server: Server) -> None:
    """One deadline serves a whole response: it is armed by a write that may wait, and a quiet
    stretch with nothing to write (a live stream between tokens) must not count against the
    client when the next write waits."""
    server.pause = 3 * STALL
    body, clean = await fetch(server.address, every=0.005)
    assert server.outcomes == ["ended"] and clean
    assert body == PAGE


async def test_a_reader_that_stalls_after_a_pause_is_cut_after_a_whole_event(server: Server) -> None:
    """The deadline armed before the pause still cuts a client that stalls in the write after it."""
    server.pause = 3 * STALL
    body, clean = await fetch(server.address, stall=8 * STALL, stall_at=len(PAGE) * 3 // 4)
    assert server.outcomes == ["cut"] and not clean
    assert len(body) > len(PAGE) // 2, "cut in the write after the pause"
    assert 0 < len(body) < len(PAGE) and body.endswith(b"\n\n"), body[-60:]
    assert body == PAGE[:len(body)]
