"""Resume through the gateway in front of the real LangGraph server (langgraph dev, examples/agent)."""

from __future__ import annotations

import asyncio
from pathlib import Path
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


async def test_workers_on_the_embedded_log_in_front_of_the_real_server_survive_the_owner_killed(
        gateway_process: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two gateway processes on one LMDB directory (what ``--workers 2`` runs): a live follower on
    the second, the first SIGKILLed mid-run; the second takes the run over from the real server."""
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"upstreams:\n  default:\n    urls: [{langgraph_server.url}]\n"
                   f"storage:\n  path: {tmp_path / 'data'}\n  shared: true\n  lease_ttl: 1500ms\n"
                   "streams:\n  reattach_backoff: 100ms\n")
    a, b = (gateway_process("--config", str(cfg)).start() for _ in range(2))
    tid = await new_thread(http, a.url)
    resp = await http.post(f"{a.url}/threads/{tid}/runs/stream", json={
        "assistant_id": "ticker", "input": {"n": 60, "delay": 0.03}, "stream_mode": ["custom"]})
    assert resp.status == 200
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=5)
    follower = await http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""})
    followed = await read_events(follower, limit=5)  # live, from a's commits
    a.kill()
    resp.close()
    followed += await asyncio.wait_for(read_events(follower), 60)
    follower.close()
    union = seen + followed
    assert [e.event for e in union] == ["metadata"] + ["custom"] * 60
    assert customs(union) == list(range(60))
    assert_ids_increase(union)
    assert await join(http, b.url + loc, "-1") == union, "the log holds what the follower got"
