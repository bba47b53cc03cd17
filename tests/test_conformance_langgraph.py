"""Conformance against a real `langgraph dev` server: the gateway must be invisible to SDK users.

The same scenario runs with the official Python SDK pointed straight at the server and pointed at
the gateway in front of it; the transcripts must match once run/thread ids, message ids and
timestamps are masked. The rest checks what only the gateway promises (its own integer event ids,
replays that keep the terminal `error`, stateless re-joins) and that the JS SDK sees the same
events as the Python one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import httpx
import pytest
from langgraph_sdk import get_client

from tests.conftest import gateway_config
from tests.support.sse import Ev, read_events

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "tests" / "js"

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
# Values that differ between two otherwise identical runs.
_VOLATILE_KEYS = {"created_at", "updated_at", "state_updated_at", "__request_start_time_ms__",
                  "langgraph_request_id"}

TICKER_MODES = ["custom", "values"]


def norm(value: Any) -> Any:
    """The value with ids and timestamps masked, so two runs of the same thing compare equal."""
    if isinstance(value, dict):
        return {k: "<volatile>" if k in _VOLATILE_KEYS else norm(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [norm(v) for v in value]
    if isinstance(value, str):
        if _UUID.match(value):
            return "<uuid>"
        if _TIMESTAMP.match(value):
            return "<ts>"
    return value


_open_clients: list[Any] = []


def sdk(url: str) -> Any:
    # api_key=None: never pick up a LangSmith key from the environment.
    client = get_client(url=url, api_key=None)
    _open_clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> Any:
    """Close every SDK client a test made, on the test's own loop (no stray sockets at GC time)."""
    yield
    while _open_clients:
        await _open_clients.pop().aclose()


async def collect(parts: Any) -> list[Any]:
    return [p async for p in parts]


def seq(parts: list[Any]) -> list[tuple[str, Any]]:
    """A stream as (event, masked data) pairs."""
    return [(p.event, norm(p.data)) for p in parts]


def frames(evs: list[Ev]) -> list[tuple[str, Any]]:
    return [(e.event, e.json) for e in evs]


async def _http_status(coro: Any) -> int:
    try:
        await coro
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    return 200


async def _until_it_ticks(c: Any, tid: str, run_id: str) -> None:
    """Return once the run's graph has written its first tick.

    The server fills a run's stored kwargs (config, metadata) when a worker takes the run up. A
    fixed sleep before cancelling raced that under load: one side's run was cancelled still queued
    and listed bare kwargs, the other's enriched ones."""
    async with contextlib.aclosing(c.runs.join_stream(tid, run_id)) as parts:
        async for part in parts:
            if part.event == "custom":
                return
    raise AssertionError("the run ended before its first tick")


# --- the shared scenario --------------------------------------------------------------------------

async def scenario(url: str) -> dict[str, Any]:
    """Every ordinary SDK operation once; returns a masked transcript."""
    c = sdk(url)
    tag = str(uuid.uuid4())
    out: dict[str, Any] = {}

    out["assistants.search"] = norm(await c.assistants.search(graph_id="ticker", limit=5))

    thread = await c.threads.create(metadata={"suite": tag})
    tid = thread["thread_id"]
    out["threads.create"] = norm(thread)
    out["threads.get"] = norm(await c.threads.get(tid))
    out["threads.search"] = norm(await c.threads.search(metadata={"suite": tag}))

    # Background run, then join: the final state comes back.
    r1 = await c.runs.create(tid, "ticker", input={"n": 3, "delay": 0.01}, stream_mode=TICKER_MODES)
    out["runs.create"] = {k: norm(r1[k]) for k in ("status", "metadata", "multitask_strategy")}
    out["runs.join"] = norm(await c.runs.join(tid, r1["run_id"]))
    out["runs.get"] = norm(await c.runs.get(tid, r1["run_id"]))

    out["runs.wait"] = norm(await c.runs.wait(tid, "ticker", input={"n": 2, "delay": 0.01}))
    out["runs.stream"] = seq(await collect(c.runs.stream(tid, "ticker", input={"n": 3, "delay": 0.01},
                                                         stream_mode=TICKER_MODES)))
    out["runs.stream fail"] = seq(await collect(c.runs.stream(tid, "fail", input={}, stream_mode=TICKER_MODES)))

    # A long run cancelled while it runs.
    r_long = await c.runs.create(tid, "ticker", input={"n": 200, "delay": 0.05}, stream_mode=TICKER_MODES)
    await _until_it_ticks(c, tid, r_long["run_id"])
    await c.runs.cancel(tid, r_long["run_id"], wait=True)
    out["runs.cancel -> get"] = (await c.runs.get(tid, r_long["run_id"]))["status"]

    out["runs.list"] = norm(await c.runs.list(tid))
    out["runs.list limit/offset"] = norm(await c.runs.list(tid, limit=2, offset=1))
    out["runs.list status"] = norm(await c.runs.list(tid, status="error"))
    out["runs.list select"] = norm(await c.runs.list(tid, select=["run_id", "status", "assistant_id"]))

    await c.runs.delete(tid, r1["run_id"])
    out["runs.delete -> get"] = await _http_status(c.runs.get(tid, r1["run_id"]))
    out["runs.list after delete"] = [r["status"] for r in await c.runs.list(tid, limit=20)]
    out["threads.get final"] = norm(await c.threads.get(tid))

    # Stateless runs.
    out["stateless runs.wait"] = norm(await c.runs.wait(None, "ticker", input={"n": 2, "delay": 0.01}))
    out["stateless runs.stream"] = seq(await collect(c.runs.stream(None, "ticker", input={"n": 3, "delay": 0.01},
                                                                   stream_mode=TICKER_MODES)))
    return out


