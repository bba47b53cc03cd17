"""Resume with Last-Event-ID over real sockets against the fake upstream (which has no resume support).

The invariant everywhere: the union of everything a client received over all
its connections is every upstream event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from yarl import URL

from gateway.follower import REPLAY_PAGE
from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run
from tests.support.sse import Ev, dechunk, parse_all, read_events, read_until_cut

MakeGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 20, 39, 41])
async def test_disconnect_after_k_events_then_resume_gets_the_rest(
        gateway: RunningGateway, http: aiohttp.ClientSession, k: int) -> None:
    n = 40
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=n, delay=0.005)
    location = resp.headers["Location"]
    first = await read_events(resp, limit=k) if k else []
    resp.close()  # the client's connection drops mid-stream
    last = first[-1].id if first else "-1"
    rest = await join(http, gateway.url + location, last)
    union = first + rest
    assert [e.event for e in union] == ["metadata"] + ["custom"] * n
    assert customs(union) == list(range(n))
    assert_ids_increase(union)


async def test_repeated_drops_every_few_events(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    n = 60
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=n, delay=0.003)
    location = gateway.url + resp.headers["Location"]
    got = await read_events(resp, limit=3)
    resp.close()
    while len(got) < n + 1:
        async with http.get(location, headers={"Last-Event-ID": got[-1].id or ""}) as r:
            got += await read_events(r, limit=4)
    assert customs(got) == list(range(n))
    assert_ids_increase(got)


async def test_query_parameter_form(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=10, delay=0.01)
    location = gateway.url + resp.headers["Location"]
    first = await read_events(resp, limit=4)
    resp.close()
    rest = await join(http, location, last_event_id=first[-1].id or "")
    assert customs(first + rest) == list(range(10))
    assert customs(await join(http, location, "0")) == list(range(10))  # 0, like -1, is the beginning
    # The header wins over the query parameter, both ways round (an id the two cannot tell apart,
    # such as one from before the run, would let a test pass whichever won).
    assert customs(await join(http, location, first[3].id, last_event_id="-1")) == list(range(3, 10))
    assert customs(await join(http, location, "-1", last_event_id=first[3].id or "")) == list(range(10))


async def test_the_thread_stream_resumes_by_query_from_any_start_spelling_and_refuses_unsent_ids(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """README's resume semantics hold on both join endpoints: the thread stream too takes
    ``last_event_id``, starts over on ``-1``, ``-`` or ``0``, prefers the header, and answers an id
    the gateway has not sent yet with 422."""
    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    async with http.get(url) as ts:
        await asyncio.sleep(0.1)
        await read_events(await stream_run(http, gateway, tid, n=5))
        first = await read_events(ts, limit=3)
    async with http.get(url, params={"last_event_id": first[0].id or ""}) as r:
        assert await read_events(r, limit=2) == first[1:]
    for start in ("-1", "-", "0"):
        async with http.get(url, headers={"Last-Event-ID": start}) as r:
            assert await read_events(r, limit=3) == first, start
    async with http.get(url, headers={"Last-Event-ID": first[1].id or ""}, params={"last_event_id": "-1"}) as r:
        assert await read_events(r, limit=1) == first[2:3], "the header wins"
    async with http.get(url, headers={"Last-Event-ID": "999999999999999999"}) as r:
        assert r.status == 422 and "not sent that id" in (await r.json())["detail"]


async def test_no_header_is_live_tail_only_like_upstream(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=30, delay=0.02)
    location = gateway.url + resp.headers["Location"]
    first = await read_events(resp, limit=10)
    tail = await join(http, location)
    assert tail and tail[0].event == "custom" and tail[0].json["i"] >= 9
    assert customs(tail) == list(range(customs(tail)[0], 30))
    resp.close()
    # A finished run without a header: nothing, and the response ends.
    assert await join(http, location) == []
    assert first[0].event == "metadata"


async def test_finished_run_replays_in_full_including_final_error(gateway: RunningGateway,
                                                                  http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=3, assistant="fail")
    original = await read_events(resp)
    assert original[-1].event == "error"
    replay = await join(http, gateway.url + resp.headers["Location"], "-1")
    assert replay == original
    assert await join(http, gateway.url + resp.headers["Location"], original[-1].id) == []
    # Resuming from the middle ends exactly as the original ended.
    tail = await join(http, gateway.url + resp.headers["Location"], original[1].id)
    assert tail == original[2:]


async def test_a_reconnect_storm_reads_each_page_from_the_log_once(gateway: RunningGateway,
                                                                    http: aiohttp.ClientSession) -> None:
    n = 2 * REPLAY_PAGE + 500  # three pages
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=n)
    original = await read_events(resp)
    loc = gateway.url + resp.headers["Location"]
    pages = gateway.gw.metrics.replayed_pages
    # Counted from here: the run's own client may have read a page from the log already, when it
    # fell behind the capture and caught up from the log (the feed overflowed).
    log_before, shared_before = pages.labels("log")._value.get(), pages.labels("shared")._value.get()
    clients = 30
    replays = await asyncio.gather(*(join(http, loc, "-1") for _ in range(clients)))
    assert all(r == original for r in replays), "every client of the storm gets the whole run, exactly"
    # A page is kept once a second client asks for it: each is read from the log once or twice.
    # (How many pages a replay takes is the backend's business: a page ends at a stored batch.)
    from_log = pages.labels("log")._value.get() - log_before
    shared = pages.labels("shared")._value.get() - shared_before
    # A replay is three pages or more; rarely one client takes one more (CI saw 91 pages for 30
    # clients on Redis once), which must not fail a test of sharing: the second storm below is exact.
    per_client = int((from_log + shared) // clients)
    assert per_client >= 3
    assert from_log <= 2 * per_client + 1 and shared >= (clients - 2) * per_client
    replays = await asyncio.gather(*(join(http, loc, "-1") for _ in range(clients)))
    assert all(r == original for r in replays)
    assert pages.labels("log")._value.get() == log_before + from_log, "the next storm reads nothing from the log"
    # Shared pages are per range: a client resuming elsewhere, or filtering, gets its own exact events.
    assert await join(http, loc, original[100].id) == original[101:]
    only_custom = await join(http, loc, "-1", stream_mode="custom")
    assert customs(only_custom) == list(range(n)) and {e.event for e in only_custom} == {"custom"}


@pytest.mark.parametrize("cache", ["0", None])
async def test_replay_cache_bytes_zero_turns_keeping_pages_off(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        cache: str | None) -> None:
    """README: pages stay shared for a while after a replay (streams.replay_cache_bytes); 0 turns it off."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"replay_cache_bytes": cache} if cache is not None else {}))
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=50)
    original = await read_events(resp)
    loc = gw.url + resp.headers["Location"]
    pages = gw.gw.metrics.replayed_pages
    log_before, shared_before = pages.labels("log")._value.get(), pages.labels("shared")._value.get()
    for _ in range(4):  # one after another: nothing is shared at once
        assert await join(http, loc, "-1") == original
    from_log = pages.labels("log")._value.get() - log_before
    shared = pages.labels("shared")._value.get() - shared_before
    if cache == "0":
        assert (from_log, shared) == (4, 0), "every replay reads the log"
    else:
        assert shared >= 2 and from_log <= 2, "a page asked for twice is kept for the replays after"


