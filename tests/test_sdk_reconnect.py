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

from tests.support.chaos_proxy import ChaosProxy
from tests.support.sse import read_events

pytestmark = pytest.mark.timeout(60)

N = 30
TICKER = {"n": N, "delay": 0.02}
MODES: list[StreamMode] = ["custom", "values"]

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
