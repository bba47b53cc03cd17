"""Upstreams that answer event streams in ways the Agent Server itself does not, but the paths to it
and other servers do: what a client reading the upstream directly would get is what the gateway
stores and serves, and what it cannot capture it says."""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run
from tests.support.sse import read_events

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def test_an_upstream_that_gzips_event_streams_is_captured_and_served_plain(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    # Clients send Accept-Encoding: gzip by default (aiohttp, httpx, browsers), and a proxy in front of
    # the agent server may compress text/event-stream. The gateway parses the legs itself and writes
    # its own framing: a leg it reads must come unencoded, and no client may be told its plain body
    # is gzip.
    fake_upstream.behaviour.gzip_streams = True
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=5, assistant="a")
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    live = await read_events(resp)
    assert [e.event for e in live] == ["metadata"] + ["custom"] * 5 and customs(live) == list(range(5))
    assert_ids_increase(live)
    assert await join(http, gateway.url + resp.headers["Location"], "-1") == live

    # A join the gateway opens with the client's own headers (a run it never saw, created elsewhere).
    async with http.post(f"{fake_upstream.url}/threads/{tid}/runs",
                         json={"assistant_id": "a", "input": {"n": 4}, "stream_resumable": True}) as r:
        rid = (await r.json())["run_id"]
    assert await fake_upstream.wait_status(rid, "success") == "success"
    async with http.get(f"{gateway.url}/threads/{tid}/runs/{rid}/stream", headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 200 and "Content-Encoding" not in r.headers
        joined = await read_events(r)
    assert customs(joined) == list(range(4)) and all(e.event in ("metadata", "custom") for e in joined)