async def test_stream_mode_filter_on_replay_and_live(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=5)
    await read_events(resp)
    loc = gateway.url + resp.headers["Location"]
    only_custom = await join(http, loc, "-1", stream_mode="custom")
    assert [e.event for e in only_custom] == ["custom"] * 5
    assert [e.event for e in await join(http, loc, "-1", stream_mode='["metadata"]')] == ["metadata"]
    assert len(await join(http, loc, "-1", stream_mode="")) == 6  # empty means no filter, as upstream
    assert await join(http, loc, "-1", stream_mode="values") == []
    # Repeated parameter: the last one counts (as upstream does).
    assert [e.event for e in await join(http, loc + "?stream_mode=custom&stream_mode=metadata", "-1")] == ["metadata"]


@pytest.mark.parametrize("subscribers", [2, 10])
async def test_concurrent_subscribers_each_get_everything(gateway: RunningGateway, http: aiohttp.ClientSession,
                                                          subscribers: int) -> None:
    n = 50
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=n, delay=0.01)
    loc = gateway.url + resp.headers["Location"]

    async def one(i: int) -> list[Ev]:
        await asyncio.sleep(0.01 * i)
        got = await join(http, loc, "-1")
        return got

    results = await asyncio.gather(read_events(resp), *(one(i) for i in range(subscribers)))
    for got in results:
        assert customs(got) == list(range(n))
        assert_ids_increase(got)
    assert len({tuple(e.id for e in got) for got in results}) == 1, "everyone sees the same ids"


