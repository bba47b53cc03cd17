#!/usr/bin/env python3
"""What one upstream leg costs on aiohttp's client, on the gateway's own streaming client
(``gateway.streamclient``), and on a bare asyncio protocol that does nothing else (the floor).

    .venv/bin/python bench/upstream_leg.py                       # 3 interleaved rounds, 2,000 legs, 1,000 idle
    .venv/bin/python bench/upstream_leg.py --legs 5000 --idle 2000 --rounds 5

Against the shared bench's C upstream (``$BENCH_WORK/bin/upstream``, built by ``bench/shared.py`` or
``../shared/bench/run.sh``), started here on a free loopback port and stopped here. The clients run
in this one process, alternately, with the same concurrency:

- CPU per leg: ``--legs`` legs of one event each (``POST /threads/{tid}/runs/stream``, 200 bytes),
  200 at a time, each read to its end; process CPU time over the legs. aiohttp is used as the
  gateway uses it (one session, no connection limit, no cookie jar, no decompression, the same
  skipped automatic headers, a body read with ``iter_any``); the gateway's client as a capture
  uses it (the body handed to a sink as it arrives); the bare client is an ``asyncio.Protocol``
  that writes the request, parses the status line and headers, and de-chunks the body in
  ``data_received``, reusing kept-alive connections as aiohttp's pool does.
- Memory per open leg: ``--idle`` legs whose upstream sends the first event and then nothing for a
  minute, held open; tracemalloc's difference per leg after a collection.

The bare client is only what this measurement needs (HTTP/1.1, chunked, no TLS, no proxy, no
timeouts, no error handling): the floor a client of streaming legs could reach, not a design.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import orjson
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ports import free_port, wait_port  # noqa: E402
from gateway.streamclient import LegResponse, StreamClient  # noqa: E402

BATCH = 200


def body(n: int, delay_ms: int) -> bytes:
    return orjson.dumps({"assistant_id": "a", "input": {"n": n, "size": 200, "delay_ms": delay_ms}})


async def _first_event_then_idle(resp: aiohttp.ClientResponse | LegResponse) -> Callable[[], None]:
    await resp.content.readany()  # the first event; then the leg idles
    return resp.close


class AiohttpLegs:
    name = "aiohttp"

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar())

    async def _open(self, n: int, delay_ms: int) -> aiohttp.ClientResponse:
        return await self.session.request(
            "POST", f"{self.base}/threads/{uuid.uuid4()}/runs/stream", data=body(n, delay_ms),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))

    async def whole(self) -> None:
        resp = await self._open(1, 0)
        async for _ in resp.content.iter_any():
            pass
        resp.release()

    async def held(self) -> Callable[[], None]:
        return await _first_event_then_idle(await self._open(2, 60_000))

    async def close(self) -> None:
        await self.session.close()


class BareLeg(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection reading chunked SSE responses, parsed where bytes arrive."""

    def __init__(self, pool: list[BareLeg]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_body = False
        self.done: asyncio.Future[None] | None = None
        self.first: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.done, self.first = loop.create_future(), loop.create_future()
        self.in_body = False
        self.transport.write(request)
        return self.first, self.done

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(bytes(buf[:end]).decode())
            del buf[:end + 4]
            self.in_body = True
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            if len(buf) < eol + 4 + size:
                return
            del buf[:eol + 4 + size]  # the chunk's bytes would be parsed as SSE here
            if self.first is not None and not self.first.done():
                self.first.set_result(None)
            if size == 0:
                assert self.done is not None
                self.done.set_result(None)
                self.pool.append(self)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)


