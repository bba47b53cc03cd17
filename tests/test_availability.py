"""The gateway is never the reason a request fails: full pools, upstream blips, permanent failures.

Every test drives the gateway over real sockets against the fake upstream.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.upstream import CHECK_CONNECTIONS

from tests.conftest import RunningGateway, gateway_config
from tests.support.procs import free_port
from tests.fake_upstream import FakeAgentServer
from tests.support.sse import parse_all, read_events
from tests.support.runs import customs, join, new_thread, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def test_long_streams_filling_the_pool_do_not_take_the_upstream_down(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_connections": 3, "max_streams": 3, "pool_timeout": "300ms",
        "health": {"interval": "100ms", "timeout": "200ms", "unhealthy_threshold": 1}}}))
    tid = await new_thread(http, gw)
    runs = [await stream_run(http, gw, tid, n=400, delay=0.01) for _ in range(3)]  # every stream slot taken
    for r in runs:
        await read_events(r, limit=1)
    await asyncio.sleep(0.6)  # several health checks while the pool is full
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 200, await r.text()
    async with http.post(f"{gw.url}/threads", json={}) as r:
        assert r.status == 200, "plain requests have their own budget"
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
        assert r.status == 503 and r.content_type == "application/json"
        detail = (await r.json())["detail"]
        assert "default" in detail and "pool" in detail and "full" in detail
    metrics = await (await http.get(gw.admin_url + "/metrics")).text()
    assert 'gateway_upstream_connections{kind="stream",upstream="default"} 3.0' in metrics
    for r in runs:
        r.close()


async def test_a_leg_that_breaks_while_the_stream_pool_is_full_waits_for_a_connection_and_never_ends_the_run(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # One stream connection. Run A holds it; run B's request waits for it; A's leg breaks, and its
    # connection goes to B. A's re-join finds the pool full for longer than every attempt it has:
    # the gateway's own saturation, while the upstream runs A on. A must wait, not end in an error.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_streams": 1, "pool_timeout": "2s"}},
        streams={"reattach_backoff": "100ms", "reattach_attempts": 1}))
    ta, tb = await new_thread(http, gw), await new_thread(http, gw)
    fake_upstream.faults.cut_after = 10
    a = await stream_run(http, gw, ta, n=40, delay=0.05, assistant="a")
    assert a.status == 200
    b_request = asyncio.ensure_future(stream_run(http, gw, tb, n=160, delay=0.05, assistant="a"))
    got_a = await asyncio.wait_for(read_events(a), 60)
    b = await b_request
    assert b.status == 200, "B took the connection A's broken leg gave back"
    assert [e.event for e in got_a] == ["metadata"] + ["custom"] * 40, got_a[-1]
    assert customs(got_a) == list(range(40))
    assert customs(await asyncio.wait_for(read_events(b), 60)) == list(range(160))


async def test_a_client_that_stops_reading_a_forwarded_body_is_cut_and_frees_its_slot(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_connections": 2, "pool_timeout": "5s"}}, clients={"write_timeout": "500ms"}))
    host, port = gw.url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(2):  # two clients that ask for 50 MB and never read it
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big?size=52428800 HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(s)
    try:
        await asyncio.sleep(0.3)
        async with http.get(f"{gw.url}/echo/next") as r:  # waits for a freed slot, not forever
            assert r.status == 200
    finally:
        for s in stalled:
            s.close()


async def test_the_first_request_after_the_only_upstream_comes_back_succeeds(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    port = free_port()
    up = await FakeAgentServer().start(port=port)
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [up.url]}}))  # checks every 5 s
    await up.stop()
    async with http.get(f"{gw.url}/echo/x") as r:  # refused: the replica is marked down
        assert r.status == 502
    up = await FakeAgentServer().start(port=port)  # back at once, long before the next health check
    try:
        async with http.get(f"{gw.url}/echo/y") as r:
            assert r.status == 200, await r.text()
        assert gw.gw.upstreams.pools["default"].replicas[0].healthy, "a success puts the replica back"
    finally:
        await up.stop()


async def test_a_stalled_upstream_leg_is_rejoined_after_the_read_timeout_and_clients_get_heartbeats(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "read_timeout": "1500ms"}},
                                           streams={"heartbeat": "400ms", "reattach_backoff": "100ms"}))
    fake_upstream.faults.stall_after = 5  # half an event, then nothing: the connection stays open
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=20, delay=0.02, assistant="a")
    raw = await asyncio.wait_for(resp.read(), 30)
    events = parse_all(raw.decode())
    assert customs(events) == list(range(20)) and all(e.event in ("metadata", "custom") for e in events), \
        "the re-joined leg continues exactly where the stalled one stopped"
    assert raw.count(b": heartbeat") >= 2, "the client heard from the gateway while the upstream was silent"
    assert [p for m, p in fake_upstream.requests if m == "GET" and p.endswith("/stream")], "re-joined"


async def test_a_rejoin_answered_404_ends_at_once(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "1s", "reattach_attempts": 5}))
    tid = await new_thread(http, gw)
    fake_upstream.faults.cut_after = 3
    resp = await stream_run(http, gw, tid, n=200, delay=0.01)
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    fake_upstream.runs.pop(run_id)  # the upstream forgot the run: its join answers 404
    fake_upstream.behaviour.join_unknown_status = 404
    got = await asyncio.wait_for(read_events(resp), 30)
    assert got[-1].event == "error" and got[-1].json["error"] == "CaptureInterrupted"
    assert "404" in got[-1].json["message"]
    joins = [p for m, p in fake_upstream.requests if m == "GET" and p.startswith(f"/threads/{tid}/runs/{run_id}/stream")]
    assert len(joins) == 1, f"a permanent failure was retried: {len(joins)} re-joins"


async def test_an_event_over_the_size_limit_ends_at_once(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"max_event_bytes": "64KiB", "reattach_backoff": "1s"}))
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=5, pad=200_000)
    got = await asyncio.wait_for(read_events(resp), 20)
    assert got[-1].event == "error" and "larger than" in got[-1].json["message"]
    assert not [p for m, p in fake_upstream.requests if m == "GET" and p.endswith("/stream")], "not retried"


async def test_an_upstream_event_id_too_long_to_store_ends_the_stream_with_an_error_event(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    fake_upstream.faults.id_pad = 70_000  # over 65,535 bytes: more than a record can hold
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=5)
    got = await asyncio.wait_for(read_events(resp), 20)
    assert [e.event for e in got] == ["error"] and got[0].json["error"] == "CaptureInterrupted"
    assert "id" in got[0].json["message"]
    again = await asyncio.wait_for(join(http, gateway.url + resp.headers["Location"], "-1"), 20)
    assert again == got, "the stream ended: a reconnect replays it, it does not capture it again"
    assert not [p for m, p in fake_upstream.requests if m == "GET" and p.endswith("/stream")], "not retried"
    assert "crashed" not in caplog.text


async def test_clients_trickling_request_bodies_hold_no_upstream_connection(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_connections": 4, "pool_timeout": "1s"}},
        clients={"body_timeout": "3s"}))
    tid = await new_thread(http, gw)
    port = int(gw.url.rsplit(":", 1)[1])

    # More trickling clients than the upstream has forward connections, on a plain forward and
    # on the run-creating path the gateway reads itself.
    slow = [asyncio.create_task(trickle(port, "/threads")) for _ in range(6)]
    slow.append(asyncio.create_task(trickle(port, f"/threads/{tid}/runs/stream")))
    await asyncio.sleep(1.5)
    async with http.get(f"{gw.url}/threads/{tid}") as r:
        assert r.status == 200, await r.text()
    async with http.post(f"{gw.url}/threads", json={}) as r:
        assert r.status == 200, await r.text()
    answers = await asyncio.wait_for(asyncio.gather(*slow), 30)
    for raw in answers:
        assert_body_timeout(raw)


async def test_a_body_too_big_to_read_first_streams_but_not_forever(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"body_timeout": "1s", "body_buffer_bytes": "1KiB"}))
    async with http.post(f"{gw.url}/echo", data=b"x" * 5000) as r:  # streamed through, whole
        assert r.status == 200 and len(base64.b64decode((await r.json())["body_b64"])) == 5000
    port = int(gw.url.rsplit(":", 1)[1])
    assert_body_timeout(await asyncio.wait_for(trickle(port, "/echo", first=b"y" * 2000, every=1.5), 30))


async def trickle(port: int, path: str, first: bytes = b"", every: float = 0.2) -> bytes:
    """Announce a 100 kB body, send ``first``, then a byte every ``every`` seconds; what the gateway answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100000\r\n\r\n".encode() + first)
    try:
        while not reader.at_eof():
            writer.write(b" ")
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                continue
    except ConnectionError:
        pass
    finally:
        writer.close()
    return b""