async def test_same_results_direct_and_through_gateway(langgraph_server: Any, lg_gateway: Any) -> None:
    async with asyncio.timeout(60):
        direct, via = await asyncio.gather(scenario(langgraph_server.url), scenario(lg_gateway.url))
    assert direct.keys() == via.keys()
    for key in direct:
        assert via[key] == direct[key], f"{key}: gateway differs from the server"
    # Sanity: the scenario really exercised what it claims.
    assert [e for e, _ in direct["runs.stream fail"]][-1] == "error"
    assert direct["runs.cancel -> get"] == "interrupted"
    assert direct["runs.delete -> get"] == 404
    assert [e for e, _ in direct["runs.stream"]].count("custom") == 3


async def test_objects_created_through_gateway_read_the_same_directly(langgraph_server: Any,
                                                                      lg_gateway: Any) -> None:
    via, direct = sdk(lg_gateway.url), sdk(langgraph_server.url)
    async with asyncio.timeout(30):
        thread = await via.threads.create(metadata={"suite": str(uuid.uuid4())})
        tid = thread["thread_id"]
        run = await via.runs.create(tid, "ticker", input={"n": 2, "delay": 0.01})
        await via.runs.join(tid, run["run_id"])
        reads: tuple[tuple[str, Callable[[Any], Awaitable[Any]]], ...] = (
            ("thread", lambda c: c.threads.get(tid)),
            ("run", lambda c: c.runs.get(tid, run["run_id"])),
            ("runs", lambda c: c.runs.list(tid)))
        for name, call in reads:
            assert await call(via) == await call(direct), name