class BareLegs:
    name = "bare"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[BareLeg] = []

    async def _open(self, n: int, delay_ms: int) -> tuple[BareLeg, asyncio.Future[None], asyncio.Future[None]]:
        if self.idle:
            leg = self.idle.pop()
        else:
            _, leg = await asyncio.get_running_loop().create_connection(
                lambda: BareLeg(self.idle), self.host, self.port)
        data = body(n, delay_ms)
        request = (f"POST /threads/{uuid.uuid4()}/runs/stream HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        first, done = leg.send(request)
        return leg, first, done

    async def whole(self) -> None:
        _, _, done = await self._open(1, 0)
        await done

    async def held(self) -> Callable[[], None]:
        leg, first, _ = await self._open(2, 60_000)
        await first
        assert leg.transport is not None
        return leg.transport.close

    async def close(self) -> None:
        for leg in self.idle:
            if leg.transport is not None:
                leg.transport.close()


class GatewayLegs:
    """The gateway's own client of streaming legs (``gateway.streamclient``), as a capture uses it."""

    name = "gateway"

    def __init__(self, base: str) -> None:
        self.base = URL(base)
        self.client = StreamClient()

    async def _open(self, n: int, delay_ms: int) -> LegResponse:
        return await self.client.request(
            "POST", self.base.with_path(f"/threads/{uuid.uuid4()}/runs/stream"),
            {"Content-Type": "application/json", "Accept": "text/event-stream"}, body(n, delay_ms),
            connect_timeout=5.0, read_timeout=600.0, on_release=lambda: None)

    async def whole(self) -> None:
        resp = await self._open(1, 0)
        with resp.attach(lambda data: None):
            await resp.end()
        resp.release()

    async def held(self) -> Callable[[], None]:
        return await _first_event_then_idle(await self._open(2, 60_000))

    async def close(self) -> None:
        self.client.close()


Legs = AiohttpLegs | BareLegs | GatewayLegs


async def cpu_per_leg(legs: Legs, n: int) -> float:
    for _ in range(BATCH):  # warm: connections in the pool, first-use allocations done
        await legs.whole()
    start = time.process_time()
    for i in range(0, n, BATCH):
        await asyncio.gather(*(legs.whole() for _ in range(min(BATCH, n - i))))
    return (time.process_time() - start) / n


async def memory_per_idle_leg(legs: Legs, n: int) -> float:
    closers: list[Callable[[], None]] = []
    gc.collect()
    before = tracemalloc.take_snapshot()
    for i in range(0, n, BATCH):
        closers += await asyncio.gather(*(legs.held() for _ in range(min(BATCH, n - i))))
    await asyncio.sleep(0.5)
    gc.collect()
    after = tracemalloc.take_snapshot()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    for close in closers:
        close()
    await asyncio.sleep(0.5)
    return grown / n


async def measure(args: argparse.Namespace, port: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "mem": []} for n in ("aiohttp", "bare", "gateway")}
    makers: list[Callable[[], Legs]] = [
        lambda: AiohttpLegs(f"http://127.0.0.1:{port}"), lambda: BareLegs("127.0.0.1", port),
        lambda: GatewayLegs(f"http://127.0.0.1:{port}")]
    for r in range(args.rounds):
        for make in makers if r % 2 == 0 else makers[::-1]:  # interleaved, the order alternating
            legs = make()
            cpu = await cpu_per_leg(legs, args.legs)
            tracemalloc.start(1)
            mem = await memory_per_idle_leg(legs, args.idle)
            tracemalloc.stop()
            await legs.close()
            results[legs.name]["cpu"].append(cpu)
            results[legs.name]["mem"].append(mem)
            print(f"round {r + 1} {legs.name:8} CPU per leg {cpu * 1e6:7.1f} us   memory per idle leg {mem / 1024:5.2f} KiB",
                  flush=True)
    return results


async def run_with_upstream(args: argparse.Namespace, main: Callable[[int], Awaitable[dict[str, dict[str, list[float]]]]]
                            ) -> dict[str, dict[str, list[float]]]:
    binary = Path(os.environ.get("BENCH_WORK", "/tmp/sse-bench")) / "bin" / "upstream"
    if not binary.exists():
        sys.exit(f"no {binary}: build the shared bench first (bench/shared.py or ../shared/bench/run.sh)")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-p", str(port), "-T", "600"], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        return await main(port)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--legs", type=int, default=2000)
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results = asyncio.run(run_with_upstream(args, lambda port: measure(args, port)))
    print("\nmedians of the rounds:")
    a, b, g = results["aiohttp"], results["bare"], results["gateway"]
    for what, unit, scale in (("cpu", "us CPU per leg", 1e6), ("mem", "KiB per idle leg", 1 / 1024)):
        ma, mb, mg = (statistics.median(r[what]) * scale for r in (a, b, g))
        print(f"  {unit:18}: aiohttp {ma:8.2f}   bare {mb:8.2f}   gateway {mg:8.2f}   "
              f"bare/aiohttp {mb / ma:.2f}   gateway/aiohttp {mg / ma:.2f}")


if __name__ == "__main__":
    main()