def assert_body_timeout(raw: bytes) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), raw[:200]
    assert b"body_timeout" in body, "the answer says which setting, in the API's shape"


async def test_the_replica_health_series_scraped_goes_to_zero_while_the_upstream_is_down_and_back(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """What GatewayUpstreamDown reads: gateway_upstream_replica_healthy{upstream,replica} is 1 from
    start-up, 0 once the only replica is unreachable (its health checks fail), 1 once it answers again."""
    port = free_port()
    up = await FakeAgentServer().start(port=port)
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [up.url], "health": {"interval": "100ms", "timeout": "200ms", "unhealthy_threshold": 2}}}))

    async def healthy() -> list[tuple[dict[str, str], float]]:
        async with http.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "gateway_upstream_replica_healthy"]

    async def until(value: float) -> list[tuple[dict[str, str], float]]:
        got = await healthy()
        for _ in range(50):
            if [v for _labels, v in got] == [value]:
                break
            await asyncio.sleep(0.05)
            got = await healthy()
        return got

    labels = {"upstream": "default", "replica": up.url}
    assert await healthy() == [(labels, 1.0)]
    await up.stop()
    assert await until(0.0) == [(labels, 0.0)]
    up = await FakeAgentServer().start(port=port)
    try:
        assert await until(1.0) == [(labels, 1.0)]
    finally:
        await up.stop()