async def test_thread_join_stream_basic(langgraph_server: Any, lg_gateway: Any) -> None:
    async def one(url: str) -> list[tuple[str, Any]]:
        c = sdk(url)
        tid = (await c.threads.create())["thread_id"]
        got: list[Any] = []
        done = asyncio.Event()

        async def follow() -> None:
            async for part in await c.threads.join_stream(tid):
                got.append(part)
                if part.event == "metadata" and part.data.get("status") == "run_done":
                    done.set()
                    return

        task = asyncio.create_task(follow())
        try:
            await asyncio.sleep(1.0)  # the thread stream is open before the run starts
            run = await c.runs.create(tid, "ticker", input={"n": 3, "delay": 0.01}, stream_mode=TICKER_MODES)
            await c.runs.join(tid, run["run_id"])
            await asyncio.wait_for(done.wait(), 15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return seq(got)

    async with asyncio.timeout(40):
        direct, via = await asyncio.gather(one(langgraph_server.url), one(lg_gateway.url))
    assert via == direct
    assert direct[0] == ("metadata", {"run_id": "<uuid>", "attempt": 1})
    assert direct[-1] == ("metadata", {"status": "run_done", "run_id": "<uuid>"})
    assert [e for e, _ in direct].count("custom") == 3


async def _thread_stream_as(http: aiohttp.ClientSession, base: str, stream_modes: str | None) -> list[str]:
    """The events a thread stream opened with ``stream_modes`` (None: not given) gets while the
    thread's state is updated and then a run goes, up to that run's `run_done`."""
    async with http.post(f"{base}/threads", json={"metadata": {"graph_id": "ticker"}}) as t:
        tid = (await t.json())["thread_id"]
    params = {} if stream_modes is None else {"stream_modes": stream_modes}
    async with http.get(f"{base}/threads/{tid}/stream", params=params) as ts:
        assert ts.status == 200, await ts.text()
        await asyncio.sleep(1.0)  # the thread stream is open before anything happens on the thread
        async with http.post(f"{base}/threads/{tid}/state", json={"values": {"items": ["x"]}}) as s:
            assert s.status == 200, await s.text()
        async with http.post(f"{base}/threads/{tid}/runs/stream",
                             json={"assistant_id": "ticker", "input": {"n": 2, "delay": 0.01}}) as r:
            await read_events(r)
        got: list[Ev] = []
        while not got or got[-1].event != "metadata" or got[-1].json.get("status") != "run_done":
            got += await read_events(ts, limit=1)
    return [e.event for e in got]


@pytest.mark.parametrize("stream_modes", [None, "", "lifecycle,state_update", "run_modes, lifecycle",
                                          "lifecycle , state_update"])
async def test_thread_stream_modes_select_what_the_server_selects(langgraph_server: Any, lg_gateway: Any,
                                                                  http: aiohttp.ClientSession,
                                                                  stream_modes: str | None) -> None:
    # Not given or empty is `run_modes`, which leaves out `state_update`; the entries of a list are
    # stripped (a single value is not: " " is refused, tests/test_edge.py).
    async with asyncio.timeout(40):
        direct, via = await asyncio.gather(_thread_stream_as(http, langgraph_server.url, stream_modes),
                                           _thread_stream_as(http, lg_gateway.url, stream_modes))
    assert via == direct
    assert ("state_update" in direct) == (stream_modes in ("lifecycle,state_update", "lifecycle , state_update")), \
        "the server's rule changed"


async def _events_for(http: aiohttp.ClientSession, url: str, last: str | None,
                      seconds: float) -> tuple[list[Ev], str | None]:
    """What a stream gives within ``seconds`` (a thread stream never ends), and its X-Gateway-Resume."""
    async with http.get(url, headers={"Last-Event-ID": last} if last is not None else {}) as r:
        assert r.status == 200, await r.text()
        got: list[Ev] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    more = await read_events(r, limit=1)
                    if not more:
                        break
                    got += more
        return got, r.headers.get("X-Gateway-Resume")


async def test_what_the_server_replays_from_before_a_capture_began_is_said_missing(
        langgraph_server: Any, lg_gateway: Any, http: aiohttp.ClientSession) -> None:
    # The server replays a thread's earlier resumable runs to a thread stream from the start ("-"),
    # and a resumable run from its start ("-1"). Streams the gateway first captured for a client with
    # no id (the live tail) lack that: a later client from the start is told (X-Gateway-Resume).
    direct, via = langgraph_server.url, lg_gateway.url
    async with http.post(f"{direct}/threads", json={}) as t:
        tid = (await t.json())["thread_id"]
    body = {"assistant_id": "ticker", "stream_resumable": True, "stream_mode": ["custom"]}
    async with http.post(f"{direct}/threads/{tid}/runs/stream", json={**body, "input": {"n": 2, "delay": 0.01}}) as r:
        await read_events(r)  # an earlier run, behind the gateway's back
    async with http.post(f"{direct}/threads/{tid}/runs", json={**body, "input": {"n": 8, "delay": 0.15}}) as r:
        rid = (await r.json())["run_id"]
    thread, run = f"/threads/{tid}/stream", f"/threads/{tid}/runs/{rid}/stream"
    async with asyncio.timeout(40):
        await asyncio.sleep(1.5)  # the run is under way
        live_thread, live_run = await asyncio.gather(_events_for(http, via + thread, None, 1.0),
                                                     _events_for(http, via + run, None, 10))
        assert live_run[0][0].event == "custom" and live_run[1] is None  # the live tail, as asked
        (d_thread, _), (d_run, _) = await asyncio.gather(_events_for(http, direct + thread, "-", 1.0),
                                                         _events_for(http, direct + run, "-1", 10))
        (g_thread, g_thread_said), (g_run, g_run_said) = await asyncio.gather(
            _events_for(http, via + thread, "-", 1.0), _events_for(http, via + run, "-1", 10))
    assert d_run[0].event == "metadata" and [e.json["i"] for e in d_run if e.event == "custom"] == list(range(8))
    assert [e.event for e in d_thread].count("metadata") >= 3, "the earlier run, and this one's start"
    assert g_run_said == "truncated" and g_run == live_run[0]
    assert g_thread_said == "truncated"


async def test_a_thread_stream_released_before_anything_happened_gets_what_came_meanwhile(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # Captured from the thread's start while nothing had happened, then released (nobody followed
    # it for thread_linger): a run meanwhile is replayed by the server to the next leg from the start.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                                           streams={"thread_linger": "200ms"}))
    async with http.post(f"{gw.url}/threads", json={}) as t:
        tid = (await t.json())["thread_id"]
    url = f"{gw.url}/threads/{tid}/stream"
    async with asyncio.timeout(30):
        async with http.get(url, headers={"Last-Event-ID": "-"}) as ts:
            assert ts.status == 200
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # released
        async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={
                "assistant_id": "ticker", "input": {"n": 2, "delay": 0.01}, "stream_mode": ["custom"]}) as r:
            ran = await read_events(r)
        got, said = await _events_for(http, url, "-", 2.0)
    assert said is None
    assert [(e.event, e.data) for e in got] == [(e.event, e.data) for e in ran] + [
        ("metadata", json.dumps({"status": "run_done", "run_id": ran[0].json["run_id"]}, separators=(",", ":")))]


async def test_the_stream_of_a_thread_the_server_does_not_know_is_its_own_and_stores_nothing(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The server answers it with 200 and heartbeats; the gateway relays that, and keeps nothing of it.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                                           streams={"thread_linger": "100ms"}))
    async with asyncio.timeout(30):
        for _ in range(3):
            async with http.get(f"{gw.url}/threads/{uuid.uuid4()}/stream") as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
        while gw.gw.hub.live_count():
            await asyncio.sleep(0.05)
    assert await gw.gw.log.streams() == []


