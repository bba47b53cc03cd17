"""What a stream leaves behind in memory. The gateway tunes CPython's cyclic collector for a server
(``gateway.runtime.tune_gc``: start-up objects frozen, collections rarer), which is only sound while
streams leave no reference cycles for it to find: a cycle per stream would be a leak that only
the collector hides, and rarer collections would let it grow.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import re
import socket
import tracemalloc
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from gateway.proxy import RelayedResponse
from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.runs import customs, new_thread
from tests.support.sse import read_events

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One request on its own connection, read to the end, by a client that makes no cycles itself."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Host: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
    writer.close()
    await writer.wait_closed()
    return out


async def one_stream(port: int, tid: str, *, rejoin: bool) -> None:
    body = b'{"assistant_id":"a","input":{"n":5,"delay":0}}'
    out = await raw_request(port, b"POST /threads/%s/runs/stream HTTP/1.1\r\nContent-Type: application/json\r\n"
                            % tid.encode(), body)
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    if rejoin:  # and replayed from the log
        m = re.search(rb"(?i)\r\nlocation: ([^\r]+)", out)
        assert m is not None
        again = await raw_request(port, b"GET %s HTTP/1.1\r\nLast-Event-ID: 0\r\n" % m.group(1))
        assert again.startswith(b"HTTP/1.1 200") and again.count(b"event: custom") == 5


async def garbage_per_request(http: aiohttp.ClientSession, url: str, streams: int, *, rejoin: bool) -> tuple[float, Any]:
    port = int(url.rsplit(":", 1)[1])
    tids = []
    for _ in range(streams + 10):
        async with http.post(f"{url}/threads", json={}) as r:
            tids.append((await r.json())["thread_id"])
    for tid in tids[:10]:  # warm: caches and pools filled, first-use imports done
        await one_stream(port, tid, rejoin=rejoin)
    await asyncio.sleep(0.2)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept in gc.garbage, not freed
    try:
        for tid in tids[10:]:
            await one_stream(port, tid, rejoin=rejoin)
        await asyncio.sleep(0.3)
        gc.collect()
    finally:
        gc.set_debug(0)
    found = list(gc.garbage)
    gc.garbage.clear()
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in found)
    return len(found) / (streams * (2 if rejoin else 1)), kinds.most_common(10)


async def test_a_stream_and_its_replay_leave_no_reference_cycles_behind(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    direct, _ = await garbage_per_request(http, fake_upstream.url, 40, rejoin=False)
    through, kinds = await garbage_per_request(http, gw.url, 40, rejoin=True)
    # The baseline is the same streams straight to the upstream, per request (this client's
    # connections leave a few objects in cycles, asyncio's own); the gateway adds nothing to it.
    assert through <= direct + 0.5, f"{through:.1f} objects in cycles per request through the gateway, " \
                                  f"{direct:.1f} direct; most common: {kinds}"


async def test_an_idle_capture_waits_without_a_task_and_the_leg_s_end_takes_it_up_again(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """While a leg is open its capture is parked (``Captures._park``): no task, no coroutine,
    for the hours an idle stream lasts. The leg's events still reach the log as they come, and
    its end starts the task again, which finishes the stream."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    async with http.post(f"{gw.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    captures = gw.gw.hub.captures
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": 3, "delay": 0.6}}) as resp:
        seen = b""
        while b"event: custom" not in seen:  # the first of three events, 0.6 s apart
            seen += await resp.content.readany()
        (ing,) = captures.live.values()
        assert ing.parked is not None and ing.task is None
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ingest:")]
        seen += await resp.content.read()  # to the end: the leg's end took the capture up again
    assert seen.count(b"event: custom") == 3 and resp.status == 200
    for _ in range(50):  # the capture lets go once the stream's end is committed
        if not captures.live:
            break
        await asyncio.sleep(0.02)
    assert not captures.live
    meta = await gw.gw.log.lookup(ing.key)
    assert meta is not None and meta.finished


async def test_a_capture_stopped_as_its_leg_ends_lets_the_leg_go_even_before_its_task_began(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The leg's end starts the capture's task again; a stop that comes before that task's first
    step (an orphaned run, a lost claim) cancels a task that never runs its clean-up, so the
    capture must let go of the leg itself: its upstream connection slot is given back."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    async with http.post(f"{gw.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    captures = gw.gw.hub.captures
    budget = gw.gw.upstreams.pools["default"].budgets["stream"]
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": 2, "delay": 2}}) as resp:
        seen = b""
        while b"event: custom" not in seen:
            seen += await resp.content.readany()
        (ing,) = captures.live.values()
        assert ing.parked is not None and budget.in_use == 1
        ing.parked.end.set_result(None)  # the leg's end, as the connection reports it
        await asyncio.sleep(0)  # the end's callback ran: the task is created, its first step not run
        assert ing.task is not None and not ing.task.done()
        assert await captures.stop(ing)
        assert budget.in_use == 0 and ing.parked is None and not captures.live


async def _stalled_replays(port: int, paths: list[str]) -> list[socket.socket]:
    """Clients replaying ``paths`` from the start that never read a byte (a tab in the background):
    each holds the gateway's write to it until ``clients.write_timeout``."""
    loop = asyncio.get_running_loop()
    socks = []
    for path in paths:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: -1\r\n\r\n".encode())
        socks.append(sock)
    return socks


async def _settled(sample: Callable[[], int], rounds: int = 40, every: float = 0.25) -> int:
    """``sample()`` once it stopped growing (two samples in a row within 1%), at most ``rounds`` tries."""
    last = sample()
    for _ in range(rounds):
        await asyncio.sleep(every)
        now = sample()
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


async def test_a_stalled_client_replaying_a_long_stream_holds_what_the_readme_says(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README (Slow clients): 1,000 stalled clients cost about 256 MiB at most, 256 KiB each. A client
    replaying a long finished run that stops reading held its whole page of the log (up to 4 MiB of
    events, and the same again framed) until the write timeout. Measured in Python's own allocations
    (tracemalloc), not RSS, which counts the log's mapped pages too: what the gateway lets go when the
    stalled clients leave. Each client on a run of its own (no page shared), each run longer than
    the kernel's socket buffers take (megabytes on loopback), so every replay is stuck in the gateway."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"write_timeout": 120}))
    paths = []
    for _ in range(4):
        tid = await new_thread(http, gw)
        async with http.post(f"{gw.url}/threads/{tid}/runs/stream",
                             json={"assistant_id": "a", "input": {"n": 4000, "delay": 0, "pad": 2000}}) as r:
            assert r.status == 200
            paths.append(r.headers["Location"])
            assert len(customs(await read_events(r))) == 4000  # ~8 MB, a run that finished
    followers = gw.gw.hub.presence.followers
    gc.collect()
    tracemalloc.start()
    socks: list[socket.socket] = []
    try:
        socks = await _stalled_replays(gw.server.addresses["main"][1], paths)
        stalled = await _settled(lambda: tracemalloc.get_traced_memory()[0])
        assert len(followers) == len(paths), "every replay still under way: stuck in the gateway"
        for s in socks:
            s.close()  # unread data: a reset, which the gateway's next write sees
        for _ in range(200):
            if not followers:
                break
            await asyncio.sleep(0.05)
        assert not followers
        gc.collect()
        held = stalled - await _settled(lambda: tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        for s in socks:
            s.close()
    assert held / len(paths) <= 256 << 10, f"{held // len(paths) >> 10} KiB per stalled client"


async def test_a_stream_on_a_kept_alive_connection_holds_nothing_of_the_request_answered_before_it(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A client creates its thread, then streams a run on the same connection (the SDK's pooled
    connections do). aiohttp's request loop kept the first answer (its headers, body and writer)
    until the stream's own was done: hours, for an idle stream."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection:
        async with one_connection.post(f"{gw.url}/threads", json={}) as r:
            tid = (await r.json())["thread_id"]
        async with one_connection.post(f"{gw.url}/threads/{tid}/runs/stream",
                                       json={"assistant_id": "a", "input": {"n": 2, "delay": 1}}) as resp:
            seen = b""
            while b"event: custom" not in seen:
                seen += await resp.content.readany()
            gc.collect()
            answered = [o for o in gc.get_objects() if isinstance(o, RelayedResponse)]
            assert answered == [], f"{len(answered)} answered response(s) still held beside the stream"
            seen += await resp.content.read()
        assert seen.count(b"event: custom") == 2


async def test_a_streamed_run_holds_no_buffer_for_the_request_body_it_read(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """aiohttp keeps a request's body reader for as long as the request: hours for a run streamed.
    Read to its end, the reader keeps no buffer of its own (an empty one is ~600 bytes per stream)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    streams = []
    try:
        for _ in range(3):
            tid = await new_thread(http, gw)
            resp = await http.post(f"{gw.url}/threads/{tid}/runs/stream",
                                   json={"assistant_id": "a", "input": {"n": 1, "delay": 30}})
            streams.append(resp)
            seen = b""
            while b"event: metadata" not in seen:  # the run is on: its event comes in 30 s
                seen += await resp.content.readany()
        server = gw.server.main.server
        assert server is not None
        requests = [c._current_request for c in server.connections if c._current_request is not None]
        assert len(requests) == 3
        buffers = {id(r.content._buffer) for r in requests}
        assert len(buffers) == 1, "each streamed run keeps a buffer of its own for a body read long ago"
        for r in requests:
            assert r.content.at_eof() and not r.content._buffer
    finally:
        for resp in streams:
            resp.release()
