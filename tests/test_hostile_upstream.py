"""Upstreams that answer event streams in ways the Agent Server itself does not, but the paths to it
and other servers do: what a client reading the upstream directly would get is what the gateway
stores and serves, and what it cannot capture it says."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run
from tests.support.sse import read_events

MakeGateway = Callable[..., Awaitable[RunningGateway]]


class Scripted:
    """An upstream whose run stream is the bytes a test scripts, each item one write (so one read at
    the gateway, on loopback); the run then ends with the body (``end``), or the connection is reset.
    It knows the run (a status check says so) but cannot replay it: a re-join gets its 404."""

    def __init__(self) -> None:
        self.tid, self.rid = str(uuid.uuid4()), str(uuid.uuid4())
        self.writes: list[bytes] = []
        self.end = True
        self.joins = 0
        self.asked_from: list[bytes] = []  # the Last-Event-ID of each re-join, as the bytes received
        self.url = ""
        self._runner: web.AppRunner | None = None

    def metadata(self) -> bytes:
        return b'event: metadata\r\ndata: {"run_id":"%s","attempt":1}\r\n\r\n' % self.rid.encode()

    async def start(self) -> Scripted:
        app = web.Application()
        app.router.add_get("/ok", self._ok)
        app.router.add_post("/threads/{tid}/runs/stream", self._stream)
        app.router.add_get("/threads/{tid}/runs/{rid}/stream", self._join)
        app.router.add_get("/threads/{tid}/runs/{rid}", self._run)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://127.0.0.1:%d" % self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _run(self, request: web.Request) -> web.Response:
        return web.json_response({"run_id": self.rid, "thread_id": self.tid, "status": "success"})

    async def _join(self, request: web.Request) -> web.Response:
        self.joins += 1
        self.asked_from += [v for k, v in request.raw_headers if k.lower() == b"last-event-id"]
        return web.json_response({"detail": "Run not found"}, status=404)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        base = f"/threads/{self.tid}/runs/{self.rid}"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Location": base + "/stream", "Content-Location": base})
        await resp.prepare(request)
        for data in self.writes:
            await resp.write(data)
            await asyncio.sleep(0.05)  # each write its own read
        if self.end:
            await resp.write_eof()
        elif request.transport is not None:
            request.transport.abort()
        return resp


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    up = await Scripted().start()
    yield up
    await up.stop()


def custom(i: int, pad: int = 0) -> bytes:
    return b"event: custom\r\ndata: " + orjson.dumps({"i": i, "pad": "x" * pad}) + b"\r\n\r\n"


async def run_through(make_gateway: MakeGateway, tmp_path: Path, up: Scripted, http: aiohttp.ClientSession,
                      **streams: str) -> tuple[RunningGateway, list[str], list[dict[str, object]]]:
    """The scripted run streamed through a new gateway: the events' names and data as the client read them."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [up.url]}},
                                           streams={"reattach_backoff": "100ms", **streams}))
    async with http.post(f"{gw.url}/threads/{up.tid}/runs/stream", json={"assistant_id": "a"}) as r:
        assert r.status == 200, await r.text()
        got = await asyncio.wait_for(read_events(r), 30)
    return gw, [e.event for e in got], [e.json for e in got]


@pytest.mark.parametrize("always", [False, True], ids=["when-accepted", "even-to-identity"])
async def test_an_upstream_that_gzips_event_streams_is_captured_and_served_plain(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, always: bool) -> None:
    # Clients send Accept-Encoding: gzip by default (aiohttp, httpx, browsers), and a proxy in front of
    # the agent server may compress text/event-stream. The gateway parses the legs itself and writes
    # its own framing: a leg it reads must come unencoded, and no client may be told its plain body
    # is gzip. A leg asks for identity; a proxy that gzips all the same (even-to-identity) was
    # captured as garbage (no events), and its Content-Encoding: gzip passed on over plain framing.
    fake_upstream.behaviour.gzip_streams = True
    fake_upstream.behaviour.gzip_streams_always = always
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


async def test_the_events_read_with_an_oversized_one_are_kept_before_the_stream_ends_with_its_error(
        make_gateway: MakeGateway, tmp_path: Path, scripted: Scripted, http: aiohttp.ClientSession) -> None:
    # One read: two whole events, then one over the limit. A client of the upstream had the two.
    scripted.writes = [scripted.metadata() + custom(0) + custom(1, pad=100_000)]
    gw, names, data = await run_through(make_gateway, tmp_path, scripted, http, max_event_bytes="64KiB")
    assert names == ["metadata", "custom", "error"], data
    assert data[1] == {"i": 0, "pad": ""}
    assert data[2]["error"] == "CaptureInterrupted" and "larger than" in str(data[2]["message"])
    again = await join(http, f"{gw.url}/threads/{scripted.tid}/runs/{scripted.rid}/stream", "-1")
    assert [e.event for e in again] == names
    assert scripted.joins == 0, "a broken stream is not asked again"