async def test_slow_subscriber_catches_up_from_the_log_without_blocking_others(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"subscriber_buffer": 20}))
    # 1,500 events of 32 KB, 48 MB: more than loopback's socket buffers can hold (32 + 4 MB at most),
    # so the slow client's connection fills and its events back up in the gateway (live events are
    # written from the commit straight into the socket for as long as it takes them).
    n = 1500
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, pad=32000)
    loc = gw.url + resp.headers["Location"]
    async with http.get(loc, headers={"Last-Event-ID": "-1"}) as slow:
        head = await read_events(slow, limit=3)
        fast = await read_events(resp)  # the original client is not held back
        assert customs(fast) == list(range(n))
        await asyncio.sleep(0.5)
        rest = await read_events(slow)
    assert customs(head + rest) == list(range(n))
    assert_ids_increase(head + rest)
    assert gw.gw.metrics.subscribers_overflowed._value.get() >= 1


async def test_background_run_is_captured_from_its_first_event(gateway: RunningGateway, http: aiohttp.ClientSession,
                                                               fake_upstream: FakeAgentServer) -> None:
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs",
                         json={"assistant_id": "ticker", "input": {"n": 8, "delay": 0.01}}) as r:
        assert r.status == 200
        run = await r.json()
    assert run["kwargs"]["resumable"] is True, "the gateway asked the upstream for a replay buffer"
    await asyncio.sleep(0.3)  # the run finishes with nobody listening
    got = await join(http, f"{gateway.url}/threads/{tid}/runs/{run['run_id']}/stream", "-1")
    assert [e.event for e in got] == ["metadata"] + ["custom"] * 8


async def test_a_background_run_whose_client_hangs_up_before_the_answer_is_still_captured(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    # The run is created upstream whether or not the client waits for the answer; when it hung up
    # first, the gateway dropped the answer and never captured the run. An upstream that keeps no
    # replay buffer then had nothing for a later join, and said nothing of what was lost.
    fake_upstream.behaviour.ignore_resumable = True
    tid = await new_thread(http, gateway)
    fake_upstream.faults.hang = 0.4  # the upstream answers late
    post = asyncio.ensure_future(http.post(f"{gateway.url}/threads/{tid}/runs",
                                           json={"assistant_id": "ticker", "input": {"n": 8, "delay": 0.05}}))
    await asyncio.sleep(0.15)
    post.cancel()  # the client hangs up before the answer
    with contextlib.suppress(asyncio.CancelledError):
        await post
    fake_upstream.faults.hang = 0
    for _ in range(60):
        if fake_upstream.runs:
            break
        await asyncio.sleep(0.05)
    (rid,) = fake_upstream.runs
    await asyncio.sleep(0.6)  # the run finishes with nobody listening
    got = await join(http, f"{gateway.url}/threads/{tid}/runs/{rid}/stream", "-1")
    # Every custom event, from the gateway's log. The upstream keeps no buffer, so what it sent
    # before the capture joined (the metadata event) is missed: said by a gap marker.
    assert customs(got) == list(range(8))
    assert [e.event for e in got if e.event != "custom"] in (["metadata"], ["gap"])


async def test_stateless_runs_become_resumable(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{gateway.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 6}}) as r:
        loc = r.headers["Location"]
        original = await read_events(r)
    assert loc.startswith("/runs/") and loc.endswith("/stream")
    assert await join(http, gateway.url + loc, "-1") == original
    assert await join(http, gateway.url + loc, original[2].id) == original[3:]


async def _joined_behind_the_gateways_back(http: aiohttp.ClientSession, gw: RunningGateway,
                                           fake_upstream: FakeAgentServer, n: int,
                                           limit: int | None = None) -> tuple[str, list[Ev]]:
    """A run of ``n`` events created directly upstream, joined through the gateway (no Last-Event-ID)
    after its third event: its join path, and what the join got (its first ``limit`` events)."""
    async with aiohttp.ClientSession() as direct:
        resp = await direct.post(f"{fake_upstream.url}/threads/t/runs/stream",
                                 json={"assistant_id": "a", "input": {"n": n, "delay": 0.02}})
        loc = resp.headers["Location"]
        await read_events(resp, limit=3)
        async with http.get(gw.url + loc) as r:
            joined = await read_events(r, limit=limit)
        resp.close()
    return loc, joined