async def _a_finished_run_whose_checks_hang(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                                            tmp_path: Path, http: aiohttp.ClientSession) -> tuple[RunningGateway, str, str]:
    """A gateway (pool_timeout 300 ms) holding a finished run, its thread and its join URL; from here
    on every upstream request takes 2 s (under an access check's own 3 s limit)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "pool_timeout": "300ms"}}))
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=3, assistant="a")
    await read_events(resp)
    loc = gw.url + resp.headers["Location"]
    fake_upstream.faults.hang = 2.0  # every check takes 2 s (under the check's own 3 s limit)
    return gw, tid, loc


async def test_a_resume_that_finds_the_access_check_pool_full_is_a_503_not_a_404(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # Every client of a held run is checked with the upstream first, at most CHECK_CONNECTIONS at once
    # per upstream. One that finds them all in use (a reconnect storm of many users, a slow upstream)
    # was taken for "the upstream cannot answer": anyone but the captor got 404 Run not found, which
    # every SDK takes as final, for a run that exists and is theirs to read.
    gw, _, loc = await _a_finished_run_whose_checks_hang(make_gateway, fake_upstream, tmp_path, http)

    async def resume(user: int) -> tuple[int, str]:
        async with http.get(loc, headers={"Last-Event-ID": "-1", "X-User": str(user)}) as r:
            return r.status, await r.text()

    holding = [asyncio.ensure_future(resume(i)) for i in range(CHECK_CONNECTIONS)]
    await asyncio.sleep(0.5)  # every check connection is in use
    status, body = await resume(CHECK_CONNECTIONS)
    assert status == 503, (status, body)
    assert "pool" in orjson.loads(body)["detail"]
    for status, body in await asyncio.gather(*holding):
        assert status == 200, body


async def test_clients_opening_one_stream_together_on_a_full_pool_share_one_wait(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The first client of a stream the gateway does not capture opens its leg under the stream's
    # lock, so that clients arriving together share one capture. When that open failed (the pool
    # full, an upstream that does not answer), each client waiting on the lock tried again in turn:
    # the k-th got its 503 after k pool timeouts, not one. They get the failure they waited for.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_streams": 1, "pool_timeout": "1s"}}))
    tid = await new_thread(http, gw)
    run = await stream_run(http, gw, tid, n=400, delay=0.05, assistant="a")  # holds the only stream connection
    await read_events(run, limit=1)

    async def join_thread() -> tuple[int, str]:
        async with http.get(f"{gw.url}/threads/{tid}/stream") as r:
            return r.status, await r.text()

    answers = await asyncio.gather(*(join_thread() for _ in range(5)))
    for status, body in answers:
        assert status == 503 and "pool" in orjson.loads(body)["detail"], (status, body)
    assert gw.gw.upstreams.pools["default"].budgets["stream"].refused == 1, "one wait for the pool, shared"
    run.close()


async def test_a_join_whose_existence_check_finds_the_pool_full_is_a_503_and_captures_nothing(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # Before capturing a run it does not hold, the gateway asks the upstream whether it exists: the
    # upstream answers a join of an unknown run with 200 and an error event, which must not become a
    # finished run in the log. A check that found every check connection in use was taken for "no
    # quick answer": the join went ahead and the log held the upstream's "Run not found" as the run.
    gw, tid, loc = await _a_finished_run_whose_checks_hang(make_gateway, fake_upstream, tmp_path, http)

    async def resume(user: int) -> int:
        async with http.get(loc, headers={"Last-Event-ID": "-1", "X-User": str(user)}) as r:
            await r.read()
            return r.status

    holding = [asyncio.ensure_future(resume(i)) for i in range(CHECK_CONNECTIONS)]
    await asyncio.sleep(0.5)  # every check connection is in use
    rid = str(uuid.uuid4())
    async with http.get(f"{gw.url}/threads/{tid}/runs/{rid}/stream", headers={"Last-Event-ID": "-1"}) as r:
        status, body = r.status, await r.text()
    assert status == 503 and "pool" in orjson.loads(body)["detail"], (status, body)
    assert await gw.gw.log.lookup(f"default/run/{rid}") is None
    assert await asyncio.gather(*holding) == [200] * CHECK_CONNECTIONS
