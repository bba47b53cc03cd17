"""Resume through the gateway in front of the real LangGraph server (langgraph dev, examples/agent)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningGateway
from tests.support.sse import Ev, read_events
from tests.support.runs import assert_ids_increase, customs, join, new_thread


async def start(http: aiohttp.ClientSession, gw: RunningGateway, n: int, delay: float,
                resumable: bool | None = None) -> aiohttp.ClientResponse:
    tid = await new_thread(http, gw)
    body: dict[str, Any] = {"assistant_id": "ticker", "input": {"n": n, "delay": delay}, "stream_mode": ["custom"]}
    if resumable is not None:
        body["stream_resumable"] = resumable
    resp = await http.post(f"{gw.url}/threads/{tid}/runs/stream", json=body)
    assert resp.status == 200
    return resp


@pytest.mark.parametrize("k", [1, 2, 4, 9, 16, 25])
async def test_disconnect_after_k_then_resume(lg_gateway: RunningGateway, http: aiohttp.ClientSession, k: int) -> None:
    # Not resumable upstream: the gateway's log is the only way back.
    resp = await start(http, lg_gateway, n=24, delay=0.02, resumable=False)
    first = await read_events(resp, limit=k)
    resp.close()
    rest = await join(http, lg_gateway.url + resp.headers["Location"], first[-1].id)
    union = first + rest
    assert [e.event for e in union] == ["metadata"] + ["custom"] * 24
    assert customs(union) == list(range(24))
    assert_ids_increase(union)


async def test_query_form_and_slow_reader(lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    resp = await start(http, lg_gateway, n=40, delay=0.01)
    loc = lg_gateway.url + resp.headers["Location"]
    first = await read_events(resp, limit=5)
    resp.close()
    async with http.get(loc, params={"last_event_id": first[-1].id or ""}) as slow:
        got: list[Ev] = []
        while True:
            batch = await read_events(slow, limit=3)
            got += batch
            if len(batch) < 3:
                break
            await asyncio.sleep(0.05)  # a reader slower than the run
    assert customs(first + got) == list(range(40))


@pytest.mark.parametrize("subscribers", [2, 10])
async def test_concurrent_subscribers(lg_gateway: RunningGateway, http: aiohttp.ClientSession, subscribers: int) -> None:
    resp = await start(http, lg_gateway, n=30, delay=0.02)
    loc = lg_gateway.url + resp.headers["Location"]

    async def sub(i: int) -> list[Ev]:
        await asyncio.sleep(0.02 * i)
        return await join(http, loc, "-1")

    results = await asyncio.gather(read_events(resp), *(sub(i) for i in range(subscribers)))
    for got in results:
        assert customs(got) == list(range(30))
        assert_ids_increase(got)
