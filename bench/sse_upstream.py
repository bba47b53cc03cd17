"""A fast SSE source that looks enough like a LangGraph Agent Server run stream.

``POST /threads/{tid}/runs/stream`` answers with N small events
(``event: custom\\r\\ndata: {"i":k}\\r\\n\\r\\n``), written in batches of
``--batch`` events per write as fast as the socket drains, with the
``Location``/``Content-Location`` headers an Agent Server sends, and no end
event: the body just ends.

Per request overrides (headers, so they pass through any proxy):
- ``X-Bench-Events: N``   how many events (default ``--events``)
- ``X-Bench-Idle: S``     "idle-ish" stream: one event per second for S seconds

``GET /ok`` answers 200 (the gateway's health check).

Run standalone: ``python bench/sse_upstream.py [--port 0] [--events 2000]``;
it prints ``LISTENING <port>`` once ready and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from functools import lru_cache

from aiohttp import web

DEFAULT_EVENTS = 2000
DEFAULT_BATCH = 64


def event(k: int) -> bytes:
    return b'event: custom\r\ndata: {"i":%d}\r\n\r\n' % k


@lru_cache(maxsize=16)
def body_chunks(n: int, batch: int) -> tuple[bytes, ...]:
    """The whole stream, pre-encoded, one element per write."""
    return tuple(b"".join(event(k) for k in range(i, min(i + batch, n))) for i in range(0, n, batch))


class Source:
    def __init__(self, events: int = DEFAULT_EVENTS, batch: int = DEFAULT_BATCH) -> None:
        self.events = events
        self.batch = batch
        self.streams = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/threads/{tid}/runs/stream", self.run_stream)
        app.router.add_get("/ok", self.ok)
        return app

    async def ok(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def run_stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()  # the run body is not looked at
        tid = request.match_info["tid"]
        rid = str(uuid.uuid4())
        self.streams += 1
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "Location": f"/threads/{tid}/runs/{rid}/stream",
            "Content-Location": f"/threads/{tid}/runs/{rid}",
        })
        await resp.prepare(request)
        idle = request.headers.get("X-Bench-Idle")
        if idle is not None:
            for k in range(int(idle)):
                await resp.write(event(k))
                await asyncio.sleep(1.0)
        else:
            n = int(request.headers.get("X-Bench-Events", self.events))
            for chunk in body_chunks(n, self.batch):
                await resp.write(chunk)
        await resp.write_eof()
        return resp


async def serve(port: int, events: int, batch: int) -> None:
    runner = web.AppRunner(Source(events, batch).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="events per write")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    args = p.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    asyncio.run(serve(args.port, args.events, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