# --- what the gateway adds ----------------------------------------------------------------------

async def test_gateway_event_ids_are_integers_strictly_increasing(lg_gateway: Any) -> None:
    c = sdk(lg_gateway.url)
    async with asyncio.timeout(30):
        tid = (await c.threads.create())["thread_id"]
        streams = [
            await collect(c.runs.stream(tid, "ticker", input={"n": 5, "delay": 0.01}, stream_mode=TICKER_MODES)),
            await collect(c.runs.stream(tid, "fail", input={}, stream_mode=TICKER_MODES)),
            await collect(c.runs.stream(None, "ticker", input={"n": 3, "delay": 0.01}, stream_mode=TICKER_MODES)),
        ]
        run = await c.runs.create(tid, "ticker", input={"n": 4, "delay": 0.01}, stream_mode=TICKER_MODES)
        streams.append(await collect(c.runs.join_stream(tid, run["run_id"], last_event_id="-1")))
    for parts in streams:
        assert parts, "empty stream"
        ids = [p.id for p in parts]
        assert all(isinstance(i, str) and re.fullmatch(r"\d+", i) for i in ids), ids
        nums = [int(i) for i in ids]
        assert nums == sorted(set(nums)), f"ids not strictly increasing: {nums}"


async def _run_stream_raw(http: aiohttp.ClientSession, base: str, path: str,
                          body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, list[Ev]]:
    async with http.post(base + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp, await read_events(resp)


async def test_location_is_relative_and_joinable(lg_gateway: Any, http: aiohttp.ClientSession) -> None:
    c = sdk(lg_gateway.url)
    async with asyncio.timeout(30):
        tid = (await c.threads.create())["thread_id"]
        resp, live = await _run_stream_raw(http, lg_gateway.url, f"/threads/{tid}/runs/stream",
                                           {"assistant_id": "ticker", "input": {"n": 4, "delay": 0.01},
                                            "stream_mode": TICKER_MODES})
        location = resp.headers["Location"]
        run_id = live[0].json["run_id"]
        assert location == f"/threads/{tid}/runs/{run_id}/stream"
        assert resp.headers["Content-Location"] == f"/threads/{tid}/runs/{run_id}"
        async with http.get(lg_gateway.url + location, headers={"Last-Event-ID": "-1"}) as joined:
            assert joined.status == 200
            assert joined.headers["Location"] == location
            replay = await read_events(joined)
    assert replay == live


async def test_a_background_run_whose_json_outgrows_the_body_limit_is_answered_and_captured(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The run's JSON echoes its metadata twice over: a request within streams.max_request_body got
    502 'upstream response body exceeds the limit' while the server had created the run, which
    the gateway then never captured (a client retrying it ran it twice)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                                           streams={"max_request_body": "64KiB"}))
    pad = "x" * 40_000
    body = {"assistant_id": "ticker", "input": {"n": 2, "delay": 0.01}, "stream_mode": ["custom"],
            "metadata": {"pad": pad}}
    async with asyncio.timeout(30):
        answers = []
        for base in (langgraph_server.url, gw.url):
            async with http.post(f"{base}/threads", json={}) as r:
                tid = (await r.json())["thread_id"]
            async with http.post(f"{base}/threads/{tid}/runs", json=body) as r:
                answers.append((r.status, r.content_type, await r.read()))
        assert answers[1][:2] == answers[0][:2] == (200, "application/json"), answers[1][2][:200]
        run = json.loads(answers[1][2])
        assert run["metadata"]["pad"] == pad
        async with http.get(f"{gw.url}/threads/{run['thread_id']}/runs/{run['run_id']}/stream",
                            headers={"Last-Event-ID": "-1"}) as r:
            assert r.status == 200 and "X-Gateway-Resume" not in r.headers, "the run is held from its start"
            assert [e.json for e in await read_events(r) if e.event == "custom"] == [{"i": 0, "of": 2},
                                                                                   {"i": 1, "of": 2}]