async def test_unknown_run_is_forwarded_and_captured_from_then_on(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    # A run created directly upstream, behind the gateway's back.
    loc, joined = await _joined_behind_the_gateways_back(http, gateway, fake_upstream, 20, limit=5)
    assert [e.event for e in joined] == ["custom"] * 5
    assert_ids_increase(joined)
    rest = await join(http, gateway.url + loc, joined[-1].id)
    assert customs(joined + rest) == list(range(customs(joined)[0], 20))


async def test_a_run_first_joined_mid_stream_tells_a_client_from_the_start_that_its_start_is_missing(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    # A run the gateway never saw, first joined with no Last-Event-ID: captured from then on. A later
    # client asking for the whole run gets what is held, and is told it lacks the run's start.
    loc, live = await _joined_behind_the_gateways_back(http, gateway, fake_upstream, 8)
    assert live[0].event == "custom"
    for last in ("-1", "0"):
        async with http.get(gateway.url + loc, headers={"Last-Event-ID": last}) as r:
            assert r.headers.get("X-Gateway-Resume") == "truncated"
            assert await read_events(r) == live
    async with http.get(gateway.url + loc, headers={"Last-Event-ID": live[1].id or ""}) as r:
        assert "X-Gateway-Resume" not in r.headers  # an id it was sent: exactly what followed it
        assert await read_events(r) == live[2:]
    # First joined from the start, but the upstream cannot replay it (it was not created resumable):
    # what is held begins mid-run all the same.
    async with aiohttp.ClientSession() as direct:
        resp = await direct.post(f"{fake_upstream.url}/threads/t/runs/stream",
                                 json={"assistant_id": "a", "input": {"n": 8, "delay": 0.02}})
        loc = resp.headers["Location"]
        await read_events(resp, limit=3)
        async with http.get(gateway.url + loc, headers={"Last-Event-ID": "-1"}) as r:
            assert r.headers.get("X-Gateway-Resume") == "not-held"
            live = await read_events(r)
        resp.close()
    assert live[0].event == "custom"
    async with http.get(gateway.url + loc, headers={"Last-Event-ID": "-1"}) as r:
        assert r.headers.get("X-Gateway-Resume") == "truncated"
        assert await read_events(r) == live
    # A run captured from its creation is whole: a resume from the start is a plain hit, also on a
    # server whose runs do not begin with LangGraph's `metadata`.
    for metadata in (True, False):
        fake_upstream.behaviour.no_run_metadata = not metadata
        whole = await stream_run(http, gateway, await new_thread(http, gateway), n=2)
        sent = await read_events(whole)
        async with http.get(gateway.url + whole.headers["Location"], headers={"Last-Event-ID": "-1"}) as r:
            assert "X-Gateway-Resume" not in r.headers
            assert await read_events(r) == sent
        assert (sent[0].event == "metadata") == metadata


async def test_an_id_of_another_stream_beyond_this_ones_head_gets_what_follows_it_without_a_cut(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    # Ids come from one counter: an id another stream was sent after this one's last event is
    # answered as the upstream answers an id: the events after it, then the live tail, ended cleanly.
    a = await stream_run(http, gateway, await new_thread(http, gateway), assistant="a", n=5, delay=0.25)
    first = await read_events(a, limit=2)
    b = await stream_run(http, gateway, await new_thread(http, gateway), assistant="a", n=2)
    other = (await read_events(b))[-1].id or ""
    assert int(other) > int(first[-1].id or 0)
    async with http.get(gateway.url + a.headers["Location"], headers={"Last-Event-ID": other}) as r:
        assert r.status == 200 and "X-Gateway-Resume" not in r.headers
        got, was_cut = await read_until_cut(r)
    rest = await read_events(a)
    assert not was_cut
    assert got == [e for e in first + rest if int(e.id or 0) > int(other)]
    assert customs(got)[-1] == 4


async def test_resume_of_a_run_no_longer_held_falls_through_with_a_header(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    async with aiohttp.ClientSession() as direct:
        resp = await direct.post(f"{fake_upstream.url}/threads/t/runs/stream",
                                 json={"assistant_id": "a", "input": {"n": 3, "delay": 0.05}})
        loc = resp.headers["Location"]
        async with http.get(gateway.url + loc, headers={"Last-Event-ID": "12345"}) as r:
            assert r.status == 200
            assert r.headers["X-Gateway-Resume"] == "not-held"
        resp.close()


async def test_a_run_retention_removed_is_captured_again_and_old_ids_get_the_whole_stream_not_held(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: a join of a run removed by retention is forwarded and captured from then on, with
    X-Gateway-Resume: not-held when the client sent an id; and an id from that earlier capture gets
    the whole stream as held now, never a position in the new one."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = {**raw["storage"], "retention": "1s", "sweep_interval": "200ms"}
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=5)
    original = await read_events(resp)
    loc = gw.url + resp.headers["Location"]
    for _ in range(50):
        if not await gw.gw.log.streams():
            break
        await asyncio.sleep(0.1)
    assert not await gw.gw.log.streams(), "retention removed the finished run"
    for _ in range(2):  # captured anew by the first join, served from the log to the second
        async with http.get(loc, headers={"Last-Event-ID": original[2].id or ""}) as r:
            assert r.status == 200 and r.headers.get("X-Gateway-Resume") == "not-held"
            again = await read_events(r)
        assert customs(again) == list(range(5))
        assert min(int(e.id or 0) for e in again) > max(int(e.id or 0) for e in original), "new ids, above the old"


@pytest.mark.parametrize("bad", ["abc", "1.5", "-2", "12-", "x" * 200, "1;2", "\u0663"])
async def test_malformed_event_id_is_422(gateway: RunningGateway, http: aiohttp.ClientSession, bad: str) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=1)
    await read_events(resp)
    for url in (gateway.url + resp.headers["Location"], f"{gateway.url}/threads/{tid}/stream"):
        async with http.get(url, headers={"Last-Event-ID": bad}) as r:
            assert r.status == 422
            assert "Last-Event-ID" in (await r.json())["detail"]


async def test_every_spelling_of_an_id_is_answered_as_the_id_itself(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    """A Last-Event-ID is a number: ``00`` is the start as ``0`` is, and ``007`` is ``7``. Both got the
    same events, but a zero with more digits was taken for an id of an earlier capture, and the client
    was told ``X-Gateway-Resume: not-held`` (the ids it holds no longer apply) where the start of a run
    held from mid-stream is ``truncated``, and where a whole run is a plain hit."""
    loc, live = await _joined_behind_the_gateways_back(http, gateway, fake_upstream, 6)  # held from mid-run
    tid = await new_thread(http, gateway)
    whole = await stream_run(http, gateway, tid, n=4)
    sent = await read_events(whole)
    for url, events, start in ((gateway.url + loc, live, "truncated"),
                               (gateway.url + whole.headers["Location"], sent, None)):
        mid = events[1].id or ""
        for spelling, canonical in (("00", "0"), ("000", "0"), ("0" * 19, "0"), ("0" + mid, mid),
                                    ("00" + mid, mid)):
            async with http.get(url, headers={"Last-Event-ID": canonical}) as r:
                want = (r.status, r.headers.get("X-Gateway-Resume"), await read_events(r))
            async with http.get(url, headers={"Last-Event-ID": spelling}) as r:
                got = (r.status, r.headers.get("X-Gateway-Resume"), await read_events(r))
            assert got == want, f"{spelling!r} answered other than {canonical!r}"
        async with http.get(url, headers={"Last-Event-ID": "00"}) as r:
            assert r.headers.get("X-Gateway-Resume") == start
            assert await read_events(r) == events


async def test_an_id_never_issued_is_422_not_an_endless_wait(gateway: RunningGateway,
                                                               http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=30, delay=0.02)
    await read_events(resp, limit=2)
    async with http.get(gateway.url + resp.headers["Location"], headers={"Last-Event-ID": "999999999999999999"}) as r:
        assert r.status == 422
        assert "not sent that id" in (await r.json())["detail"]
    resp.close()


async def test_thread_stream_captured_and_resumable(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    async with http.get(url) as ts:
        await asyncio.sleep(0.1)
        run = await stream_run(http, gateway, tid, n=5)
        await read_events(run)
        first = await read_events(ts, limit=3)
    # Reconnect with the last id: the rest of the run, then run_done, then it stays open.
    async with http.get(url, headers={"Last-Event-ID": first[-1].id or ""}) as ts2:
        rest = await read_events(ts2, limit=4)
    union = first + rest
    assert [e.event for e in union][:7] == ["metadata"] + ["custom"] * 5 + ["metadata"]
    assert union[6].json["status"] == "run_done"
    assert_ids_increase(union)
    async with http.get(url, headers={"Last-Event-ID": "-"}, params={"stream_modes": "lifecycle"}) as ts3:
        life = await read_events(ts3, limit=2)
    assert [e.event for e in life] == ["metadata", "metadata"]
    async with http.get(url, params={"stream_modes": "values"}) as bad:
        assert bad.status == 422


async def test_a_thread_stream_first_captured_at_its_live_tail_says_so_to_a_client_from_the_start(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    # The upstream replays a thread's earlier runs to a client from the start ("-"); a capture begun
    # for a client with no id holds only what came after. A later client from the start is told.
    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    await read_events(await stream_run(http, gateway, tid, n=1))  # an earlier run, before any thread stream
    async with http.get(url) as ts:
        await asyncio.sleep(0.1)
        run = await stream_run(http, gateway, tid, n=2)
        await read_events(run)
        live = await read_events(ts, limit=4)
        for last in ("-", "0"):
            async with http.get(url, headers={"Last-Event-ID": last}) as again:
                assert again.headers.get("X-Gateway-Resume") == "truncated"
                assert await read_events(again, limit=4) == live
        async with http.get(url, headers={"Last-Event-ID": live[0].id or ""}) as after:
            assert "X-Gateway-Resume" not in after.headers  # an id it was sent: exactly what followed
            assert await read_events(after, limit=3) == live[1:]
    # Captured for a client from the start, the log holds what the upstream replayed: a plain hit.
    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    await read_events(await stream_run(http, gateway, tid, n=1))
    async with http.get(url, headers={"Last-Event-ID": "-"}) as ts:
        earlier = await read_events(ts, limit=3)
        assert [e.event for e in earlier] == ["metadata", "custom", "metadata"]
        async with http.get(url, headers={"Last-Event-ID": "-"}) as again:
            assert "X-Gateway-Resume" not in again.headers
            assert await read_events(again, limit=3) == earlier


async def test_a_held_run_is_not_served_under_another_thread(gateway: RunningGateway, http: aiohttp.ClientSession,
                                                             fake_upstream: FakeAgentServer) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=2)
    events = await read_events(resp)
    run_id = events[0].json["run_id"]
    await join(http, f"{gateway.url}/threads/other-thread/runs/{run_id}/stream", "-1")
    # The upstream (which knows which thread the run is on) answered, not the log.
    assert ("GET", f"/threads/other-thread/runs/{run_id}/stream") in fake_upstream.requests


async def test_heartbeats_are_forwarded_but_never_logged(gateway: RunningGateway, http: aiohttp.ClientSession,
                                                         fake_upstream: FakeAgentServer) -> None:
    fake_upstream.heartbeat = 0.05
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": 2, "delay": 0.3}}) as r:
        raw = await r.read()
        loc = r.headers["Location"]
    assert b": heartbeat\n\n" in raw
    meta = (await gateway.gw.log.streams())[0]
    assert meta.count == 3  # metadata + 2 custom: no heartbeat in the log
    replay = await join(http, gateway.url + loc, "-1")
    assert len(replay) == 3


async def test_gateway_sends_its_own_heartbeat_when_idle(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                                                         tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"heartbeat": "100ms"}))
    fake_upstream.heartbeat = 30  # the upstream stays silent
    tid = await new_thread(http, gw)
    async with http.get(f"{gw.url}/threads/{tid}/stream") as r:
        chunk = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2.0)
    assert chunk == b": heartbeat\n\n"


async def test_a_quiet_stream_gets_a_heartbeat_within_the_configured_time(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # "heartbeat" is what an operator sets below a load balancer's idle timeout: a client must
    # never wait longer than that for a byte, wherever the last event fell between two ticks.
    heartbeat = 2.0
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"heartbeat": f"{heartbeat}s"}))
    fake_upstream.heartbeat = 60  # the upstream stays silent

    async def silence_after_first_event() -> float:
        tid = await new_thread(http, gw)
        async with http.post(f"{gw.url}/threads/{tid}/runs/stream",  # metadata, then nothing for good
                             json={"assistant_id": "a", "input": {"n": 1, "delay": 1e9}}) as r:
            assert (await r.content.readuntil(b"\n\n")).startswith(b"event: metadata")
            since = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 3 * heartbeat) == b": heartbeat\n\n"
            return asyncio.get_running_loop().time() - since

    async def staggered(i: int) -> float:
        await asyncio.sleep(i * heartbeat / 4)  # last events at four points of the ticker's period
        return await silence_after_first_event()

    silences = await asyncio.gather(*(staggered(i) for i in range(4)))
    assert max(silences) <= heartbeat + 0.6, f"silences {silences} with heartbeat {heartbeat}s"


