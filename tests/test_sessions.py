"""The v3 thread session (the SDK's ``client.threads.stream``) through the gateway, in front of a real
``langgraph dev``: the official SDK unchanged over SSE and WebSocket, cuts checked on the wire, the
upstream restarted empty, the gateway killed and restarted, a filtered replay, the session moving
to another replica on Redis. And the parts alone: the subscription filter against the server's
own code, the seam that keeps a re-joined capture exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from langgraph_sdk import get_client

from gateway import sessions
from tests.conftest import GatewayProcess, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.chaos_proxy import ChaosProxy
from tests.support.cut_relay import CutRelay
from tests.support.langgraph_server import LangGraphServer
from tests.support.metrics import by_label
from tests.support.procs import free_port
from tests.support.raw_ws import client_frame, raw_websocket, server_frame
from tests.support.redis_server import RedisServer
from tests.support.tcp_relay import TcpRelay

MakeGateway = Callable[..., Awaitable[RunningGateway]]
ALL = list(sessions.CHANNELS)
pytestmark = pytest.mark.timeout(90)


# --- a client of the protocol, by hand ------------------------------------------------------------

async def new_thread(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/threads", json={}) as r:
        return str((await r.json())["thread_id"])


async def run_start(http: aiohttp.ClientSession, url: str, tid: str, n: int, delay: float) -> str:
    async with http.post(f"{url}/threads/{tid}/commands", json={
            "id": 1, "method": "run.start", "params": {"assistant_id": "ticker", "input": {"n": n, "delay": delay}}}) as r:
        doc = await r.json()
    assert doc["type"] == "success", doc
    return str(doc["result"]["run_id"])


def is_end(event: dict[str, Any]) -> bool:
    params = event.get("params") or {}
    return (event.get("method") == "lifecycle" and params.get("namespace") == []
            and params.get("data", {}).get("event") in ("completed", "failed"))


async def frames(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any], int | None]]:
    """(event name, data JSON, id) of each frame of a session's SSE body, as it comes."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line and line[:1] != b":")
            if b"data" in fields:
                yield (fields.get(b"event", b"message").decode(), orjson.loads(fields[b"data"]),
                       int(fields[b"id"]) if b"id" in fields else None)


async def read_session(http: aiohttp.ClientSession, url: str, tid: str, *, since: int | None = None,
                       channels: list[str] = ALL, runs: int = 1, count: int | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
    """A subscription's events until ``runs`` runs ended (or ``count`` events came, or ``limit`` came
    and the client drops the connection); each event's wire id is checked to be its seq."""
    body: dict[str, Any] = {"channels": channels}
    if since is not None:
        body["since"] = since
    got: list[dict[str, Any]] = []
    async with http.post(f"{url}/threads/{tid}/stream/events", json=body) as r:
        assert r.status == 200, await r.text()
        async for name, data, wire_id in frames(r):
            assert wire_id == data.get("seq"), "the id line is the event's seq"
            got.append(data)
            ended = sum(1 for e in got if is_end(e))
            if ended >= runs and count is None and limit is None:
                break
            if (count is not None and len(got) >= count) or (limit is not None and len(got) >= limit):
                break
    return got


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events if e.get("type") == "event"]


def assert_every_stored_event_once(got: list[dict[str, Any]], direct: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``got`` holds every event the upstream keeps (``direct``, its own replay) once and in its order;
    what else it holds is the events the upstream published live only, and gap markers. Returns those."""
    kept = set(ids(direct))
    assert [i for i in ids(got) if i in kept] == ids(direct), "every event the upstream keeps, once, in its order"
    assert len(set(ids(got))) == len(ids(got)), "nothing twice"
    return [e for e in got if e.get("type") != "event" or e["event_id"] not in kept]


def assert_seqs_grow(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "seqs strictly increase, nothing twice"


# --- the official SDK, unchanged ----------------------------------------------------------------------

async def sdk_session(url: str, transport: str, n: int = 4) -> tuple[list[Any], list[Any], Any]:
    async with get_client(url=url, api_key=None) as client:
        async with client.threads.stream(assistant_id="ticker", transport=transport) as thread:  # type: ignore[arg-type]
            async def values() -> list[Any]:
                return [v.get("items") if isinstance(v, dict) else v async for v in thread.values]

            async def lifecycle() -> list[Any]:
                return [(e["params"]["namespace"], e["params"]["data"]["event"])
                        async for e in thread.subscribe(["lifecycle"])]

            await thread.run.start(input={"n": n, "delay": 0.05})
            got_values, got_lifecycle = await asyncio.wait_for(asyncio.gather(values(), lifecycle()), 60)
            output = await asyncio.wait_for(thread.output, 60)
    return got_values, got_lifecycle, output["items"]


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_sdk_session_through_the_gateway_sees_what_it_sees_direct(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, transport: str) -> None:
    through = await sdk_session(lg_gateway.url, transport)
    direct = await sdk_session(langgraph_server.url, transport)
    assert through == direct
    assert through[2] == [0, 1, 2, 3, "done"]


@pytest.mark.parametrize("after", [2, 5])
async def test_a_cut_sdk_session_resumes_exactly_and_the_wire_shows_it(
        lg_gateway: RunningGateway, after: int) -> None:
    proxy = await ChaosProxy(lg_gateway.url, after_events=after, cuts=2).start()
    try:
        values, lifecycle, output = await sdk_session(proxy.url, "sse", n=12)
    finally:
        await proxy.stop()
    assert output == [*range(12), "done"] and lifecycle[-1] == ([], "completed")
    reconnects = [body for r in proxy.requests if r.target.endswith("/stream/events")
                  and (body := orjson.loads(r.body)).get("since")]
    assert reconnects, "the SDK reconnected with since"
    # On the wire: each response after a reconnect carried only events after that reconnect's since.
    for stream in proxy.streams:
        seqs = [orjson.loads(line[6:])["seq"] for frame in stream for line in frame.replace(b"\r\n", b"\n").split(b"\n")
                if line.startswith(b"data: ")]
        assert seqs == sorted(set(seqs)), "no event twice on one response"
    cut = [s for s in proxy.streams[:2]]
    sent_before = {orjson.loads(line[6:])["seq"] for frame in sum(cut, []) for line in frame.split(b"\n")
                   if line.startswith(b"data: ")}
    for body in reconnects:
        assert body["since"] in sent_before, "since is a seq the gateway sent"


# --- by hand, on the wire ---------------------------------------------------------------------------

async def test_a_dropped_subscription_resumes_exactly_and_a_filter_keeps_the_original_seqs(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, lg_gateway.url)
    await run_start(http, lg_gateway.url, tid, n=15, delay=0.05)
    first = await read_session(http, lg_gateway.url, tid, limit=12)  # then the client drops the connection
    rest = await read_session(http, lg_gateway.url, tid, since=first[-1]["seq"])
    whole = await read_session(http, lg_gateway.url, tid)
    assert first + rest == whole, "exactly the events after since, then the live tail"
    assert_seqs_grow(whole)
    assert [e["method"] for e in whole].count("custom") >= 30, "every channel is captured"
    ticks = await read_session(http, lg_gateway.url, tid, channels=["custom:ticks"], count=15)
    assert ticks == [e for e in whole if e["method"] == "custom" and e["params"]["data"].get("name") == "ticks"]
    mid = whole[len(whole) // 2]["seq"]
    later_ticks = await read_session(http, lg_gateway.url, tid, since=mid, channels=["custom:ticks"],
                                     count=sum(1 for e in ticks if e["seq"] > mid))
    assert later_ticks == [e for e in ticks if e["seq"] > mid]
    # The admin view holds it as one stream of its own kind, beside the thread's other streams.
    async with http.get(f"{lg_gateway.admin_url}/streams", params={"thread": tid}) as r:
        listed = {m["key"]: m for m in await r.json()}
    key = f"default/session/{tid}"
    assert listed[key]["kind"] == "session" and listed[key]["captured_here"] and listed[key]["state"] == "live"
    async with http.get(f"{lg_gateway.admin_url}/streams/{key}") as r:
        assert (await r.json())["head"] == whole[-1]["seq"]


async def test_the_websocket_honours_since_on_subscribe_and_answers_reconnect_from_the_log(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, lg_gateway.url)
    await run_start(http, lg_gateway.url, tid, n=6, delay=0.02)
    whole = await read_session(http, lg_gateway.url, tid)
    mid = whole[len(whole) // 2]["seq"]
    async with http.ws_connect(f"{lg_gateway.url}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL, "since": mid}})
        got, reply = await ws_until_reply(ws, 1)
        assert got == [e for e in whole if e["seq"] > mid] and reply["result"]["replayed_events"] == len(got)
        await ws.send_json({"id": 2, "method": "subscription.reconnect",
                            "params": {"channels": ["lifecycle"], "since": whole[0]["seq"], "subscription_id": "s"}})
        got, reply = await ws_until_reply(ws, 2)
        assert reply["result"]["subscription_id"] == "s"
        assert got == [e for e in whole if e["seq"] > whole[0]["seq"] and e["method"] == "lifecycle"], \
            "a replay holds what it matches, sent on the socket already or not, as the upstream's"
        await ws.send_json({"id": 3, "method": "agent.getTree", "params": {}})  # the upstream answers the rest
        _, reply = await ws_until_reply(ws, 3)
        assert reply["id"] == 3 and reply["type"] in ("success", "error")
        await ws.send_json({"id": 4, "method": "subscription.unsubscribe", "params": {"subscription_id": "nope"}})
        _, reply = await ws_until_reply(ws, 4)
        assert reply["error"] == "no_such_subscription"


async def test_a_later_subscription_on_a_socket_gets_its_replay_as_the_upstream_sends_it(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, http: aiohttp.ClientSession) -> None:
    """The upstream sends a live event once per socket, but a new subscription's replay holds every
    event it matches, sent before on the socket or not: the JS SDK keeps which events each of its
    subscriptions saw, and one opened late (``thread.values`` after the run ended) learns of the
    run's end only from its replay. The gateway left out of a replay what the socket had sent, so
    that subscription never heard the run end."""
    replays = []
    for url in (langgraph_server.url, lg_gateway.url):
        tid = await new_thread(http, url)
        async with http.ws_connect(f"{url}/threads/{tid}/stream/events") as ws:
            await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ["lifecycle"]}})
            await ws_until_reply(ws, 1)
            await run_start(http, url, tid, n=3, delay=0.01)
            got: list[dict[str, Any]] = []
            while not got or not is_end(got[-1]):
                got.append(orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data))
            await ws.send_json({"id": 2, "method": "subscription.subscribe",
                                "params": {"channels": ["values", "lifecycle"]}})
            replayed, reply = await ws_until_reply(ws, 2)
            assert reply["result"]["replayed_events"] == len(replayed)
            replays.append([(e["method"], e["event_id"]) for e in replayed])
    assert [m for m, _ in replays[1]] == [m for m, _ in replays[0]]
    assert replays[1][0][0] == "lifecycle" and replays[1][-1][0] == "lifecycle", "the run's start and end, again"


async def test_a_socket_with_several_subscriptions_sends_its_events_in_seq_order(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """The upstream sends a socket's events once each, in order, however many subscriptions match.
    Each subscription had a task of its own reading the log: an event two of them matched went out
    once, but from whichever task came to it first, so a lifecycle-only subscription (as the JS SDK
    keeps beside its stream) sent the run's ``completed`` ahead of the values before it."""
    tid = await new_thread(http, lg_gateway.url)
    async with http.ws_connect(f"{lg_gateway.url}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ["lifecycle"]}})
        await ws_until_reply(ws, 1)
        await ws.send_json({"id": 2, "method": "subscription.subscribe", "params": {"channels": ALL}})
        await ws_until_reply(ws, 2)
        got: list[dict[str, Any]] = []
        for run in range(5):  # subgraph lifecycles come amid a batch of the graph's other events
            async with http.post(f"{lg_gateway.url}/threads/{tid}/commands", json={
                    "id": 3, "method": "run.start",
                    "params": {"assistant_id": "nested", "input": {"n": 30, "delay": 0}}}) as r:
                assert (await r.json())["type"] == "success"
            while sum(1 for e in got if is_end(e)) <= run:
                got.append(orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data))
        whole = await read_session(http, lg_gateway.url, tid, runs=5)
        got += [orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data) for _ in whole[len(got):]]
    assert [e["seq"] for e in got] == [e["seq"] for e in whole], "every event once, in the log's order"


