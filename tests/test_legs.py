"""How a capture reads its upstream leg (``gateway.legs.InlineBodies``): every byte handed on, in
order, what came before it attached included; nothing handed on after it left."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.legs import InlineBodies


@pytest.fixture
async def chunked() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A server writing chunks 0-4 at once, then 5-9 once the test says go."""
    go = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"chunk {i};".encode())
        await go.wait()
        for i in range(5, 10):
            await resp.write(f"chunk {i};".encode())
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/", go
    go.set()  # a handler still waiting ends, rather than holding the shutdown for its grace
    await runner.cleanup()


async def test_every_byte_is_handed_on_in_order_including_what_came_before(
        chunked: tuple[str, asyncio.Event]) -> None:
    url, go = chunked
    got: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        await asyncio.sleep(0.1)  # the first chunks wait in aiohttp's reader
        with InlineBodies().attach(resp, got.append) as leg:
            go.set()
            await leg.end()
    assert b"".join(got) == b"".join(f"chunk {i};".encode() for i in range(10))
    assert len(got) < 10, "what arrived in one turn of the loop is handed on at once"


async def test_nothing_is_handed_on_once_the_capture_left(chunked: tuple[str, asyncio.Event]) -> None:
    url, _go = chunked
    got: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        with InlineBodies().attach(resp, got.append) as leg:
            await asyncio.sleep(0.1)
            handed = list(got)
            leg.gather(b"arrived just before the capture was cancelled")  # its flush is scheduled
        await asyncio.sleep(0.05)
    assert got == handed, "a flush scheduled before the capture left hands nothing on"
