"""Deliberate faults on both sides of the gateway: upstream cuts, hangs, 5xx; clients that leave."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.sse import read_events
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def test_upstream_cut_on_resumable_run_is_rejoined_without_gap_or_dup(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    fake_upstream.faults.cut_after = 7  # the gateway asked for stream_resumable, so ids exist upstream
    resp = await stream_run(http, gateway, tid, n=30, delay=0.01)
    got = await read_events(resp)
    assert customs(got) == list(range(30))
    assert_ids_increase(got)
    rejoins = [p for m, p in fake_upstream.requests if m == "GET" and p.endswith("/stream")]
    assert rejoins, "the gateway re-joined the upstream"
    assert gateway.gw.metrics.rejoins.labels("ok")._value.get() == 1


async def test_a_rejoin_knows_the_events_it_holds_when_their_retry_came_in_a_block_of_its_own(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    # A retry: in a block of its own is kept with the next event's body; the upstream's replay re-sends
    # that event without it. Compared with the retry, the re-sent events were new ones: duplicates,
    # after a gap marker saying the replay did not match.
    fake_upstream.behaviour.retry_blocks = True
    tid = await new_thread(http, gateway)
    fake_upstream.faults.cut_after = 7
    resp = await stream_run(http, gateway, tid, n=30, delay=0.01)
    got = await read_events(resp)
    assert [e.event for e in got].count("gap") == 0 and customs(got) == list(range(30))
    assert_ids_increase(got)
    assert gateway.gw.metrics.rejoins.labels("ok")._value.get() == 1


async def test_upstream_cut_on_non_resumable_run_is_marked_and_carries_on(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"request_resumable": False, "reattach_backoff": "50ms"}))
    tid = await new_thread(http, gw)
    fake_upstream.faults.cut_after = 4
    resp = await stream_run(http, gw, tid, n=60, delay=0.01)
    got = await read_events(resp)
    # What the upstream sent while the leg was down is gone, and the stream says so where it happened.
    names = [e.event for e in got]
    assert names.count("gap") == 1 and "error" not in names
    before, after = customs(got[: names.index("gap")]), customs(got[names.index("gap"):])
    assert before == list(range(len(before))), "a prefix, never a hole"
    assert after == list(range(after[0], 60)), "then the live tail to the end"
    # The replay shows the same, marker included.
    assert await join(http, gw.url + resp.headers["Location"], "-1") == got


async def test_client_leaving_does_not_stop_capture(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=20, delay=0.01)
    await read_events(resp, limit=2)
    loc = gateway.url + resp.headers["Location"]
    resp.close()
    await asyncio.sleep(0.5)
    got = await join(http, loc, "-1")
    assert customs(got) == list(range(20))


async def test_on_disconnect_cancel_cancels_the_run_upstream(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                             http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await http.post(f"{gateway.url}/threads/{tid}/runs/stream",
                           json={"assistant_id": "a", "input": {"n": 200, "delay": 0.02}, "on_disconnect": "cancel"})
    first = await read_events(resp, limit=2)
    run_id = first[0].json["run_id"]
    resp.close()
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted"


async def test_a_cancel_on_disconnect_the_upstream_fails_for_a_moment_is_asked_again(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The cancel is the gateway's own request, made once the client is gone: nobody else will ask.
    # One answered 503 (or met a full pool, or a reset) was logged and dropped, and the run the
    # client wanted stopped went on upstream to its end.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "100ms"}))
    tid = await new_thread(http, gw)
    fake_upstream.faults.cancel_failures = 2
    resp = await http.post(f"{gw.url}/threads/{tid}/runs/stream",
                           json={"assistant_id": "a", "input": {"n": 300, "delay": 0.02}, "on_disconnect": "cancel"})
    run_id = (await read_events(resp, limit=2))[0].json["run_id"]
    resp.close()
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted"
    assert fake_upstream.faults.cancel_failures == 0


async def test_default_disconnect_keeps_the_run_going(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                      http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=10, delay=0.02)
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    resp.close()
    await asyncio.sleep(0.5)
    assert fake_upstream.runs[run_id].status == "success"


async def test_upstream_5xx_on_run_stream_passes_through(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                         http: aiohttp.ClientSession) -> None:
    fake_upstream.faults.status = 500
    async with http.post(f"{gateway.url}/threads/t/runs/stream", json={"assistant_id": "a"}) as r:
        assert r.status == 500
        assert await r.json() == {"detail": "injected failure"}


async def test_upstream_409_json_on_run_stream_is_not_captured(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{gateway.url}/threads/t/runs/stream",
                         json={"assistant_id": "a", "multitask_strategy": "reject"}) as r:
        assert r.status == 409 and r.content_type == "application/json"
    assert not await gateway.gw.log.streams()


async def test_upstream_hang_on_run_stream_is_504(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                                                  tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "read_timeout": "200ms"}}))
    fake_upstream.faults.hang = 1.0
    async with http.post(f"{gw.url}/threads/t/runs/stream", json={"assistant_id": "a"}) as r:
        assert r.status == 504
        assert "did not answer" in (await r.json())["detail"]


async def test_upstream_closing_mid_body_cuts_the_client_too(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                             http: aiohttp.ClientSession,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    fake_upstream.faults.close_mid_body = True
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(f"{gateway.url}/echo/x") as r:
            assert r.status == 200
            await r.read()  # a truncated body must not look complete
    for _ in range(50):  # and the access log says it failed (bounded wait for the line)
        ends = [getattr(r, "end", None) for r in caplog.records if r.name == "gateway.access"]
        if ends:
            break
        await asyncio.sleep(0.1)
    assert ends == ["error"], ends


async def test_slow_upstream_body_streams_through(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                  http: aiohttp.ClientSession) -> None:
    fake_upstream.faults.slow_body = 0.01
    async with http.get(f"{gateway.url}/echo/slowly") as r:
        assert (await r.json())["path"] == "/echo/slowly"


async def test_oversized_run_body_is_413_json(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                                              tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"max_request_body": 1024}))
    async with http.post(f"{gw.url}/threads/t/runs/stream", data=b"{" + b" " * 5000 + b"}") as r:
        assert r.status == 413
        assert "limit" in (await r.json())["detail"]
    assert not any(p.endswith("/runs/stream") for _, p in fake_upstream.requests), "nothing reached the upstream"


async def test_disk_budget_spent_refuses_new_captures_with_503(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           storage={"max_bytes": 2000}))
    tid = await new_thread(http, gw)
    live = await stream_run(http, gw, tid, n=400, delay=0.01, pad=50)
    await read_events(live, limit=60)  # over budget now, and the only stream is live
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
        assert r.status == 503
        assert "budget" in (await r.json())["detail"]
    rest = await read_events(live)  # the live capture keeps going, nothing lost
    assert customs(await join(http, gw.url + live.headers["Location"], "-1")) == list(range(400))
    assert rest


async def test_join_with_cancel_on_disconnect_cancels_when_last_client_leaves(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=300, delay=0.02)
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    joiner = await http.get(gateway.url + resp.headers["Location"], params={"cancel_on_disconnect": "true"})
    await read_events(joiner, limit=1)
    resp.close()
    await asyncio.sleep(0.2)
    assert fake_upstream.runs[run_id].status == "running", "one client is still there"
    joiner.close()
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted"


async def test_a_stateless_run_going_on_upstream_is_captured_to_its_end_whatever_a_join_asked(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    # A stateless run has no cancel endpoint upstream; created without on_disconnect=cancel, closing
    # the gateway's leg does not stop it either. A join asking cancel_on_disconnect cannot cancel it,
    # so the capture must not stop (and end the stream cleanly) while the run goes on.
    resp = await http.post(f"{gateway.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 30, "delay": 0.02}})
    loc = gateway.url + resp.headers["Location"]
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    joiner = await http.get(loc, params={"cancel_on_disconnect": "true"}, headers={"Last-Event-ID": "-1"})
    await read_events(joiner, limit=2)
    resp.close()
    joiner.close()
    assert await fake_upstream.wait_status(run_id, "success") == "success"
    assert customs(await join(http, loc, "-1")) == list(range(30))


def _lingering(tmp_path: Path, fake_upstream: FakeAgentServer) -> dict[str, Any]:
    """A gateway config whose thread streams let their upstream leg go 200 ms after the last client."""
    return gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}, streams={"thread_linger": "200ms"})


async def _released(fake_upstream: FakeAgentServer, tid: str) -> bool:
    """Whether the thread's upstream stream has no listener left within 2 s (the gateway let it go)."""
    for _ in range(40):
        if not fake_upstream.thread_listeners[tid]:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_thread_stream_upstream_leg_released_after_linger(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(_lingering(tmp_path, fake_upstream))
    tid = await new_thread(http, gw)
    url = f"{gw.url}/threads/{tid}/stream"
    a = await http.get(url)
    b = await http.get(url)
    await asyncio.sleep(0.1)
    assert len(fake_upstream.thread_listeners[tid]) == 1, "two clients share one upstream leg"
    a.close()
    b.close()
    assert await _released(fake_upstream, tid)
    async with http.get(url) as c:  # a later client captures again
        await asyncio.sleep(0.1)
        assert len(fake_upstream.thread_listeners[tid]) == 1
        run = await stream_run(http, gw, tid, n=2)
        await read_events(run)
        got = await read_events(c, limit=4)
    assert [e.event for e in got] == ["metadata", "custom", "custom", "metadata"]


async def test_a_thread_stream_released_with_nothing_held_recovers_what_came_meanwhile(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(_lingering(tmp_path, fake_upstream))
    tid = await new_thread(http, gw)
    url = f"{gw.url}/threads/{tid}/stream"
    async with http.get(url, headers={"Last-Event-ID": "-"}):  # captured from the thread's start: nothing yet
        await asyncio.sleep(0.1)
    assert await _released(fake_upstream, tid), "released"
    run = await stream_run(http, gw, tid, n=2)  # while nobody follows the thread
    await read_events(run)
    # The log holds nothing of the thread, and no upstream id to re-join after: the next leg asks
    # for the thread from its start, which is exactly what the log lacks.
    async with http.get(url, headers={"Last-Event-ID": "-"}) as again:
        assert "X-Gateway-Resume" not in again.headers
        async with asyncio.timeout(5):
            got = await read_events(again, limit=4)
    assert [e.event for e in got] == ["metadata", "custom", "custom", "metadata"]


async def test_run_body_arriving_in_pieces_is_forwarded_whole(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                              http: aiohttp.ClientSession) -> None:
    import orjson

    doc = {"assistant_id": "a", "input": {"n": 2, "pad_ignored": "y" * 300_000}}
    raw = orjson.dumps(doc)

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 50_000):
            yield raw[i:i + 50_000]
            await asyncio.sleep(0.01)

    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs/stream", data=trickle(),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        got = await read_events(r)
    assert customs(got) == [0, 1]


async def test_chunked_run_body_over_the_limit_is_413(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                                                      tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"max_request_body": 1024}))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    async with http.post(f"{gw.url}/threads/t/runs", data=chunks()) as r:
        assert r.status == 413