async def test_a_subscription_beside_one_from_past_the_head_replays_at_once(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """A subscription with a since past the log's head waits for events after it; one beside it on
    the same socket, from the start, is answered at once with what the log holds, then both get
    the live tail, each from its own since."""
    tid = await new_thread(http, lg_gateway.url)
    await run_start(http, lg_gateway.url, tid, n=3, delay=0.01)
    whole = await read_session(http, lg_gateway.url, tid)
    async with http.ws_connect(f"{lg_gateway.url}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe",
                            "params": {"channels": ["lifecycle"], "since": whole[-1]["seq"] + 10**9}})
        got, reply = await ws_until_reply(ws, 1)
        assert got == [] and reply["result"]["replayed_events"] == 0
        await ws.send_json({"id": 2, "method": "subscription.subscribe", "params": {"channels": ALL}})
        got, reply = await asyncio.wait_for(ws_until_reply(ws, 2), 10)
        assert got == whole and reply["result"]["replayed_events"] == len(whole)
        await run_start(http, lg_gateway.url, tid, n=3, delay=0.01)
        later: list[dict[str, Any]] = []
        while not later or not is_end(later[-1]):
            later.append(orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data))
    assert later == (await read_session(http, lg_gateway.url, tid, runs=2))[len(whole):]


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_socket_dropped_at_random_points_of_a_live_run_resumes_exactly(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession, seed: int) -> None:
    """The SDK's resume over the WebSocket, swept: the connection is reset after 1 to 14 events, again
    and again while the run goes on, and each new socket subscribes (or reconnects) with the last
    seq it saw. Together they hold the log's events once each, in order."""
    rng = random.Random(seed)
    tid = await new_thread(http, lg_gateway.url)
    host, port = lg_gateway.url.split("//", 1)[1].rsplit(":", 1)
    relay = await TcpRelay(host, int(port)).start()
    await run_start(http, lg_gateway.url, tid, n=40, delay=0.03)
    got: list[dict[str, Any]] = []
    try:
        while not got or not is_end(got[-1]):
            async with http.ws_connect(f"http://127.0.0.1:{relay.port}/threads/{tid}/stream/events") as ws:
                params: dict[str, Any] = {"channels": ALL}
                method = "subscription.subscribe"
                if got:
                    params.update(since=got[-1]["seq"], subscription_id="s")
                    method = rng.choice(["subscription.subscribe", "subscription.reconnect"])
                await ws.send_json({"id": 1, "method": method, "params": params})
                take = rng.randrange(1, 15)
                while take and not (got and is_end(got[-1])):
                    doc = orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                    if doc.get("id") == 1:
                        assert doc["type"] == "success", doc
                        continue
                    got.append(doc)
                    take -= 1
                relay.drop_all()  # a reset, not a close
    finally:
        await relay.stop()
    assert_seqs_grow(got)
    assert got == await read_session(http, lg_gateway.url, tid)


