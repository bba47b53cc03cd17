"""Replays from the log never bypass the upstream's own auth."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.sse import Ev, read_events
from tests.support.runs import customs

KEY = {"X-Api-Key": "alice-key"}


async def _run(http: aiohttp.ClientSession, gw: RunningGateway, *, stateless: bool = False) -> tuple[str, list[Ev]]:
    if stateless:
        url = f"{gw.url}/runs/stream"
    else:
        async with http.post(f"{gw.url}/threads", json={}, headers=KEY) as r:
            url = f"{gw.url}/threads/{(await r.json())['thread_id']}/runs/stream"
    async with http.post(url, json={"assistant_id": "a", "input": {"n": 4}}, headers=KEY) as r:
        assert r.status == 200
        return gw.url + r.headers["Location"], await read_events(r)


async def test_resume_needs_what_the_upstream_needs(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                    http: aiohttp.ClientSession) -> None:
    fake_upstream.faults.api_key = "alice-key"
    loc, original = await _run(http, gateway)
    async with http.get(loc, headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 401, "no key: the upstream's refusal, not the log"
        assert await r.json() == {"detail": "Invalid API key"}
    async with http.get(loc, headers={"Last-Event-ID": "-1", "X-Api-Key": "mallory"}) as r:
        assert r.status == 401
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
        assert r.status == 200
        assert await read_events(r) == original


async def test_thread_stream_of_someone_else_is_refused(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                        http: aiohttp.ClientSession) -> None:
    fake_upstream.faults.api_key = "alice-key"
    async with http.post(f"{gateway.url}/threads", json={}, headers=KEY) as r:
        tid = (await r.json())["thread_id"]
    url = f"{gateway.url}/threads/{tid}/stream"
    alice = await http.get(url, headers=KEY)
    assert alice.status == 200
    async with http.get(url) as r:  # the capture is live, but this client has no key
        assert r.status == 401
    alice.close()


async def test_when_the_upstream_cannot_answer_only_the_captor_resumes(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    fake_upstream.faults.api_key = "alice-key"
    loc, original = await _run(http, gateway)
    await fake_upstream.stop()
    async with http.get(loc, headers={"Last-Event-ID": "-1", "X-Api-Key": "mallory"}) as r:
        assert r.status == 404
        assert "detail" in await r.json()
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
        assert r.status == 200
        assert customs(await read_events(r)) == customs(original) == [0, 1, 2, 3]


async def test_stateless_runs_are_bound_to_their_captor(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                        http: aiohttp.ClientSession) -> None:
    loc, original = await _run(http, gateway, stateless=True)
    async with http.get(loc, headers={"Last-Event-ID": "-1", "X-Api-Key": "someone-else"}) as r:
        assert r.status == 404
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
        assert await read_events(r) == original


async def test_anything_but_a_clear_yes_leaves_it_to_the_captor(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                                http: aiohttp.ClientSession) -> None:
    loc, original = await _run(http, gateway)
    fake_upstream.faults.status = 429  # neither yes nor no
    async with http.get(loc, headers={"Last-Event-ID": "-1", "X-Api-Key": "mallory"}) as r:
        assert r.status == 404
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
        assert r.status == 200 and await read_events(r) == original


async def test_a_hung_upstream_does_not_hang_resumes(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                     http: aiohttp.ClientSession) -> None:
    loc, original = await _run(http, gateway)
    fake_upstream.faults.hang = 30  # far beyond the access check's own short timeout
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY},
                        timeout=aiohttp.ClientTimeout(total=15)) as r:
        assert r.status == 200 and await read_events(r) == original


async def test_a_yes_from_the_upstream_is_reused_for_a_while(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                             http: aiohttp.ClientSession) -> None:
    loc, _ = await _run(http, gateway)
    for _ in range(3):
        async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
            assert r.status == 200
            await r.read()
    checks = [p for m, p in fake_upstream.requests if m == "GET" and p.count("/") == 4 and "/runs/" in p]
    assert len(checks) == 1


def _run_checks(fake: FakeAgentServer) -> int:
    return len([p for m, p in fake.requests if m == "GET" and p.count("/") == 4 and "/runs/" in p])


async def test_simultaneous_resumes_share_one_check(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                    http: aiohttp.ClientSession) -> None:
    loc, original = await _run(http, gateway)
    fake_upstream.faults.hang = 0.5  # the check is slow, so all the resumes below overlap it

    async def resume(headers: dict[str, str]) -> tuple[int, list[Ev]]:
        async with http.get(loc, headers={"Last-Event-ID": "-1", **headers}) as r:
            return r.status, await read_events(r) if r.status == 200 else []

    results = await asyncio.gather(*(resume(KEY) for _ in range(20)))
    assert results == [(200, original)] * 20
    assert _run_checks(fake_upstream) == 1, "twenty identical checks at once: one upstream request"
    # Another caller is asked about separately, and a refusal is never shared: each asks for itself.
    fake_upstream.faults.api_key = "alice-key"
    refused = await asyncio.gather(*(resume({"X-Api-Key": "mallory"}) for _ in range(5)))
    assert refused == [(401, [])] * 5
    assert _run_checks(fake_upstream) == 1 + 5


async def test_a_yes_is_reused_across_tracing_headers_and_asked_again_after_authorize_ttl(
        make_gateway: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: a yes is cached for streams.authorize_ttl, keyed by every header but per-request tracing
    and caching ones such as traceparent or Cache-Control (else every traced client misses every time)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"authorize_ttl": "1500ms"}))
    loc, original = await _run(http, gw)
    for i in range(3):
        async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY, "traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01",
                                          "Cache-Control": "no-cache", "X-Request-Id": str(i)}) as r:
            assert r.status == 200 and await read_events(r) == original
    assert _run_checks(fake_upstream) == 1, "requests that differ only in tracing headers share one yes"
    await asyncio.sleep(1.6)
    async with http.get(loc, headers={"Last-Event-ID": "-1", **KEY}) as r:
        assert r.status == 200 and await read_events(r) == original
    assert _run_checks(fake_upstream) == 2, "past authorize_ttl the upstream is asked again"