async def test_an_upstream_id_that_is_not_utf8_is_never_sent_back_altered(
        make_gateway: MakeGateway, tmp_path: Path, scripted: Scripted, http: aiohttp.ClientSession) -> None:
    # The upstream cuts right after an event whose id is not UTF-8. The gateway stored it decoded with
    # replacement characters and re-joined asking the upstream for an id it never sent; refused
    # instead, the stream ends with an error that says why, and the events before it are kept.
    sent = [b"1795399126916-0", b"\xff1795399126917-0"]
    scripted.writes = [scripted.metadata()[:-2] + b"id: " + sent[0] + b"\r\n\r\n",
                       custom(0)[:-2] + b"id: " + sent[1] + b"\r\n\r\n"]
    scripted.end = False
    gw, names, data = await run_through(make_gateway, tmp_path, scripted, http)
    assert all(asked in sent for asked in scripted.asked_from), scripted.asked_from
    assert names == ["metadata", "error"], data
    assert data[-1]["error"] == "CaptureInterrupted" and "not UTF-8" in str(data[-1]["message"])
    again = await join(http, f"{gw.url}/threads/{scripted.tid}/runs/{scripted.rid}/stream", "-1")
    assert [e.event for e in again] == names


async def test_the_upstreams_retry_fields_reach_live_and_replaying_clients_alike(
        make_gateway: MakeGateway, tmp_path: Path, scripted: Scripted, http: aiohttp.ClientSession) -> None:
    # A `retry:` sets an EventSource's reconnection time; the gateway dropped them, so its clients
    # reconnected at their default pace whatever the upstream asked for.
    scripted.writes = [b"retry: 2500\r\n\r\n", scripted.metadata(),  # alone: it goes with the next event
                       custom(0)[:-2] + b"retry: 3000\r\n\r\n", custom(1)]
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [scripted.url]}}))
    async with http.post(f"{gw.url}/threads/{scripted.tid}/runs/stream", json={"assistant_id": "a"}) as r:
        live = await asyncio.wait_for(r.read(), 30)
    async with http.get(f"{gw.url}/threads/{scripted.tid}/runs/{scripted.rid}/stream",
                        headers={"Last-Event-ID": "-1"}) as r:
        replayed = await asyncio.wait_for(r.read(), 30)
    blocks = [b for b in live.split(b"\n\n") if b]
    assert [b.count(b"retry: ") for b in blocks] == [1, 1, 0], live
    assert b"\nretry: 2500\n" in blocks[0] and b"\nretry: 3000\n" in blocks[1], live
    assert replayed == live
    assert customs(await join(http, f"{gw.url}/threads/{scripted.tid}/runs/{scripted.rid}/stream", "-1")) == [0, 1]


async def test_a_session_command_answered_through_a_compressing_proxy_is_read(
        make_gateway: MakeGateway, tmp_path: Path) -> None:
    # The gateway reads a session command's answer itself, to send it on the socket. A browser's
    # WebSocket handshake carries Accept-Encoding: gzip, which went upstream with the command; behind
    # a proxy that compresses JSON, the answer came gzipped and the client got "upstream answered
    # badly" for every command.
    answer = {"type": "success", "id": 1, "result": {"run_id": "r1"}}

    async def commands(request: web.Request) -> web.Response:
        await request.read()
        resp = web.json_response(answer)
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_post("/threads/{tid}/commands", commands)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [
            "http://127.0.0.1:%d" % runner.addresses[0][1]]}}))
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{gw.url}/threads/{uuid.uuid4()}/stream/events",
                                       headers={"Accept-Encoding": "gzip, deflate, br"}) as ws:
                await ws.send_str(orjson.dumps({"id": 1, "method": "run.input", "params": {}}).decode())
                got = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
        assert got == answer
    finally:
        await runner.cleanup()


def test_an_encoded_leg_is_inflated_piece_by_piece_and_an_unknown_coding_is_a_broken_stream() -> None:
    # A few KiB of gzip may inflate to gigabytes: the capture's parser gets it in bounded pieces
    # (and refuses an event past max_event_bytes) rather than the gateway holding it whole.
    import gzip
    from gateway.capture import decoded
    from gateway.sse import SSEProtocolError

    got: list[int] = []
    feed = decoded("gzip", lambda b: got.append(len(b)))
    packed = gzip.compress(b"\0" * (8 << 20))
    for i in range(0, len(packed), 1000):
        feed(packed[i:i + 1000])
    assert sum(got) == 8 << 20 and max(got) <= 256 << 10
    kept: list[bytes] = []
    with pytest.raises(SSEProtocolError, match="'br'"):
        decoded("br", kept.append)(b"data")
    with pytest.raises(SSEProtocolError, match="corrupt"):
        decoded("gzip", kept.append)(b"not gzip at all")
    assert kept == []