async def test_refusals_foreign_cursors_and_trimmed_history_are_answered_as_the_protocol_answers(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, lg_gateway.url)
    for body in (b"{}", b'{"channels": []}', b'{"channels": ["values", "nope", 3]}', b"{"):
        answers = []
        for url in (langgraph_server.url, lg_gateway.url):
            async with http.post(f"{url}/threads/{tid}/stream/events", data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                answers.append((r.status, await r.json()))
        assert answers[1] == answers[0] and answers[0][0] in (400, 422), (body, answers)
    await run_start(http, lg_gateway.url, tid, n=4, delay=0.01)
    whole = await read_session(http, lg_gateway.url, tid)
    async with http.post(f"{lg_gateway.url}/threads/{tid}/stream/events", json={"channels": ALL, "since": 3}) as r:
        # An upstream seq (or a cursor of an earlier capture) is no position of this log: all of it, said.
        assert r.headers["X-Gateway-Resume"] == "not-held"
        assert [data async for _n, data, _i in frames_until(r, len(whole))] == whole
    async with http.post(f"{lg_gateway.url}/threads/{tid}/stream/events", json={"channels": ["lifecycle"]}) as held:
        gw = lg_gateway.gw
        await gw.log.sweep(now=time.time() + gw.cfg.storage.retention + 5)  # the first run is past retention
        await run_start(http, lg_gateway.url, tid, n=2, delay=0.01)
        later = await read_session(http, lg_gateway.url, tid, since=whole[-1]["seq"])
        async with http.post(f"{lg_gateway.url}/threads/{tid}/stream/events",
                             json={"channels": ALL, "since": whole[1]["seq"]}) as r:
            assert r.headers["X-Gateway-Resume"] == "truncated"
            # The SDK reads no header: what retention took is said in the stream too, first.
            sse = [(name, data, i) async for name, data, i in frames_until(r, len(later) + 1)]
            assert [data for _n, data, _i in sse[1:]] == later
            name, said, wire_id = sse[0]
            assert (name, said["type"], said["id"], said["error"], wire_id) == ("error", "error", None, "resume_gap", None)
            assert said["since"] == whole[1]["seq"] and said["min_available_seq"] == later[0]["seq"], said
        async with http.ws_connect(f"{lg_gateway.url}/threads/{tid}/stream/events") as ws:
            await ws.send_json({"id": 1, "method": "subscription.reconnect",
                                "params": {"channels": ALL, "since": whole[1]["seq"], "subscription_id": "s"}})
            _, reply = await ws_until_reply(ws, 1)
            assert reply["error"] == "resume_gap" and reply["since"] == whole[1]["seq"]
            assert reply["min_available_seq"] == later[0]["seq"]
        async with http.ws_connect(f"{lg_gateway.url}/threads/{tid}/stream/events") as ws:
            # The SDK resumes a socket with subscribe and since: it got what was left and not a word of
            # what retention took. An unsolicited resume_gap (as the gap marker) comes first.
            await ws.send_json({"id": 1, "method": "subscription.subscribe",
                                "params": {"channels": ALL, "since": whole[1]["seq"]}})
            got, reply = await ws_until_reply(ws, 1)
            assert reply["type"] == "success", reply
            gap = got[0]
            assert gap["type"] == "error" and gap["id"] is None and gap["error"] == "resume_gap", got
            assert gap["since"] == whole[1]["seq"] and gap["min_available_seq"] == later[0]["seq"], gap
            assert got[1:] == later
        held.close()


async def frames_until(resp: aiohttp.ClientResponse, n: int) -> AsyncIterator[tuple[str, dict[str, Any], int | None]]:
    count = 0
    async for frame in frames(resp):
        yield frame
        count += 1
        if count >= n:
            return


async def ws_until_reply(ws: aiohttp.ClientWebSocketResponse, cid: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        doc = orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data)
        if doc.get("type") == "event" or (doc.get("type") == "error" and doc.get("id") is None):
            events.append(doc)  # an unsolicited error is in the stream (a gap said)
        elif doc.get("id") == cid:
            return events, doc


async def test_a_message_over_the_size_limit_closes_the_session_socket_with_1009(
        make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """The session socket took messages of any size (a 2 GB frame, or fragments adding up to it, held
    whole in memory) and passed them upstream as commands. Like the upstream's own socket (16 MiB,
    1009), it is bounded: by ``streams.max_request_body``, the bound of the commands it becomes."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                                           streams={"max_request_body": "64KiB"}))
    tid = await new_thread(http, gw.url)
    big = orjson.dumps({"id": 1, "method": "agent.getTree", "params": {"pad": "x" * (100 << 10)}})
    whole = [client_frame(0x1, big)]
    parts = [client_frame(0x1, big[:40 << 10], fin=False), client_frame(0x0, big[40 << 10:80 << 10], fin=False),
             client_frame(0x0, big[80 << 10:])]  # each fragment under the bound, the message over it
    for frames in (whole, parts):
        reader, writer = await raw_websocket(gw.url, f"/threads/{tid}/stream/events")
        writer.write(b"".join(frames))
        opcode, payload = await asyncio.wait_for(server_frame(reader), 10)
        assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, aiohttp.WSCloseCode.MESSAGE_TOO_BIG), payload
        writer.close()
    async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:  # within it, answered
        await ws.send_json({"id": 2, "method": "subscription.subscribe", "params": {"channels": ALL}})
        _, reply = await ws_until_reply(ws, 2)
        assert reply["type"] == "success", reply


async def test_a_binary_frame_closes_the_session_socket_with_1003(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, http: aiohttp.ClientSession) -> None:
    """Protocol commands are JSON text. The upstream ends a socket that sends a binary frame; the
    gateway dropped the frame without a word, so a client that sent its command as bytes waited
    for an answer forever. It closes the socket with 1003 (a kind of data it does not take)."""
    tid = await new_thread(http, lg_gateway.url)
    command = orjson.dumps({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL}})
    for url in (langgraph_server.url, lg_gateway.url):
        async with http.ws_connect(f"{url}/threads/{tid}/stream/events") as ws:
            await ws.send_bytes(command)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (url, msg)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA, msg


@pytest.mark.parametrize("hang", [0.5, 2.0])
async def test_a_ping_is_answered_while_a_command_waits_for_the_upstream(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, hang: float) -> None:
    """The upstream's server answers a ping in its protocol layer, whatever its handler is busy with.
    The gateway read the socket only between commands, so a command that waited on a slow upstream
    left the client's pings unanswered for as long (the SDK's keepalive gives up after 20 s and drops
    the session): the pong came after the command's answer. It comes first, the answer after."""
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    fake_upstream.faults.hang = hang  # the command's answer waits this long upstream
    reader, writer = await raw_websocket(gateway.url, f"/threads/{tid}/stream/events")
    try:
        command = orjson.dumps({"id": 7, "method": "run.start", "params": {"assistant_id": "ticker"}})
        writer.write(client_frame(0x1, command) + client_frame(0x9, b"are you there"))
        first = await asyncio.wait_for(server_frame(reader), 20)
        second = await asyncio.wait_for(server_frame(reader), 20)
    finally:
        writer.close()
    assert first == (0xA, b"are you there"), first
    assert second[0] == 0x1 and orjson.loads(second[1])["id"] == 7, second


async def test_an_unsubscribe_or_a_subscribe_is_refused_in_the_upstreams_words(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, http: aiohttp.ClientSession) -> None:
    """An unsubscribe without a subscription_id is an invalid argument to the upstream; the gateway
    answered it as an unknown subscription named ``None``. And a subscribe whose channels are no
    array (a string) was said to name an unsupported channel."""
    tid = await new_thread(http, lg_gateway.url)
    answers = []
    commands = [("subscription.unsubscribe", {}), ("subscription.unsubscribe", {"subscription_id": 7}),
                ("subscription.unsubscribe", {"subscription_id": "nope"}),
                ("subscription.subscribe", {"channels": "values"}), ("subscription.subscribe", {"channels": {}}),
                ("subscription.subscribe", {"channels": ["values", "nope"]})]
    for url in (langgraph_server.url, lg_gateway.url):
        async with http.ws_connect(f"{url}/threads/{tid}/stream/events") as ws:
            replies = []
            for cid, (method, params) in enumerate(commands, 1):
                await ws.send_json({"id": cid, "method": method, "params": params})
                _, reply = await ws_until_reply(ws, cid)
                replies.append((reply["type"], reply["error"], reply["message"]))
            answers.append(replies)
    assert answers[1] == answers[0], answers


async def test_a_socket_on_a_thread_id_the_log_does_not_key_is_proxied_as_it_is(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, http: aiohttp.ClientSession) -> None:
    """A thread id the log does not key a stream by (over 200 characters here) is passed to the
    upstream as it is. Its WebSocket upgrade was forwarded as a plain GET, which the upstream
    refuses with 405: the client saw a failed handshake where the upstream opens the socket (and
    closes it with 1011, the thread having no stream)."""
    tid = "x" * 201
    closes = []
    for url in (langgraph_server.url, lg_gateway.url):
        async with http.ws_connect(f"{url}/threads/{tid}/stream/events") as ws:
            await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ["values"]}})
            async with asyncio.timeout(10):
                async for msg in ws:
                    assert orjson.loads(msg.data)["id"] == 1, msg
            closes.append(ws.close_code)
    assert closes == [aiohttp.WSCloseCode.INTERNAL_ERROR] * 2


# --- faults ------------------------------------------------------------------------------------------

