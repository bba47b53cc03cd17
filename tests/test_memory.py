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
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer

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