async def test_a_client_whose_filter_drops_every_event_still_gets_heartbeats(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    heartbeat = 0.5
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"heartbeat": f"{heartbeat}s"}))
    fake_upstream.heartbeat = 60  # the upstream sends no comments of its own
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=60, delay=0.05)  # a custom event every 50 ms for 3 s
    # The live tail, keeping only "values": every event of this run is dropped for this client.
    async with http.get(gw.url + resp.headers["Location"], params={"stream_mode": "values"}) as r:
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), heartbeat + 0.6)
    assert first == b": heartbeat\n\n"
    resp.close()


async def test_resume_into_a_trimmed_thread_stream_says_so(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    import time as _time

    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    async with http.get(url) as ts:
        await asyncio.sleep(0.1)
        await read_events(await stream_run(http, gateway, tid, n=2))
        first = await read_events(ts, limit=4)
        await gateway.gw.log.sweep(now=_time.time() + gateway.gw.cfg.storage.retention + 5)
        await read_events(await stream_run(http, gateway, tid, n=1))
        async with http.get(url, headers={"Last-Event-ID": first[0].id or ""}) as r:
            assert r.headers["X-Gateway-Resume"] == "truncated"
            got = await read_events(r, limit=3)
        assert [e.event for e in got] == ["metadata", "custom", "metadata"]
        assert int(got[0].id or 0) > int(first[-1].id or 0)


async def test_retention_trimming_a_thread_stream_under_a_replaying_client_cuts_it_instead_of_skipping(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """A client replaying a thread stream page by page while retention trims the part it has not
    read yet: the events it would have got next are gone. It is cut (its reconnect is answered
    with what is left and ``X-Gateway-Resume: truncated``), never handed the rest as if whole."""
    import time as _time

    tid = await new_thread(http, gateway)
    url = f"{gateway.url}/threads/{tid}/stream"
    async with http.get(url) as ts:  # the thread stream is captured (and trimmed, not removed)
        await asyncio.sleep(0.1)
        await read_events(await stream_run(http, gateway, tid, n=20, delay=0.01))
        between = _time.time()
        await asyncio.sleep(0.05)
        second = (await read_events(await stream_run(http, gateway, tid, n=20, delay=0.01)))[0].json["run_id"]
        await read_events(ts, limit=44)
        hub = gateway.gw.hub
        page = hub.page
        calls = 0

        async def small_pages(key: str, after: int, upto: int, limit: int) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:  # between two pages of the replay: the first run's batches are trimmed
                await gateway.gw.log.sweep(now=between + gateway.gw.cfg.storage.retention)
            return await page(key, after, upto, 5)

        hub.page = small_pages  # type: ignore[method-assign]
        got: list[Ev] = []
        cut = False
        async with http.get(url, headers={"Last-Event-ID": "-1"}) as r:
            # To the second run's end (the last event held), or a cut.
            while not got or got[-1].json.get("status") != "run_done" or got[-1].json["run_id"] != second:
                try:
                    more = await asyncio.wait_for(read_events(r, limit=1), 10)
                except aiohttp.ClientPayloadError:
                    cut = True
                    break
                got += more
        hub.page = page  # type: ignore[method-assign]
    assert [e.json["i"] for e in got[:5] if e.event == "custom"] == [0, 1, 2, 3], "the first page came whole"
    assert cut and len(got) == 5, \
        f"cut where retention took what the client had not read, not fed on: {customs(got)}"


async def test_large_events_are_captured_and_replayed_intact(gateway: RunningGateway,
                                                             http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=3, pad=3_000_000)  # ~3 MB per event
    original = await read_events(resp)
    assert [len(e.data) for e in original[1:]] == [len(original[1].data)] * 3
    assert len(original[1].data) > 3_000_000
    assert await join(http, gateway.url + resp.headers["Location"], "-1") == original


async def test_a_stalled_client_is_bounded_in_bytes_and_catches_up_from_the_log(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    limit = 1 << 20
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"subscriber_buffer_bytes": limit}))
    n = 150
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, delay=0.002, pad=100_000)  # 15 MB, far fewer events than the count cap
    loc = gw.url + resp.headers["Location"]
    async with http.get(loc, headers={"Last-Event-ID": "-1"}) as stalled:  # opened, never read until the end
        peak = 0
        reader = asyncio.ensure_future(read_events(resp))
        while not reader.done():
            peak = max(peak, sum(f.feed.queued_bytes for f in gw.gw.hub.followers if f.feed is not None))
            await asyncio.sleep(0.002)
        assert customs(reader.result()) == list(range(n))
        assert peak <= limit, f"a stalled client held {peak} bytes in its queue"
        assert gw.gw.metrics.subscribers_overflowed._value.get() >= 1
        got = await read_events(stalled)
    assert customs(got) == list(range(n)), "it catches up from the log"
    assert_ids_increase(got)