async def test_after_the_upstream_restarted_empty_the_log_answers_every_since(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    upstream = await asyncio.to_thread(LangGraphServer().start)
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [upstream.url]}},
                                               streams={"reattach_backoff": "200ms", "reattach_attempts": 20}))
        tid = await new_thread(http, gw.url)
        await run_start(http, gw.url, tid, n=8, delay=0.02)
        whole = await read_session(http, gw.url, tid)
        await asyncio.to_thread(upstream.restart_empty)  # SIGKILL: the thread and its runs are gone upstream
        async with http.get(f"{upstream.url}/threads/{tid}") as r:
            assert r.status == 404, "the upstream lost the thread"
        for since in (None, whole[len(whole) // 3]["seq"], whole[-2]["seq"]):
            expected = [e for e in whole if since is None or e["seq"] > since]
            assert await read_session(http, gw.url, tid, since=since, count=len(expected)) == expected
        async with aiohttp.ClientSession() as stranger:  # the upstream cannot say: only the captor reads the log
            for url in (upstream.url, gw.url):  # anyone else gets what the upstream gives them: nothing held
                async with stranger.post(f"{url}/threads/{tid}/stream/events", json={"channels": ALL},
                                         headers={"Authorization": "Bearer someone-else"}) as r:
                    assert r.status == 200
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 1.0)
            # On the gateway's socket the log is not theirs either, and they are answered as the
            # upstream's socket answers a thread it does not know: the subscribe accepted with nothing
            # replayed and nothing following, a reconnect refused for want of a run. The gateway
            # closed the socket with 4404 "Run not found", which the upstream never says there.
            answers = [await _stranger_on_the_socket(stranger, url, tid, whole[-1]["seq"])
                       for url in (upstream.url, gw.url)]
            assert answers[1] == answers[0], answers
            assert answers[0][0]["type"] == "success" and answers[0][1]["error"] == "no_such_run", answers
        # A new run on the thread the upstream lost: the gateway cannot prove nothing went missing
        # in between, so it says so (in the protocol's shape) before the new run's events.
        await run_start(http, gw.url, tid, n=3, delay=0.02)
        after = await read_session(http, gw.url, tid, since=whole[-1]["seq"], runs=1)
        assert after[0]["type"] == "error" and after[0]["error"] == "resume_gap" and after[0]["id"] is None
        assert is_end(after[-1]) and all(e["seq"] > whole[-1]["seq"] for e in after)
    finally:
        await asyncio.to_thread(upstream.stop)


async def _stranger_on_the_socket(http: aiohttp.ClientSession, url: str, tid: str,
                                  since: int) -> list[dict[str, Any]]:
    """A client that is not the captor subscribes, reconnects and unsubscribes on ``url``'s session
    socket: the answers (subscription ids as one), nothing else coming within a second after each."""
    answers: list[dict[str, Any]] = []
    async with http.ws_connect(f"{url}/threads/{tid}/stream/events",
                               headers={"Authorization": "Bearer someone-else"}) as ws:
        for command in ({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL}},
                        {"id": 2, "method": "subscription.reconnect", "params": {"channels": ALL, "since": since}},
                        {"id": 3, "method": "subscription.unsubscribe", "params": {}}):
            if command["id"] == 3:
                command["params"] = {"subscription_id": answers[0].get("result", {}).get("subscription_id")}
            await ws.send_json(command)
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            answers.append(orjson.loads(msg.data))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.receive(), 1.0)
    if isinstance(answers[0].get("result"), dict):
        answers[0]["result"]["subscription_id"] = "<id>"
    return answers


async def test_an_upstream_lost_for_good_is_said_in_the_protocols_shape_and_the_client_is_cut(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    upstream = await asyncio.to_thread(LangGraphServer().start)
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [upstream.url]}},
                                               streams={"reattach_backoff": "100ms", "reattach_attempts": 2}))
        tid = await new_thread(http, gw.url)
        await run_start(http, gw.url, tid, n=100, delay=0.05)
        got: list[dict[str, Any]] = []
        ws = await http.ws_connect(f"{gw.url}/threads/{tid}/stream/events")
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL}})
        async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, never a clean end the SDK would take for done
                async for _name, data, _id in frames(r):
                    got.append(data)
                    if len(got) == 10:
                        await asyncio.to_thread(upstream.kill)
        last = got[-1]
        assert last["type"] == "error" and last["id"] is None and last["error"] == "capture_interrupted", last
        assert_seqs_grow(got)
        on_socket = []  # the same over the WebSocket, then a close that tells the client to reconnect
        async for msg in ws:
            doc = orjson.loads(msg.data)
            if doc.get("id") != 1:
                on_socket.append(doc)
        assert on_socket == got and ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR
        # While the upstream is down a reconnect is refused as the upstream's failure (the SDK retries) ...
        async with http.post(f"{gw.url}/threads/{tid}/stream/events",
                             json={"channels": ALL, "since": got[4]["seq"]}) as r:
            assert r.status == 502 and "unreachable" in (await r.json())["detail"]
        # ... and once it is back (without the thread), answered from the log, then live again.
        await asyncio.to_thread(upstream.restart_empty)
        again = await read_session(http, gw.url, tid, since=got[4]["seq"], count=len(got) - 5)
        assert again == got[5:]
    finally:
        await asyncio.to_thread(upstream.stop)


async def test_a_subscribe_the_gateway_refuses_closes_the_socket_with_4000_plus_the_status(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Over SSE a session the gateway cannot serve is refused with its status (502: the upstream is
    unreachable). On the WebSocket the refusal was an ``unknown_error`` answer and the socket stayed
    open with no subscription: the Python SDK takes any answer to its subscribe as its start and
    waits for events forever. Both SDKs read a close with 4000 plus the status as a refused stream
    (a 5xx reconnected with backoff, a 4xx ended): the socket is closed so, with the detail."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [f"http://127.0.0.1:{free_port()}"]}}))
    tid = str(uuid.uuid4())
    async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
        assert r.status == 502 and "unreachable" in (await r.json())["detail"]
    async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL}})
        msg = await asyncio.wait_for(ws.receive(), 30)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4502, msg
    assert "unreachable" in (msg.extra or "") and len((msg.extra or "").encode()) <= 123, msg