async def test_replay_of_failed_run_keeps_terminal_error(langgraph_server: Any, lg_gateway: Any,
                                                         http: aiohttp.ClientSession) -> None:
    body = {"assistant_id": "fail", "input": {}, "stream_mode": TICKER_MODES, "stream_resumable": True}
    async with asyncio.timeout(30):
        tid = (await sdk(lg_gateway.url).threads.create())["thread_id"]
        resp, live = await _run_stream_raw(http, lg_gateway.url, f"/threads/{tid}/runs/stream", body)
        async with http.get(lg_gateway.url + resp.headers["Location"], headers={"Last-Event-ID": "-1"}) as r:
            assert r.status == 200
            replay = await read_events(r)
        # The same request straight at the server loses the `error` on replay.
        tid2 = (await sdk(langgraph_server.url).threads.create())["thread_id"]
        resp2, live2 = await _run_stream_raw(http, langgraph_server.url, f"/threads/{tid2}/runs/stream", body)
        async with http.get(langgraph_server.url + resp2.headers["Location"],
                            headers={"Last-Event-ID": "-1"}) as r2:
            upstream_replay = await read_events(r2)

    assert [e.event for e in live] == ["metadata", "custom", "custom", "custom", "error"]
    assert live[-1].json == {"error": "ValueError", "message": "boom: intentional failure"}
    assert replay == live, "the gateway's replay must be the live stream, ids included, error included"
    assert norm(frames(live)) == norm(frames(live2))
    assert [e.event for e in upstream_replay] == ["metadata", "custom", "custom", "custom"], \
        "upstream behaviour changed: it now keeps the error on replay"