async def _raw_replay(gw: RunningGateway, path: str, read: Callable[[socket.socket], Awaitable[bytes]],
                      rcvbuf: int = 8192) -> tuple[bytes, bool]:
    """GET ``path`` from the start over a raw socket with a fixed receive buffer; the de-chunked
    body as ``read`` received it, and whether it ended with the chunked terminator (a clean end)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, gw.server.addresses["main"])
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: -1\r\nConnection: close\r\n\r\n".encode())
        raw = await read(sock)
    finally:
        sock.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return dechunk(chunked)


async def _read_to_eof(sock: socket.socket, every: float = 0.0, size: int = 65536) -> bytes:
    loop, raw = asyncio.get_running_loop(), b""
    while chunk := await loop.sock_recv(sock, size):
        raw += chunk
        if every:
            await asyncio.sleep(every)
    return raw


async def test_a_client_cut_for_stalling_is_cut_after_a_whole_event(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"write_timeout": "500ms"}))
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=2000, pad=5000)  # ~10 MB: more than the kernel's socket buffers hold
    original = await read_events(resp)

    async def stall_then_read(sock: socket.socket) -> bytes:
        await asyncio.sleep(1.5)  # stops reading for three write timeouts: the gateway cuts it
        return await _read_to_eof(sock)

    body, clean = await _raw_replay(gw, resp.headers["Location"], stall_then_read)
    assert not clean and 0 < len(body) < sum(len(e.data) for e in original), "cut, not ended"
    # What was sent before the cut ends with a whole event: a client that dispatches the event
    # pending at the end of a body would otherwise see half an event, or keep an id it never got.
    assert body.endswith(b"\n\n"), body[-80:]
    got = parse_all(body.decode())
    assert got == original[:len(got)]
    for _ in range(50):  # the access log says the gateway cut it (bounded wait for the line)
        ends = [getattr(r, "end", None) for r in caplog.records
                if r.name == "gateway.access" and getattr(r, "method", None) == "GET"]
        if ends:
            break
        await asyncio.sleep(0.1)
    assert ends == ["cut"], ends


@pytest.mark.parametrize("spell", [str.upper, lambda s: s.replace("-", "%2D"), lambda s: s.replace("-", "")])
async def test_other_spellings_of_a_held_run_share_its_capture(
        gateway: RunningGateway, http: aiohttp.ClientSession, spell: Callable[[str], str]) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=5)
    original = await read_events(resp)
    rid = original[0].json["run_id"]
    url = URL(f"{gateway.url}/threads/{spell(tid)}/runs/{spell(rid)}/stream", encoded=True)  # sent as spelled
    async with http.get(url, headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 200
        assert "X-Gateway-Resume" not in r.headers
        assert await read_events(r) == original
    async with http.get(URL(f"{gateway.url}/threads/{spell(tid)}/stream", encoded=True),
                        headers={"Last-Event-ID": "-"}):
        await asyncio.sleep(0.1)
    assert len(await gateway.gw.log.streams()) == 2, "one run capture and one thread capture, no copies"


async def test_a_background_run_answered_gzipped_without_content_location_is_captured(
        gateway: RunningGateway, http: aiohttp.ClientSession, fake_upstream: FakeAgentServer) -> None:
    # When the answer names no run in its Content-Location, the gateway reads the run's ids from its
    # JSON; it asked with the client's Accept-Encoding, and behind a proxy that compresses JSON the
    # body came gzipped: unparsable, the run was relayed but never captured.
    fake_upstream.behaviour.background_content_location = False
    fake_upstream.behaviour.gzip_json = True
    fake_upstream.behaviour.ignore_resumable = True  # the log is the only place its events are kept
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs", headers={"Accept-Encoding": "gzip"},
                         json={"assistant_id": "a", "input": {"n": 5, "delay": 0.05}}) as r:
        assert r.status == 200 and r.headers.get("Content-Encoding") == "gzip"
        rid = (await r.json())["run_id"]  # the client's body as the upstream sent it
    async with http.get(f"{gateway.admin_url}/streams/{rid}") as r:
        assert r.status == 200, "the run is captured"
    assert await fake_upstream.wait_status(rid, "success") == "success"
    got = await join(http, f"{gateway.url}/threads/{tid}/runs/{rid}/stream", "-1")
    assert customs(got) == list(range(5))