async def test_a_command_the_upstream_refuses_with_a_status_is_answered_with_the_commands_id(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """A command on the session socket goes to the upstream's ``POST /commands``. An answer there
    that is no protocol answer (a 403 ``{"detail": ...}`` from the upstream's auth, any status's
    JSON) was sent on the socket as it was: no ``id``, so the SDK's command waited for its answer
    forever. It is answered as an error with the command's id, the status and detail in its words."""
    tid = str(uuid.uuid4())
    async with http.ws_connect(f"{gateway.url}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 6, "method": "agent.getTree", "params": {}})
        _, reply = await asyncio.wait_for(ws_until_reply(ws, 6), 10)
        assert reply == {"type": "success", "id": 6, "result": {}}, "a protocol answer goes back as it is"
    async with http.ws_connect(f"{gateway.url}/threads/{tid}/stream/events",
                               headers={"Authorization": "Bearer forbidden"}) as ws:
        await ws.send_json({"id": 7, "method": "agent.getTree", "params": {}})
        doc = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
    assert doc["type"] == "error" and doc["id"] == 7, doc
    assert "403" in doc["message"] and "Forbidden" in doc["message"], doc


async def test_a_command_on_the_socket_counts_against_the_budget_for_forwards(
        make_gateway: MakeGateway, fake_upstream: Any, tmp_path: Path) -> None:
    """A command on the session socket is the client's ``POST /commands``, sent for it: over HTTP it
    counts against the upstream's ``max_connections``. On the socket it took a slot of the budget for
    the gateway's own short checks (64, whatever the operator set): ``max_connections`` did not bound
    it, and commands could starve the access checks. With the budget for forwards spent, it is
    refused as the same command over HTTP is (pool full), in the protocol's shape."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_connections": 1, "pool_timeout": "300ms"}}))
    tid = str(uuid.uuid4())
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/big", params={"size": str(256 << 20)}) as held:  # unread: holds the slot
            assert held.status == 200
            async with http.post(f"{gw.url}/threads/{tid}/commands", json={"id": 1, "method": "agent.getTree"}) as r:
                assert r.status == 503 and "full" in (await r.json())["detail"]
            async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:
                await ws.send_json({"id": 2, "method": "agent.getTree", "params": {}})
                _, reply = await asyncio.wait_for(ws_until_reply(ws, 2), 10)
            assert reply["type"] == "error" and "full" in reply["message"], reply
            held.close()
        async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:  # the slot back: answered
            for cid in range(3, 53):  # once the gateway saw the download's client go
                await ws.send_json({"id": cid, "method": "agent.getTree", "params": {}})
                _, reply = await asyncio.wait_for(ws_until_reply(ws, cid), 10)
                if reply["type"] == "success":
                    break
        assert reply == {"type": "success", "id": cid, "result": {}}, reply


async def test_a_socket_whose_read_of_the_log_failed_is_closed_so_the_client_resumes(
        own_redis: RedisServer, make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """A subscription whose read of the log failed (Redis down for a moment, under an idle socket)
    died, and its socket stayed open: the client heard nothing more, ever, though the thread's next
    run was in the log. As over SSE, where such a client is cut, the socket is closed with 1011 and
    the client resumes with since."""
    raw = gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}}, streams={"heartbeat": "300ms"})
    raw["storage"] = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "s", "lease_ttl": "10s"}
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw.url)
    ws = await http.ws_connect(f"{gw.url}/threads/{tid}/stream/events")
    got: list[dict[str, Any]] = []

    async def read() -> None:  # reads all along, so the socket's pings are answered
        async for msg in ws:
            got.append(orjson.loads(msg.data))

    reader = asyncio.create_task(read())
    try:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ["lifecycle"]}})
        await run_start(http, gw.url, tid, n=2, delay=0.01)
        for _ in range(500):
            if sum(1 for e in got if is_end(e)) == 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(1.0)  # an idle follower looks at the log every heartbeat
        await asyncio.to_thread(own_redis.start)
        await run_start(http, gw.url, tid, n=2, delay=0.01)
        ended, _ = await asyncio.wait([reader], timeout=30)
        assert ended, f"the socket stayed open, and silent: {got}"
        assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR, (ws.close_code, got)
    finally:
        await ws.close()
        await asyncio.gather(reader, return_exceptions=True)
    events = [e for e in got if e.get("type") == "event"]
    async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as again:
        await again.send_json({"id": 1, "method": "subscription.subscribe",
                               "params": {"channels": ["lifecycle"], "since": events[-1]["seq"]}})
        rest: list[dict[str, Any]] = []
        while not rest or not is_end(rest[-1]):
            doc = orjson.loads((await asyncio.wait_for(again.receive(), 30)).data)
            if doc.get("type") == "event":
                rest.append(doc)
    assert [e["params"]["data"]["event"] for e in events + rest] == ["running", "completed"] * 2


async def test_a_subscribe_while_the_log_is_down_closes_the_socket_so_the_client_retries(
        own_redis: RedisServer, make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """Over SSE a subscription while the log is down is refused with 503 (event log unavailable).
    On the WebSocket the error escaped the handler: the connection was dropped without a close
    frame (1006) and logged with a traceback. It is closed with 1011 and the reason, so the SDK
    reconnects."""
    raw = gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}})
    raw["storage"] = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "s", "lease_ttl": "10s"}
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw.url)
    await asyncio.to_thread(own_redis.stop)
    try:
        async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
            assert r.status == 503 and "event log unavailable" in (await r.json())["detail"]
        async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:
            await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL}})
            msg = await asyncio.wait_for(ws.receive(), 30)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR,
                                                   "event log unavailable"), msg
    finally:
        await asyncio.to_thread(own_redis.start)


async def test_a_leg_cut_mid_run_before_any_live_only_event_is_marked(
        make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # The capture's leg is reset after the run began and before its first custom event (which the
    # upstream publishes live only): those produced while the gateway re-joins are gone, and the
    # upstream's replay, which re-sends everything held, cannot say so. The gateway must.
    relay = await CutRelay(langgraph_server.url, b"/stream/events", before=b'"method":"custom"').start()
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [relay.url]}},
                                               streams={"reattach_backoff": "500ms"}))
        tid = await new_thread(http, gw.url)
        reader = asyncio.create_task(read_session(http, gw.url, tid))
        for _ in range(100):  # the capture is open on the idle thread before the run starts
            if gw.gw.hub.live(f"default/session/{tid}") is not None:
                break
            await asyncio.sleep(0.02)
        await run_start(http, gw.url, tid, n=30, delay=0.05)
        got = await asyncio.wait_for(reader, 60)
        assert relay.cuts == 1 and is_end(got[-1])
        assert_seqs_grow(got)
        extra = assert_every_stored_event_once(got, await read_session(http, langgraph_server.url, tid))
        ticks = [e["params"]["data"]["i"] for e in extra if e.get("method") == "custom" and "i" in e["params"]["data"]]
        assert ticks != list(range(30)), "some ticks were produced while the leg was down"
        markers = [e for e in extra if e.get("type") == "error"]
        assert [m["error"] for m in markers] == ["resume_gap"], "the loss is said, once"
        assert got.index(markers[0]) < got.index(next(e for e in extra if e.get("method") == "custom")), \
            "before what the re-join appends"
        counted = await by_label(http, gw.admin_url, "gateway_gap_markers_total", "reason")  # counted once
        assert counted == {"no_upstream_ids": 0.0, "replay_mismatch": 1.0, "empty_rejoin": 0.0}
    finally:
        await relay.stop()


async def test_a_session_resumed_with_since_is_counted_as_a_resume(lg_gateway: RunningGateway,
                                                                   http: aiohttp.ClientSession) -> None:
    # gateway_resumes_total counted run and thread resumes only: a session's since (the SDK's
    # reconnect) said not-held or truncated to the client but moved no metric and no access field.
    tid = await new_thread(http, lg_gateway.url)
    await run_start(http, lg_gateway.url, tid, n=3, delay=0.01)
    got = await read_session(http, lg_gateway.url, tid)
    before = await by_label(http, lg_gateway.admin_url, "gateway_resumes_total", "outcome")
    await read_session(http, lg_gateway.url, tid, since=got[1]["seq"])
    await read_session(http, lg_gateway.url, tid, since=1)  # no id of this capture's
    await read_session(http, lg_gateway.url, tid)  # no since: a new session, not a resume
    after = await by_label(http, lg_gateway.admin_url, "gateway_resumes_total", "outcome")
    assert {k: after[k] - before[k] for k in after} == {"hit": 1.0, "not_held": 1.0, "truncated": 0.0}


async def test_the_gateway_killed_twice_mid_run_loses_and_repeats_nothing(
        gateway_process: Any, langgraph_server: LangGraphServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    args = ("--upstream", langgraph_server.url, "--data-dir", str(tmp_path / "data"))
    gw: GatewayProcess = gateway_process(*args).start()
    tid = await new_thread(http, gw.url)
    await run_start(http, gw.url, tid, n=30, delay=0.05)
    got = await read_session(http, gw.url, tid, limit=10)
    for _ in range(2):
        gw.kill()  # SIGKILL mid-run
        restarted: GatewayProcess = gateway_process(*args)
        restarted.port = gw.port
        gw = restarted.start()
        got += await read_session(http, gw.url, tid, since=got[-1]["seq"], limit=len(got) + 10 - len(got))
    got += await read_session(http, gw.url, tid, since=got[-1]["seq"])
    assert is_end(got[-1])
    assert_seqs_grow(got)
    extra = assert_every_stored_event_once(got, await read_session(http, langgraph_server.url, tid))
    # The ticker's custom:ticks events are published live only: those produced while no gateway was
    # connected are gone, and each re-join mid-run says so before what it appends.
    markers = [e for e in extra if e.get("type") == "error"]
    assert len(markers) == 2 and all(m["error"] == "resume_gap" for m in markers)


async def test_sigterm_closes_a_session_socket_with_no_subscription_so_the_sdk_reconnects(
        gateway_process: Any, langgraph_server: LangGraphServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # A socket with a subscription is closed by its cut follower; one with none (opened, commands
    # only, or between subscriptions) was left to aiohttp's shutdown: held for the grace twice, then
    # dropped without a close frame, and the gateway was slow to stop.
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"upstreams:\n  default:\n    urls: [{langgraph_server.url}]\n"
                   f"storage:\n  path: {tmp_path / 'data'}\nshutdown_grace: 1s\n")
    gw: GatewayProcess = gateway_process("--config", str(cfg)).start()
    tid = await new_thread(http, gw.url)
    async with http.ws_connect(f"{gw.url}/threads/{tid}/stream/events") as ws:
        stop = asyncio.get_running_loop().run_in_executor(None, gw.terminate)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR, msg
    assert await stop == 0


async def test_the_session_moves_to_another_replica_on_redis(
        make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        redis_storage: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gws = []
    for name in ("a", "b"):
        raw = gateway_config(tmp_path / name, {"default": {"urls": [langgraph_server.url]}},
                             streams={"reattach_backoff": "100ms"})
        raw["storage"] = redis_storage
        gws.append(await make_gateway(raw))
    a, b = gws
    tid = await new_thread(http, a.url)
    await run_start(http, a.url, tid, n=30, delay=0.05)
    got = await read_session(http, a.url, tid, limit=15)
    await a.server.stop()  # its capture stops; the client comes back on b
    got += await read_session(http, b.url, tid, since=got[-1]["seq"])
    assert is_end(got[-1])
    assert_seqs_grow(got)
    extra = assert_every_stored_event_once(got, await read_session(http, langgraph_server.url, tid))
    assert [e["error"] for e in extra if e.get("type") == "error"] == ["resume_gap"], "the move mid-run is said once"
    assert await read_session(http, b.url, tid) == got, "the log holds it whole, under the ids clients saw"


# --- the parts alone -----------------------------------------------------------------------------------

def _scripted(eid: str, method: str, data: str) -> tuple[str, bytes]:
    """A session event as the fake upstream sends it (``data`` is raw JSON text, sent as written)."""
    return method, (b'{"type":"event","event_id":"%s","method":"%s","params":{"namespace":[],"timestamp":1,'
                    b'"data":%s}}' % (eid.encode(), method.encode(), data.encode()))


async def _session_until(http: aiohttp.ClientSession, url: str, tid: str, last: str,
                         channels: list[str]) -> list[dict[str, Any]]:
    """A session's events (parsed as JSON allows, lone surrogates too) until the one with ``last``."""
    got: list[dict[str, Any]] = []
    async with http.post(f"{url}/threads/{tid}/stream/events", json={"channels": channels}) as r:
        assert r.status == 200, await r.text()
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
                if data:
                    got.append(json.loads(data[0]))
                    if got[-1].get("event_id") == last:
                        return got
    raise AssertionError(f"the session ended before {last}: {got}")


async def test_an_event_with_a_lone_surrogate_is_kept_filtered_and_matched_on_a_rejoin(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """A string with a lone surrogate, escaped (``"\\ud800"``) as an upstream that is not
    langgraph-api's writes it (a JS server's JSON.stringify), is valid JSON, but one orjson refuses:
    the capture took such an event for no protocol event and dropped it, silently, and a filter kept
    it for every subscription. It is stored and served as it came, filtered by its channel, and
    known by its event_id when the upstream replays it on a re-join (neither lost nor repeated)."""
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    fake_upstream.session_events[tid] = [_scripted("e1", "values", '{"n":1}'),
                                         _scripted("e2", "custom", '{"name":"x","text":"a\\ud800b"}'),
                                         _scripted("e3", "values", '{"n":3}')]
    fake_upstream.session_end_after_replay = 2  # two legs end after their replay: two re-joins
    got = await asyncio.wait_for(_session_until(http, gateway.url, tid, "e3", ALL), 20)
    assert [e.get("event_id") for e in got] == ["e1", "e2", "e3"], got
    assert got[1]["params"]["data"]["text"] == "a\ud800b"
    values = await asyncio.wait_for(_session_until(http, gateway.url, tid, "e3", ["values"]), 20)
    assert [e.get("event_id") for e in values] == ["e1", "e3"], values
    deadline = time.monotonic() + 20  # the third leg opens once the second one's replay is settled
    while fake_upstream.session_legs < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fake_upstream.session_legs >= 3
    held = await gateway.gw.log.lookup(f"default/session/{tid}")
    assert held is not None and held.count == 3, "each event once, and no gap marker: the replays matched"


async def test_legs_the_upstream_ends_cleanly_after_new_events_never_use_up_the_rejoins(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """An upstream closes a session's connection cleanly now and then (a rolling deploy, a proxy that
    recycles long connections). A leg that broke after delivering events starts the re-join budget
    over; one that ended cleanly after delivering them did not, so closes spread over the life of a
    thread added up, and past ``reattach_attempts`` the capture was given up (capture_interrupted,
    its clients cut) though every leg had worked. Only closes in a row with nothing new count."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "20ms", "reattach_attempts": 2}))
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    script = fake_upstream.session_events[tid] = [_scripted("e0", "values", '{"n":0}')]
    got: list[dict[str, Any]] = []
    async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
        stream = frames(r)

        async def until(eid: str) -> None:
            async for _name, data, _id in stream:
                got.append(data)
                if data.get("event_id") == eid or data.get("type") == "error":
                    return

        await asyncio.wait_for(until("e0"), 20)
        for i in range(1, 6):
            legs = fake_upstream.session_legs
            fake_upstream.session_drops += 1  # a clean end of the capture's connection ...
            deadline = time.monotonic() + 20
            while fake_upstream.session_legs == legs and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            script.append(_scripted(f"e{i}", "values", f'{{"n":{i}}}'))  # ... and a new event on the next
            await asyncio.wait_for(until(f"e{i}"), 20)
    assert [e.get("event_id") or e.get("error") for e in got] == [f"e{i}" for i in range(6)], got


async def test_an_upstream_that_fails_every_replay_with_an_error_event_is_given_up_and_said(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """langgraph-api ends a session's stream with an error event (no event_id) when its producer
    raises, and one that raises on an event of the thread's history does so on every connection,
    after the same replay. The error is kept, but it is nothing of the thread's history: a leg that
    brought only it made no progress. Counted as progress, every leg started the re-join budget
    over, and the capture re-joined forever, one more error in the log each time, where a run of
    legs that bring nothing new is given up and said (capture_interrupted)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "20ms", "reattach_attempts": 2}))
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    fake_upstream.session_events[tid] = [_scripted("e1", "values", '{"n":1}')]
    fake_upstream.session_failure[tid] = b'event: error\r\ndata: {"error":"ValueError","message":"boom"}\r\n\r\n'
    got: list[dict[str, Any]] = []

    async def until_interrupted() -> None:
        async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
            async for _name, data, _id in frames(r):
                got.append(data)
                if data.get("error") == "capture_interrupted" or len(got) > 50:
                    return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(until_interrupted(), 15)
    names = [e.get("event_id") or e.get("error") for e in got]
    assert names[0] == "e1" and names[-1] == "capture_interrupted", names
    assert 1 <= names.count("ValueError") <= 4, names


async def test_a_session_reconnected_with_last_event_id_gets_only_what_it_missed(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """The gateway cuts a session's SSE stream when it cannot go on, and every frame carries its seq
    on the ``id:`` line. A client of plain SSE (fetch-event-source and the like) reconnects as SSE
    says: the same request, with ``Last-Event-ID``. The gateway read only the body's since and sent
    it everything from the start again. The later of the two is where it resumes; an id that is no
    gateway id is ignored, as the upstream ignores the header."""
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    fake_upstream.session_events[tid] = [_scripted(f"e{i}", "values", str(i)) for i in range(1, 5)]
    got = await asyncio.wait_for(read_session(http, gateway.url, tid, count=4), 20)
    for body, header, want in [({}, str(got[1]["seq"]), ["e3", "e4"]),
                               ({"since": got[0]["seq"]}, str(got[2]["seq"]), ["e4"]),
                               ({"since": got[2]["seq"]}, str(got[0]["seq"]), ["e4"]),
                               ({}, "not-an-id", ["e1", "e2", "e3", "e4"])]:
        seen: list[dict[str, Any]] = []
        async with http.post(f"{gateway.url}/threads/{tid}/stream/events", json={"channels": ALL, **body},
                             headers={"Last-Event-ID": header}) as r:
            assert r.status == 200, await r.text()
            async for _name, data, _id in frames(r):
                seen.append(data)
                if data.get("event_id") == "e4":
                    break
        assert [e.get("event_id") for e in seen] == want, (body, header, seen)


async def test_an_event_whose_json_spans_several_data_lines_is_kept(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """SSE joins an event's ``data:`` lines with a line feed, and an upstream whose SSE library splits
    data at its line breaks (pretty-printed JSON) sends one event's JSON over several. The capture
    read the first line on as JSON with the next ``data:`` in it, took the event for no protocol
    event, and dropped it without a word. It is kept, as one event."""
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    e1, e3 = _scripted("e1", "values", '{"n":1}'), _scripted("e3", "values", '{"n":3}')
    fake_upstream.session_events[tid] = [
        e1, ("values", b'{"type":"event",\r\ndata:   "event_id": "e2",\r\ndata: "method":"values",'
                       b'"params":{"namespace":[],"timestamp":1,"data":{"n":\r\ndata: 2}}}'), e3]
    got = await asyncio.wait_for(_session_until(http, gateway.url, tid, "e3", ALL), 20)
    assert [e.get("event_id") for e in got] == ["e1", "e2", "e3"], got
    assert got[1]["params"]["data"] == {"n": 2}


async def test_an_event_without_an_event_id_is_kept_and_one_that_is_no_json_object_is_said(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """langgraph-api's SSE layer ends a stream whose producer raised with ``event: error`` and the
    exception as JSON: no ``event_id``, no ``seq``. An upstream may send data that is no JSON object
    too. The capture took both for no protocol event and dropped them without a word: a client of
    the gateway never saw the error a client of the upstream sees. The first is kept (stored, sent
    to every subscription, with a seq); the second, which the SDKs cannot read (the WebSocket
    transport fails on it), is said in its place as an unsolicited error holding what came."""
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    fake_upstream.session_events[tid] = [
        _scripted("e1", "values", '{"n":1}'),
        b'event: error\r\ndata: {"error":"ValueError","message":"boom"}\r\n\r\n',
        _scripted("e2", "values", '{"n":2}'),
        b"event: values\r\ndata: not json\r\n\r\n",
        b"event: values\r\ndata: [1,2]\r\n\r\n",
        _scripted("e3", "values", '{"n":3}')]
    for channels in (ALL, ["values"]):
        got = await asyncio.wait_for(read_session(http, gateway.url, tid, channels=channels, count=6), 20)
        assert [e.get("event_id") or e.get("error") for e in got] == [
            "e1", "ValueError", "e2", "malformed_event", "malformed_event", "e3"], got
        assert_seqs_grow(got)
        assert got[1] == {"seq": got[1]["seq"], "error": "ValueError", "message": "boom"}
        assert [(e["type"], e["id"], e["data"]) for e in got[3:5]] == [("error", None, "not json"),
                                                                      ("error", None, "[1,2]")]
    async with http.ws_connect(f"{gateway.url.replace('http', 'ws')}/threads/{tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ["values"]}})
        on_socket = [await asyncio.wait_for(ws.receive_json(), 20) for _ in range(7)]
    assert [e.get("event_id") or e.get("error") for e in on_socket if e.get("id") != 1] == [
        "e1", "ValueError", "e2", "malformed_event", "malformed_event", "e3"], on_socket


@pytest.mark.parametrize("restarted", [False, True])
@pytest.mark.parametrize("backend", ["lmdb", "redis"])
async def test_a_session_trimmed_by_retention_takes_a_rejoin_without_repeating_what_it_trimmed(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, request: pytest.FixtureRequest, backend: str, restarted: bool) -> None:
    """Retention trims a session's oldest batches, and the upstream replays the whole thread on
    every connection. A re-joined capture tells what it holds by event_id, which the trimmed events
    no longer are: the upstream's replay of them is appended again, new seqs for events clients had
    been sent, and a gap marker before them. A client resuming at the head should get what comes next.
    An upstream that started over (its history is not the trimmed one's) is still said as a gap."""
    storage = {"retention": "1s"} | (request.getfixturevalue("redis_storage") if backend == "redis" else {})
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           storage=storage, streams={"reattach_backoff": "50ms"}))
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    script = fake_upstream.session_events[tid] = [_scripted("e1", "values", '{"n":1}'),
                                                  _scripted("e2", "values", '{"n":2}')]
    # the upstream lost the thread's history and has a new event: nothing of it is held
    restart: list[tuple[str, bytes] | bytes] | None = [_scripted("n1", "values", '{"n":11}')] if restarted else None
    got = await _rejoined_after_a_trim(gw, fake_upstream, http, tid, script, restart)
    want = ["resume_gap", "n1", "e4"] if restarted else ["e4"]
    assert [e.get("event_id") or e.get("error") for e in got] == want, got


async def _rejoined_after_a_trim(gw: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession,
                                 tid: str, script: list[tuple[str, bytes] | bytes],
                                 restart: list[tuple[str, bytes] | bytes] | None) -> list[dict[str, Any]]:
    """``script`` (ending with e2) sent and older than the retention (1 s), e3 after it, then the sweep
    trims all but e3; the upstream drops the capture's connection (its history ``restart`` now, if
    given) and sends e4 once the capture re-joined. What a client resuming at e3 gets, up to e4."""
    await asyncio.wait_for(_session_until(http, gw.url, tid, "e2", ALL), 20)
    await asyncio.sleep(1.2)  # what came so far older than the retention
    script.append(_scripted("e3", "values", '{"n":3}'))
    head = (await asyncio.wait_for(_session_until(http, gw.url, tid, "e3", ALL), 20))[-1]["seq"]
    await gw.gw.log.sweep()
    held = await gw.gw.log.lookup(f"default/session/{tid}")
    assert held is not None and held.first_seq == head, "all but e3 trimmed, e3 held"
    legs = fake_upstream.session_legs
    if restart is not None:
        script[:] = restart
    fake_upstream.session_drops += 1  # the upstream drops the capture's connection: it re-joins
    deadline = time.monotonic() + 20
    while fake_upstream.session_legs == legs and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    script.append(_scripted("e4", "values", '{"n":4}'))
    got: list[dict[str, Any]] = []
    async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL, "since": head}) as r:
        async for _name, data, _id in frames(r):
            got.append(data)
            if data.get("event_id") == "e4" or len(got) > 5:
                break
    return got


async def test_a_kept_event_without_an_event_id_among_what_retention_trimmed_repeats_nothing_on_a_rejoin(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """Retention keeps the event_ids of the first and last upstream events it trimmed from a session,
    so that a re-join drops the upstream's replay of them. An upstream event kept without an event_id
    (langgraph-api's error event, never replayed) was recorded with no upstream id, as the gateway's
    gap marker is, which begins that run anew: the replay then did not begin with the first trimmed
    event, was taken for an upstream that started over, and the trimmed events were stored again
    after a resume_gap."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           storage={"retention": "1s"}, streams={"reattach_backoff": "50ms"}))
    tid = str(uuid.uuid4())
    fake_upstream.threads.add(tid)
    script = fake_upstream.session_events[tid] = [
        _scripted("e1", "values", '{"n":1}'), b'event: error\r\ndata: {"error":"ValueError","message":"boom"}\r\n\r\n',
        _scripted("e2", "values", '{"n":2}')]
    got = await _rejoined_after_a_trim(gw, fake_upstream, http, tid, script, None)  # e1, the error, e2 trimmed
    assert [e.get("event_id") or e.get("error") for e in got] == ["e4"], got


async def test_a_trimmed_session_rejoins_the_real_server_without_storing_its_replay_again(
        make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # The real server replays the whole thread on every connection, its first run too, which
    # retention trimmed: a re-join (the capture's leg reset mid-run of the third) must not store it
    # again. The live-only ticks lost while re-joining are still said, once.
    relay = await CutRelay(langgraph_server.url, b"/stream/events", before=b'"i":5').start()
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [relay.url]}},
                                               storage={"retention": "1s"}, streams={"reattach_backoff": "50ms"}))
        tid = await new_thread(http, gw.url)
        await run_start(http, gw.url, tid, n=3, delay=0.01)
        first = await asyncio.wait_for(read_session(http, gw.url, tid), 60)
        await asyncio.sleep(1.2)  # the first run older than the retention
        await run_start(http, gw.url, tid, n=3, delay=0.01)
        second = await asyncio.wait_for(read_session(http, gw.url, tid, since=first[-1]["seq"]), 60)
        await gw.gw.log.sweep()
        held = await gw.gw.log.lookup(f"default/session/{tid}")
        assert held is not None and held.first_seq > first[-1]["seq"] and held.trimmed_to == first[-1]["event_id"]
        await run_start(http, gw.url, tid, n=8, delay=0.05)
        third = await asyncio.wait_for(read_session(http, gw.url, tid, since=second[-1]["seq"]), 60)
        assert relay.cuts == 1 and is_end(third[-1])
        assert not set(ids(third)) & set(ids(first + second)), "nothing of the earlier runs again"
        assert [e["error"] for e in third if e.get("type") == "error"] == ["resume_gap"]
    finally:
        await relay.stop()


@pytest.mark.parametrize("replay, want", [
    (["e1", "e2", "e3", "e4"], ["e4"]),  # the replay of what was trimmed, then the held, then new
    (["e1", "x", "y", "e3", "e4"], ["resume_gap", "y", "e4"]),  # begun so, gone elsewhere: more than was trimmed
    (["e1", "e3", "e4"], ["resume_gap", "e4"]),  # a held event before the last trimmed one
    (["n1", "e3", "e4"], ["resume_gap", "n1", "e4"]),  # a history that begins otherwise
])
def test_a_seam_drops_the_replay_of_what_retention_trimmed_and_says_any_other(replay: list[str],
                                                                              want: list[str]) -> None:
    seam = sessions.SessionSeam({"e3"}, ["e3"], after=7, trimmed=("e1", "e2"), bound=2)
    out = seam.filter([(b"event: values\ndata: " + _scripted(eid, "values", "1")[1] + b"\n", None)
                       for eid in replay])
    got = [sessions.event_id(body) or orjson.loads(body[body.index(b"data: ") + 6:])["error"] for body, _ in out]
    assert got == want


def test_the_filter_agrees_with_the_servers_own_rule() -> None:
    rng = random.Random(5)
    names = ["child", "child:1", "child:2", "grand", "grand:9", "x:y"]
    channel_sets = [["values"], ["custom"], ["custom:ticks"], ["custom:other", "lifecycle"], ALL, ["input"]]
    for _ in range(3000):
        ns = [rng.choice(names) for _ in range(rng.randrange(0, 4))]
        method = rng.choice(["values", "custom", "lifecycle", "input.requested", "updates", "messages"])
        data: Any = {"name": rng.choice(["ticks", "other", None])} if method == "custom" else {}
        event = {"type": "event", "event_id": "1-0", "method": method,
                 "params": {"namespace": ns, "timestamp": 1, "data": data}}
        channels = rng.choice(channel_sets)
        prefixes = [[rng.choice(names) for _ in range(rng.randrange(0, 3))] for _ in range(rng.randrange(0, 3))]
        depth = rng.choice([None, 0, 1, 2])
        flt = sessions.parse_filter({"channels": channels, "namespaces": prefixes or None, "depth": depth})
        assert flt.matches(event) == _servers_rule(event, set(channels), prefixes or None, depth), (event, flt)
        body, _eid = sessions.stored(b"event: " + method.encode() + b"\ndata: " + orjson.dumps(event) + b"\n")
        assert flt.keep(body) == flt.matches(event)


def _server_namespaces() -> Any:
    """The server's own namespace module (it imports nothing; its package would need a server config)."""
    import importlib.util

    import langgraph_sdk

    path = Path(langgraph_sdk.__file__).parents[1] / "langgraph_api" / "event_streaming" / "namespace.py"
    spec = importlib.util.spec_from_file_location("server_namespace", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _servers_rule(event: dict[str, Any], channels: set[str], namespaces: list[list[str]] | None,
                  depth: int | None) -> bool:
    """The server's ``_matches_subscription`` as it reads (langgraph-api 0.16.7), on its prefix rule."""
    is_prefix_match = _server_namespaces().is_prefix_match
    method = event["method"]
    channel = "input" if method == "input.requested" else method
    if channel == "custom":
        name = event["params"]["data"].get("name")
        if not ("custom" in channels or (name is not None and f"custom:{name}" in channels)):
            return False
    elif channel not in channels:
        return False
    if not namespaces:
        return True
    ns = event["params"]["namespace"]
    return any(is_prefix_match(ns, p) and (depth is None or len(ns) - len(p) <= depth) for p in namespaces)


def test_a_subscription_the_upstream_would_refuse_is_refused_in_its_words() -> None:
    for doc, word in [({}, "channels is required"), ({"channels": []}, "channels is required"),
                      ({"channels": ["values", "bogus", 3]}, "unsupported entries: bogus, 3."),
                      ({"channels": ["custom:"]}, "unsupported entries: custom:.")]:
        with pytest.raises(sessions.BadFilter, match=word):
            sessions.parse_filter(doc)
    assert [sessions.parse_since({"since": s}) for s in (5, 0, -1, "3", True, 2.5, None)] == [5, 0, None, None, None, None,
                                                                                              None]


def _event(eid: str, method: str = "values") -> tuple[bytes, str | None]:
    doc = {"type": "event", "event_id": eid, "seq": 7, "method": method, "params": {"namespace": [], "data": {}}}
    return (b"event: " + method.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n", "7")


def test_the_seam_drops_what_is_held_and_proves_or_marks_continuity() -> None:
    replay = [_event("a"), _event("b"), _event("c"), _event("d")]
    exact = sessions.SessionSeam({"a", "b"}, ["a", "b"], after=100)
    assert [e[1] for e in exact.filter(replay)] == ["c", "d"], "held events dropped, no marker: the run was re-sent"
    lost = sessions.SessionSeam({"a", "b", "x"}, ["b", "x"], after=100)  # x: live only, or lost
    out = lost.filter(replay)
    assert out[0][0].startswith(b"event: error\n") and [e[1] for e in out[1:]] == ["c", "d"]
    assert lost.gap == "replay_mismatch" and exact.gap is None
    assert b'"since":100' in out[0][0]
    running = _event("r", "lifecycle")
    doc = orjson.loads(running[0].split(b"data: ", 1)[1])
    doc["params"] = {"namespace": [], "data": {"event": "running"}}
    bodies = [_event("old")[0], b"event: lifecycle\ndata: " + orjson.dumps(doc) + b"\n", _event("new")[0]]
    assert sessions.latest_run(bodies) == (["r", "new"], False), "what a re-join must see again: the latest run"
    doc["params"]["data"]["event"] = "completed"
    assert sessions.latest_run([*bodies, b"event: lifecycle\ndata: " + orjson.dumps({**doc, "event_id": "end"}) + b"\n"]
                               ) == (["r", "new", "end"], True)
    going = sessions.SessionSeam({"a", "b"}, ["a", "b"], after=100, ended=False)  # a run went on meanwhile
    out = going.filter(replay)
    assert out[0][0].startswith(b"event: error\n") and [e[1] for e in out[1:]] == ["c", "d"]
    first = sessions.SessionSeam(set(), [], after=0)
    assert [e[1] for e in first.filter(replay)] == ["a", "b", "c", "d"], "a first capture takes everything"
    stored, eid = sessions.stored(replay[0][0])
    assert b'"seq"' not in stored and eid == "a"
    assert sessions.wire(42, stored).startswith(b'{"seq":42,"type":"event"')


async def test_a_session_resumed_with_since_on_a_thread_the_gateway_never_captured_counts_as_not_held(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """A since is a resume, as a run's Last-Event-ID is: one the log holds nothing for (a gateway
    put in front of a thread whose session the client read upstream before, a log moved aside) is
    served from the start and counted ``not_held``, over SSE and over the WebSocket alike, as a
    run stream not held is. It moved no metric at all: a resume that finds nothing held was
    invisible to gateway_resumes_total."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    sse_tid, ws_tid = str(uuid.uuid4()), str(uuid.uuid4())
    for tid in (sse_tid, ws_tid):
        fake_upstream.threads.add(tid)
        fake_upstream.session_events[tid] = [_scripted("e1", "values", '{"n":1}')]
    before = await by_label(http, gw.admin_url, "gateway_resumes_total", "outcome")
    got = await asyncio.wait_for(read_session(http, gw.url, sse_tid, since=7, count=1), 20)
    assert [e.get("event_id") for e in got] == ["e1"], "served from the start"
    async with http.ws_connect(f"{gw.url.replace('http', 'ws')}/threads/{ws_tid}/stream/events") as ws:
        await ws.send_json({"id": 1, "method": "subscription.subscribe", "params": {"channels": ALL, "since": 7}})
        replies = [await asyncio.wait_for(ws.receive_json(), 20) for _ in range(2)]
    assert any(r.get("type") == "success" and r.get("id") == 1 for r in replies), replies
    after = await by_label(http, gw.admin_url, "gateway_resumes_total", "outcome")
    assert {k: after[k] - before[k] for k in after} == {"hit": 0.0, "not_held": 2.0, "truncated": 0.0}


def test_an_event_that_is_empty_once_its_seq_is_taken_out_is_sent_as_json() -> None:
    """An event kept without an event_id may hold nothing but the upstream's ``seq`` (``{"seq":3}``,
    or ``{}``): stored as ``{}``, it was sent as ``{"seq":5,}``, which no JSON reader takes (the SDK's
    WebSocket transport ends the session on it)."""
    for data in (b'{"seq": 3}', b"{}"):
        body, eid = sessions.stored(b"event: error\ndata: " + data + b"\n")
        assert eid is None
        assert orjson.loads(sessions.wire(5, body)) == {"seq": 5}
        framed = sessions.frame([(5, body)])
        assert framed == b'event: error\ndata: {"seq":5}\nid: 5\n\n', framed


def test_an_event_without_an_event_id_is_filtered_by_its_channel_when_it_names_one() -> None:
    """An upstream event kept without an event_id goes to every subscription when no channel can be
    read from it (an error: no method); one that names its channel goes where that channel goes,
    as every other event, not to a subscription that asked for other channels."""
    lifecycle = sessions.parse_filter({"channels": ["lifecycle"]})
    values = {"type": "event", "method": "values", "params": {"namespace": [], "data": {}}}
    body, eid = sessions.stored(b"event: values\ndata: " + orjson.dumps(values) + b"\n")
    assert eid is None and not lifecycle.keep(body)
    assert sessions.parse_filter({"channels": ["values"]}).keep(body)
    for raw in (b'event: error\ndata: {"error":"ValueError","message":"boom"}\n', b'event: message\ndata: {"a":1}\n',
                b"event: values\ndata: not json\n"):
        assert lifecycle.keep(sessions.stored(raw)[0]), raw