async def test_replay_with_stream_mode_custom_gives_only_custom(lg_gateway: Any,
                                                                http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(30):
        tid = (await sdk(lg_gateway.url).threads.create())["thread_id"]
        resp, live = await _run_stream_raw(http, lg_gateway.url, f"/threads/{tid}/runs/stream",
                                           {"assistant_id": "ticker", "input": {"n": 4, "delay": 0.01},
                                            "stream_mode": TICKER_MODES})
        async with http.get(lg_gateway.url + resp.headers["Location"] + "?stream_mode=custom",
                            headers={"Last-Event-ID": "-1"}) as r:
            assert r.status == 200
            replay = await read_events(r)
    assert {e.event for e in live} == {"metadata", "values", "custom"}
    assert replay == [e for e in live if e.event == "custom"]
    assert [e.json["i"] for e in replay] == [0, 1, 2, 3]


async def _joined_as(http: aiohttp.ClientSession, base: str, created: list[str], joins: list[str],
                     last_event_id: str | None, **extra: Any) -> list[list[str]]:
    """A run of ``created`` modes (``extra``: more of its body), joined once per query string of
    ``joins``: the events each join got. With ``last_event_id``, each join replays the finished run;
    without, each joins it live."""
    tid = (await sdk(base).threads.create())["thread_id"]
    body = {"assistant_id": "ticker", "input": {"n": 3, "delay": 0.3}, "stream_mode": created,
            "stream_resumable": True, **extra}
    async with http.post(f"{base}/threads/{tid}/runs", json=body) as r:
        assert r.status == 200, await r.text()
        loc = f"{base}/threads/{tid}/runs/{(await r.json())['run_id']}/stream"
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    if last_event_id:
        await sdk(base).runs.join(tid, loc.split("/")[-2])

    async def one(query: str) -> list[str]:
        async with http.get(f"{loc}?{query}", headers=headers) as j:
            assert j.status == 200, await j.text()
            return [e.event for e in await read_events(j)]

    return list(await asyncio.gather(*(one(q) for q in joins)))


async def test_join_stream_mode_keeps_what_the_server_keeps(langgraph_server: Any, lg_gateway: Any,
                                                          http: aiohttp.ClientSession) -> None:
    # The server's rule: "messages" and "messages-tuple" each select every messages event (`messages`,
    # `messages/metadata`, `messages/complete`); an empty list, or an empty last value, is no filter.
    replayed = ["stream_mode=messages", "stream_mode=messages-tuple", "stream_mode=%5B%5D",
                "stream_mode=custom&stream_mode=", "stream_mode=%5B%22custom%22%5D"]
    # The server replays no `messages/...` event, so those are compared on live joins.
    live = ["stream_mode=messages-tuple", "stream_mode=messages"]
    async with asyncio.timeout(60):
        direct, via = await asyncio.gather(
            _joined_as(http, langgraph_server.url, ["messages-tuple", "custom"], replayed, "-1"),
            _joined_as(http, lg_gateway.url, ["messages-tuple", "custom"], replayed, "-1"))
        direct_live, via_live = await asyncio.gather(
            _joined_as(http, langgraph_server.url, ["messages", "custom"], live, None),
            _joined_as(http, lg_gateway.url, ["messages", "custom"], live, None))
    assert dict(zip(replayed, via)) == dict(zip(replayed, direct))
    assert direct[0] == ["messages"] and direct[2][:2] == ["metadata", "custom"], "the server's rule changed"
    messages = [[e for e in got if e.startswith("messages")] for got in (*direct_live, *via_live)]
    assert messages == [["messages/metadata", "messages/complete"]] * 4


async def test_subgraph_events_pass_the_join_filters_the_server_applies(langgraph_server: Any, lg_gateway: Any,
                                                                      http: aiohttp.ClientSession) -> None:
    # With stream_subgraphs, a subgraph's events are named `<mode>|<namespace>`: a join's stream_mode
    # selects them by the mode before the `|`, live and replayed alike.
    joins = ["", "stream_mode=custom", "stream_mode=updates", "stream_mode=messages-tuple",
             "stream_mode=%5B%22custom%22%2C%22metadata%22%5D"]
    created = ["custom", "updates", "messages-tuple"]

    def masked(got: list[list[str]]) -> list[list[str]]:
        return [[e.split("|")[0] + ("|<ns>" if "|" in e else "") for e in one] for one in got]

    async with asyncio.timeout(60):
        for last in ("-1", None):
            direct, via = await asyncio.gather(
                *(_joined_as(http, base, created, joins, last, assistant_id="nested", stream_subgraphs=True)
                  for base in (langgraph_server.url, lg_gateway.url)))
            assert masked(via) == masked(direct)
            assert masked(direct)[1] == ["custom|<ns>"] * 3, "the server's rule changed"


@pytest.mark.parametrize("bad", ["abc", "12abc", "1.5", "x-1"])
async def test_malformed_last_event_id_is_422_json(lg_gateway: Any, http: aiohttp.ClientSession, bad: str) -> None:
    async with asyncio.timeout(30):
        tid = (await sdk(lg_gateway.url).threads.create())["thread_id"]
        resp, _ = await _run_stream_raw(http, lg_gateway.url, f"/threads/{tid}/runs/stream",
                                        {"assistant_id": "ticker", "input": {"n": 1, "delay": 0}})
        location = resp.headers["Location"]
        variants: tuple[dict[str, Any], ...] = ({"headers": {"Last-Event-ID": bad}},
                                                {"params": {"last_event_id": bad}})
        for kwargs in variants:
            async with http.get(lg_gateway.url + location, **kwargs) as r:
                assert r.status == 422, (kwargs, await r.text())
                assert r.content_type == "application/json"
                doc = await r.json()
                assert set(doc) == {"detail"} and isinstance(doc["detail"], str) and doc["detail"], doc


async def test_stateless_stream_location_replays_through_gateway(langgraph_server: Any, lg_gateway: Any,
                                                                 http: aiohttp.ClientSession) -> None:
    body = {"assistant_id": "ticker", "input": {"n": 3, "delay": 0.01}, "stream_mode": TICKER_MODES}
    async with asyncio.timeout(30):
        resp, live = await _run_stream_raw(http, lg_gateway.url, "/runs/stream", body)
        location = resp.headers["Location"]
        run_id = live[0].json["run_id"]
        assert location == f"/runs/{run_id}/stream"
        async with http.get(lg_gateway.url + location, headers={"Last-Event-ID": "-1"}) as r:
            assert r.status == 200, await r.text()
            replay = await read_events(r)
        # Straight at the server that path does not exist.
        resp2, _ = await _run_stream_raw(http, langgraph_server.url, "/runs/stream", body)
        async with http.get(langgraph_server.url + resp2.headers["Location"],
                            headers={"Last-Event-ID": "-1"}) as r2:
            assert r2.status == 404
    assert replay == live
    assert [e.json["i"] for e in live if e.event == "custom"] == [0, 1, 2]


@pytest.mark.parametrize("method,path", [("GET", "/no/such/path"), ("POST", "/threads/x/nothing"),
                                         ("GET", "/runs/not-a-run/extra/bits")])
async def test_unknown_path_404_same_as_direct(langgraph_server: Any, lg_gateway: Any,
                                               http: aiohttp.ClientSession, method: str, path: str) -> None:
    results = []
    for base in (langgraph_server.url, lg_gateway.url):
        async with http.request(method, base + path) as r:
            results.append((r.status, r.content_type, await r.json()))
    assert results[1] == results[0]
    assert results[0][0] == 404


async def _status_after_a_join_left(http: aiohttp.ClientSession, base: str, query: str) -> str:
    """A background run joined with ``query``, the join left after the run's first tick: how the run
    ended (cancelled on that disconnect or not, as the join's ``cancel_on_disconnect`` says)."""
    tid = (await sdk(base).threads.create())["thread_id"]
    async with http.post(f"{base}/threads/{tid}/runs",
                         json={"assistant_id": "ticker", "input": {"n": 30, "delay": 0.2}, "stream_mode": ["custom"]}) as r:
        assert r.status == 200, await r.text()
        rid = (await r.json())["run_id"]
    async with http.get(f"{base}/threads/{tid}/runs/{rid}/stream?{query}") as j:
        assert j.status == 200, await j.text()
        await j.content.readuntil(b"event: custom")
        j.close()  # the connection itself, not back to the pool: the client left
    for _ in range(300):  # bounded: the run lasts 6 s when it is not cancelled
        status = str((await sdk(base).runs.get(tid, rid))["status"])
        if status not in ("pending", "running"):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {rid} still {status}")


@pytest.mark.parametrize("query", ["cancel_on_disconnect=false&cancel_on_disconnect=true",
                                   "cancel_on_disconnect=true&cancel_on_disconnect=false"])
async def test_a_repeated_cancel_on_disconnect_is_read_as_the_server_reads_it(
        langgraph_server: Any, lg_gateway: Any, http: aiohttp.ClientSession, query: str) -> None:
    """The server reads a query parameter given twice by its last value (Starlette). The gateway read
    the join's cancel_on_disconnect by its first: a run the client asked to keep going was cancelled
    when it left, and one it asked to cancel ran on."""
    async with asyncio.timeout(60):
        direct, via = await asyncio.gather(_status_after_a_join_left(http, langgraph_server.url, query),
                                           _status_after_a_join_left(http, lg_gateway.url, query))
    assert via == direct
    assert direct == ("interrupted" if query.endswith("true") else "success"), "the server's rule changed"


async def test_a_redirect_behind_a_tls_proxy_points_at_the_gateway(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Behind a trusted proxy that terminated TLS, the server is told X-Forwarded-Proto: https and
    builds its trailing-slash redirect as https://<its own host:port>/... The gateway left that URL
    as it was (it only owned its replicas' URLs scheme and all): the client was sent to the
    upstream's internal address, over a scheme it does not even serve."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                                           clients={"trusted_proxies": ["127.0.0.1"]}))
    proxied = {"X-Forwarded-Proto": "https"}
    async with http.get(f"{langgraph_server.url}/threads/", headers=proxied, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (307, langgraph_server.url.replace("http:", "https:") + "/threads"), \
            "the server's rule changed"
    async with http.get(f"{gw.url}/threads/", headers=proxied, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (307, "/threads")


async def _slow_answers(upstream_port: int, delay: float) -> asyncio.Server:
    """A TCP relay to the upstream that passes requests at once and holds each connection's answer
    back ``delay`` seconds: the upstream has acted on a request while its answer is still on the way."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        try:
            first = True
            while data := await reader.read(65536):
                if first and hold:
                    await asyncio.sleep(hold)
                first = False
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def accept(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(c_reader, u_writer, 0), pipe(u_reader, c_writer, delay))

    return await asyncio.start_server(accept, "127.0.0.1", 0)


async def _statuses_when_done(http: aiohttp.ClientSession, server: str, tid: str) -> list[str]:
    for _ in range(300):  # bounded: a run that is not cancelled ends after 6 s
        async with http.get(f"{server}/threads/{tid}/runs") as r:
            statuses = [str(run["status"]) for run in await r.json()]
        if statuses and not {"pending", "running"} & set(statuses):
            return statuses
        await asyncio.sleep(0.1)
    raise AssertionError(f"runs of {tid} still {statuses}")


async def test_a_run_asked_to_cancel_on_disconnect_is_cancelled_when_its_client_leaves_before_the_answer(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The gateway sends the upstream ``on_disconnect: continue`` and cancels the run itself when its
    last client leaves. A client that left after the run was created but before the upstream's
    answer reached the gateway cancelled the request before the capture (and its cancel) existed:
    the run went on to the end, where the server cancels it."""
    relay = await _slow_answers(int(langgraph_server.url.rsplit(":", 1)[1]), 0.5)
    try:
        port = relay.sockets[0].getsockname()[1]
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [f"http://127.0.0.1:{port}"]}}))
        body = json.dumps({"assistant_id": "ticker", "input": {"n": 30, "delay": 0.2}, "stream_mode": ["custom"],
                           "on_disconnect": "cancel"}).encode()
        async with asyncio.timeout(60):
            for base in (langgraph_server.url, gw.url):
                tid = (await sdk(langgraph_server.url).threads.create())["thread_id"]
                host, client_port = base.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(client_port))
                writer.write(f"POST /threads/{tid}/runs/stream HTTP/1.1\r\nHost: {host}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                while not await sdk(langgraph_server.url).runs.list(tid):  # created upstream ...
                    await asyncio.sleep(0.01)
                writer.close()  # ... and its client gone, before the answer came back through the relay
                assert await _statuses_when_done(http, langgraph_server.url, tid) == ["interrupted"], base
    finally:
        relay.close()



@pytest.mark.parametrize("leave_after", [0.3, 0.8], ids=["during-the-run-check", "during-the-legs-head"])
async def test_a_join_asked_to_cancel_on_disconnect_cancels_when_its_client_leaves_before_it_is_attached(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession,
        leave_after: float) -> None:
    """The gateway keeps cancel_on_disconnect from the upstream's join and cancels the run itself when
    its last client leaves. A client that left while the gateway was still attaching it (asking the
    upstream whether the run exists, opening the leg) was never counted as a client: the run went on,
    where the server cancels it as soon as the client of its join is gone."""
    relay = await _slow_answers(int(langgraph_server.url.rsplit(":", 1)[1]), 0.5)
    try:
        port = relay.sockets[0].getsockname()[1]
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [f"http://127.0.0.1:{port}"]}}))
        async with asyncio.timeout(60):
            for base in (langgraph_server.url, gw.url):
                tid = (await sdk(langgraph_server.url).threads.create())["thread_id"]
                run = await sdk(langgraph_server.url).runs.create(tid, "ticker", input={"n": 30, "delay": 0.2},
                                                                  stream_mode=["custom"])
                host, client_port = base.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(client_port))
                writer.write(f"GET /threads/{tid}/runs/{run['run_id']}/stream?cancel_on_disconnect=true HTTP/1.1\r\n"
                             f"Host: {host}\r\n\r\n".encode())
                await asyncio.sleep(leave_after)  # the relay holds every answer 0.5 s
                writer.close()
                assert await _statuses_when_done(http, langgraph_server.url, tid) == ["interrupted"], base
    finally:
        relay.close()