async def test_on_disconnect_cancel_is_the_gateways_job_not_the_upstreams(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    # The upstream must not cancel the run when the gateway's own leg drops (blip, restart):
    # the gateway forwards "continue" and cancels itself when its last client leaves.
    fake_upstream.faults.cut_after = 3
    tid = await new_thread(http, gateway)
    resp = await http.post(f"{gateway.url}/threads/{tid}/runs/stream",
                           json={"assistant_id": "a", "input": {"n": 20, "delay": 0.01}, "on_disconnect": "cancel"})
    got = await read_events(resp)
    assert customs(got) == list(range(20)), "the leg was re-joined, the run not cancelled"


async def test_concurrent_first_joins_share_one_capture(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                        http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    clients = await asyncio.gather(*(http.get(url) for _ in range(5)))
    await asyncio.sleep(0.1)
    assert len(fake_upstream.thread_listeners[tid]) == 1
    run = await stream_run(http, gateway, tid, n=3)
    await read_events(run)
    for c in clients:
        got = await read_events(c, limit=5)
        assert [e.event for e in got] == ["metadata", "custom", "custom", "custom", "metadata"]
        c.close()


async def test_join_of_an_unknown_run_is_not_captured(gateway: RunningGateway, fake_upstream: FakeAgentServer,
                                                      http: aiohttp.ClientSession) -> None:
    import uuid

    rid = str(uuid.uuid4())
    got = await join(http, f"{gateway.url}/threads/t/runs/{rid}/stream", "-1")
    assert got[0].event == "error" and "404" in got[0].data  # the upstream's own answer
    assert await gateway.gw.log.lookup(f"default/run/{rid}") is None


async def test_every_committed_event_is_counted_the_gateways_own_included(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """``gateway_log_events_appended_total`` counts what the log holds, not only what captures
    appended: a stateless run cut upstream cannot be re-joined and ends with the gateway's own
    ``CaptureInterrupted`` error event, which is counted too."""
    fake_upstream.faults.cut_after = 4
    async with http.post(f"{gateway.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 20, "delay": 0.02}}) as r:
        got = await read_events(r)
    assert len(got) > 4 and got[-1].event == "error" and "CaptureInterrupted" in got[-1].data
    assert gateway.gw.metrics.events_appended._value.get() == len(got)


async def test_upstream_legs_lost_mid_stream_move_the_rejoin_and_interruption_series_scraped(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """What /metrics says as upstream legs break: a leg re-joined counts ``outcome="ok"``; a re-join the
    upstream refuses counts ``outcome="failed"`` and, as the run then ends with CaptureInterrupted, one
    interrupted stream; a stateless run (no re-join path) counts an interruption and no re-join."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "50ms", "reattach_attempts": 1}))

    async def scraped() -> tuple[float, float, float]:
        async with http.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        s = {(x.name, x.labels.get("outcome", "")): x.value
             for f in text_string_to_metric_families(text) for x in f.samples}
        return (s[("gateway_upstream_rejoins_total", "ok")], s[("gateway_upstream_rejoins_total", "failed")],
                s[("gateway_streams_interrupted_total", "")])

    assert await scraped() == (0, 0, 0)
    tid = await new_thread(http, gw)
    fake_upstream.faults.cut_after = 4  # resumable: re-joined exactly (the re-sent last event dropped)
    assert customs(await read_events(await stream_run(http, gw, tid, assistant="a", n=12, delay=0.01))) == list(range(12))
    assert await scraped() == (1, 0, 0)
    async with http.get(gw.admin_url + "/metrics") as r:
        assert {s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                if s.name == "gateway_gap_markers_total"} == {0.0}, "an exact re-join counts no gap marker"
    fake_upstream.faults.cut_after = 3
    resp = await stream_run(http, gw, tid, assistant="a", n=100, delay=0.02)
    got = await read_events(resp, limit=2)
    fake_upstream.faults.status = 404  # the re-join is refused: the run ends interrupted
    got += await read_events(resp)
    fake_upstream.faults.status = 0
    assert got[-1].event == "error" and got[-1].json["error"] == "CaptureInterrupted"
    assert await scraped() == (1, 1, 1)
    fake_upstream.faults.cut_after = 2
    async with http.post(f"{gw.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01}}) as r:
        assert (await read_events(r))[-1].event == "error"
    assert await scraped() == (1, 1, 2)