# Content-Encoding of a request body is the upstream's to judge: this one reads no gzip (422 for a
# gzip body, and a plain body labelled gzip is read as it is).
_ENCODED_BODIES = {
    "gzip body, Content-Length": (gzip.compress(b'{"limit": 1}'), "gzip", False),
    "gzip body, chunked": (gzip.compress(b'{"limit": 1}'), "gzip", True),
    "plain body labelled gzip": (b'{"limit": 1}', "gzip", False),
    "plain body labelled deflate": (b'{"limit": 1}', "deflate", False),
}


@pytest.mark.parametrize("case", list(_ENCODED_BODIES))
async def test_a_content_encoded_request_body_gets_the_servers_own_answer(
        make_gateway: Any, langgraph_server: Any, tmp_path: Path, http: aiohttp.ClientSession, case: str) -> None:
    """The gateway decoded gzip request bodies itself and forwarded the result under the client's
    Content-Length and Content-Encoding: a gzip body hung until read_timeout (504), a chunked one got
    an answer the server never gives (200), a body that did not decode a 500 or a text-free 400."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url],
                                                                  "read_timeout": "10s"}}))
    body, encoding, chunked = _ENCODED_BODIES[case]

    async def chunks() -> Any:
        yield body

    results = []
    for base in (langgraph_server.url, gw.url):
        async with http.post(base + "/assistants/search", data=chunks() if chunked else body,
                             headers={"Content-Type": "application/json", "Content-Encoding": encoding}) as r:
            results.append((r.status, r.content_type, await r.read()))
    assert results[1] == results[0]


# --- the JS SDK -------------------------------------------------------------------------------------

def _js_skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS_DIR / "node_modules" / "@langchain" / "langgraph-sdk").is_dir():
        return "tests/js/node_modules is missing: run `npm install` in tests/js"
    return None


# 2.0.0 was pinned first (npm marks it deprecated); 1.15.0 is what `npm install` gives (latest tag).
@pytest.mark.parametrize("package", ["@langchain/langgraph-sdk", "@langchain/langgraph-sdk-latest"],
                         ids=["sdk-2.0.0", "sdk-latest-1.15.0"])
async def test_js_sdk_sees_what_python_sdk_sees(lg_gateway: Any, package: str) -> None:
    reason = _js_skip_reason()
    if reason:
        pytest.skip(reason)
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / "sdk_stream.mjs"), lg_gateway.url, package, cwd=JS_DIR,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 45)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    js = json.loads(out.decode().strip().splitlines()[-1])
    tid, (stream_run, join_run) = js["thread_id"], js["run_ids"]

    c = sdk(lg_gateway.url)
    async with asyncio.timeout(30):
        # The same runs, replayed from the gateway's log by the Python SDK.
        py_stream = await collect(c.runs.join_stream(tid, stream_run, last_event_id="-1"))
        py_join = await collect(c.runs.join_stream(tid, join_run, last_event_id="-1"))
        # And a fresh run of the same request, streamed live by the Python SDK.
        fresh_tid = (await c.threads.create())["thread_id"]
        py_fresh = await collect(c.runs.stream(fresh_tid, "ticker", input={"n": 5, "delay": 0.02},
                                               stream_mode=TICKER_MODES))

    js_stream = [tuple(p) for p in js["stream"]]
    js_join = [tuple(p) for p in js["join"]]
    assert js_stream == [(p.event, p.data) for p in py_stream]
    assert js_join == [(p.event, p.data) for p in py_join]
    assert norm(js_stream) == norm(seq(py_fresh))
    assert [d["i"] for e, d in js_join if e == "custom"] == [0, 1, 2, 3, 4]
    assert js_join[0] == ("metadata", {"run_id": join_run, "attempt": 1})
