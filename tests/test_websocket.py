"""WebSocket upgrades through the gateway: proxied to the upstream on any path it serves them on,
both directions, close codes, subprotocols, refusals and connection budgets kept."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.raw_ws import client_frame, raw_websocket, server_frame

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def test_messages_go_both_ways_with_the_upstreams_subprotocol_and_headers(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(gateway.url + "/ws/echo", protocols=["echo.v1"],
                               headers={"Authorization": "Bearer k", "X-User": "u1"}) as ws:
        assert ws.protocol == "echo.v1"
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.send_bytes(b"\x00\xff" * 1000)
        assert (await ws.receive()).data == b"\x00\xff" * 1000
    seen = fake_upstream.ws_headers[-1]
    assert seen["Authorization"] == "Bearer k" and seen["X-User"] == "u1", "the client's headers go upstream"
    assert "X-Forwarded-For" in seen


@pytest.mark.parametrize("code", [1000, 4001, 4999])
async def test_a_close_on_either_side_closes_the_other_with_its_code(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, code: int) -> None:
    async with http.ws_connect(gateway.url + "/ws/echo") as ws:
        await ws.send_str(f"close:{code}")
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == code, "the upstream's code reaches the client"
    ws = await http.ws_connect(gateway.url + "/ws/echo")
    await ws.send_str("ping")
    await ws.receive()
    await ws.close(code=code)
    for _ in range(100):
        if len(fake_upstream.ws_closed) == 2:
            break
        await asyncio.sleep(0.02)
    assert fake_upstream.ws_closed[-1] == code, "the client's code reaches the upstream"


async def test_a_slow_reader_gets_every_message_in_order(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(gateway.url + "/ws/echo") as ws:
        await ws.send_str("burst:100")  # 6.4 MB as fast as the reader takes it
        got = []
        for _ in range(100):
            msg = await ws.receive()
            got.append(int.from_bytes(msg.data[:4], "big"))
            if len(got) % 10 == 0:
                await asyncio.sleep(0.01)
        assert got == list(range(100))


async def test_an_upgrade_the_upstream_refuses_gets_its_status(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(gateway.url + "/threads")  # the upstream serves no WebSocket there
    assert refused.value.status == 405


async def test_upgrades_count_against_the_upstreams_stream_budget(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {
        "urls": [fake_upstream.url], "max_streams": 1, "pool_timeout": "300ms"}}))
    async with http.ws_connect(gw.url + "/ws/echo") as first:
        with pytest.raises(aiohttp.WSServerHandshakeError) as full:
            await http.ws_connect(gw.url + "/ws/echo")
        assert full.value.status == 503
        await first.send_str("still here")
        assert (await first.receive()).data == "still here"
    async with http.ws_connect(gw.url + "/ws/echo") as again:  # the slot is free once the first closed
        await again.send_str("x")
        assert (await again.receive()).data == "x"


async def test_sigterm_closes_an_open_websocket_with_going_away_and_exits_0(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A proxied WebSocket open at SIGTERM is closed on both sides with 1001 (going away), as a
    server that stops says it, and logged as a whole session; not held for the grace (twice over)
    and then dropped without a close frame, which clients take for a network failure and the
    access log took for a client that left."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"upstreams:\n  default:\n    urls: [{fake_upstream.url}]\n"
                   f"storage:\n  path: {tmp_path / 'data'}\nshutdown_grace: 1s\nlog_format: json\n")
    gw = gateway_process("--config", str(cfg)).start()
    async with http.ws_connect(gw.url + "/ws/echo") as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        stop = asyncio.get_running_loop().run_in_executor(None, gw.terminate)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == aiohttp.WSCloseCode.GOING_AWAY, msg
    assert await stop == 0
    assert fake_upstream.ws_closed[-1] == aiohttp.WSCloseCode.GOING_AWAY, "the upstream hears why too"
    access = [d for d in (json.loads(x) for x in gw.log_text().splitlines() if x.startswith("{"))
              if d["logger"] == "gateway.access" and d["path"] == "/ws/echo"]
    assert [(d["status"], d["end"]) for d in access] == [(101, "completed")], access


@pytest.mark.parametrize("code", [1000, 4001])
async def test_each_sides_close_is_answered_with_the_other_sides_answer(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, code: int) -> None:
    """The close handshake as it is direct: the side that closes hears the other side's answer. The
    gateway answered a client's close with 1014 (bad gateway), which a client library takes for an
    abnormal end (websockets raises ConnectionClosedError), and an upstream's close with 1001."""
    answers = []
    for url in (fake_upstream.url, gateway.url):
        async with http.ws_connect(url + "/ws/echo") as ws:
            await ws.send_str("x")
            await ws.receive()
            await ws.close(code=code)
            answers.append(ws.close_code)  # after close(): the code the other side answered with
    assert answers[1] == answers[0] == 1000, "the upstream's answer (aiohttp answers 1000) reaches the client"
    for url in (fake_upstream.url, gateway.url):
        async with http.ws_connect(url + "/ws/echo") as ws:  # autoclose: it answers the upstream with 1000
            await ws.send_str(f"close:{code}")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == code
        for _ in range(100):
            if len(fake_upstream.ws_answers) == 2 or url == fake_upstream.url:
                break
            await asyncio.sleep(0.02)
    assert fake_upstream.ws_answers == [1000, 1000], "the client's answer reaches the upstream"


async def test_a_close_without_a_status_code_is_relayed_as_a_normal_close(
        gateway: RunningGateway, fake_upstream: FakeAgentServer) -> None:
    """A browser's ``ws.close()`` with no code sends a close frame with no status. The gateway relayed
    it as code 0, which no endpoint may send: the upstream failed the connection (a protocol
    error, not a close) and sent no answer for the client to hear."""
    answers = []
    for url in (fake_upstream.url, gateway.url):
        reader, writer = await raw_websocket(url, "/ws/echo")
        writer.write(client_frame(0x8, b""))  # a close frame with no payload: no status
        opcode, payload = await asyncio.wait_for(server_frame(reader), 10)
        assert opcode == 0x8 and len(payload) == 2, (opcode, payload)
        answers.append(int.from_bytes(payload, "big"))
        writer.close()
        for _ in range(100):
            if fake_upstream.ws_closed and (url == fake_upstream.url or len(fake_upstream.ws_closed) == 2):
                break
            await asyncio.sleep(0.02)
    assert fake_upstream.ws_closed[0] == 0, "direct, the upstream hears a close without a status"
    assert fake_upstream.ws_closed[1] in (0, 1000), "through the gateway a close it accepts, not a protocol error"
    assert answers == [1000, 1000], "a normal close answers it, direct and through the gateway"



async def test_a_client_message_over_the_size_limit_closes_the_socket_with_1009(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A client's message was taken at any size (held whole, fragments and all, before it went on):
    bounded by ``streams.max_request_body`` as a request body is, the client hears 1009 and the
    upstream that the gateway let go of the socket."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"max_request_body": "64KiB"}))
    big = b"x" * (100 << 10)
    whole = [client_frame(0x2, big)]
    parts = [client_frame(0x2, big[:40 << 10], fin=False), client_frame(0x0, big[40 << 10:80 << 10], fin=False),
             client_frame(0x0, big[80 << 10:])]  # each fragment under the bound, the message over it
    for frames in (whole, parts):
        reader, writer = await raw_websocket(gw.url, "/ws/echo")
        writer.write(b"".join(frames))
        opcode, payload = await asyncio.wait_for(server_frame(reader), 10)
        assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, aiohttp.WSCloseCode.MESSAGE_TOO_BIG), payload
        writer.close()
    for _ in range(100):
        if len(fake_upstream.ws_closed) == 2:
            break
        await asyncio.sleep(0.02)
    assert fake_upstream.ws_closed == [aiohttp.WSCloseCode.GOING_AWAY] * 2
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/ws/echo") as ws:  # within it, relayed
        await ws.send_bytes(big[:60 << 10])
        assert (await ws.receive()).data == big[:60 << 10]


async def test_a_client_that_stops_answering_pings_is_let_go_on_both_sides(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """Direct, the agent server pings its WebSocket clients and drops one that stops answering (a
    laptop closed, a NAT that forgot the connection). Through the gateway the upstream's pings are
    answered by the gateway, and the gateway pinged nobody: a vanished client held its upstream
    socket and a slot of the stream budget for good. It is pinged every ``streams.heartbeat``."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "max_streams": 1}},
                                           streams={"heartbeat": "300ms"}))
    reader, writer = await raw_websocket(gw.url, "/ws/echo")  # answers nothing from here on
    try:
        for _ in range(250):  # the ping, half a heartbeat for its pong, and slack on a loaded machine
            if fake_upstream.ws_closed:
                break
            await asyncio.sleep(0.02)
        assert fake_upstream.ws_closed == [aiohttp.WSCloseCode.GOING_AWAY], "the upstream hears the client is gone"
        async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/ws/echo") as ws:  # its slot is free
            await ws.send_str("x")
            assert (await ws.receive()).data == "x"
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/ws/echo", "/threads/6f1c2a9e-5b0d-4c47-9a43-0d6c1a2b3c4d/stream/events"])
async def test_a_client_let_go_for_missing_pongs_is_told_why_in_a_close_frame(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, path: str) -> None:
    """A client that stops answering pings was dropped with no close frame: one that was only slow
    (a busy event loop, a stalled link that recovers) saw 1006 with no reason and could not tell a
    heartbeat from a crash. While the connection can still carry it, the gateway sends a close
    frame first: 1011 and the reason, as the ``websockets`` library does for a keepalive timeout."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"heartbeat": "300ms"}))
    reader, writer = await raw_websocket(gw.url, path)  # reads, but answers nothing from here on
    try:
        got: list[tuple[int, bytes]] = []
        async with asyncio.timeout(10):
            while not got or got[-1][0] != 0x8:
                got.append(await server_frame(reader))
        assert got[0][0] == 0x9, "pinged first"
        payload = got[-1][1]
        assert int.from_bytes(payload[:2], "big") == aiohttp.WSCloseCode.INTERNAL_ERROR, got
        assert b"pong" in payload[2:], got
    finally:
        writer.close()


async def test_an_upstream_that_drops_its_socket_is_said_to_the_client_with_1014_and_a_reason(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """An upstream connection that ends without a close frame reached the client as 1014 with no
    reason: nothing told a client (or whoever reads its logs) that the upstream went, not the
    gateway. The close says so."""
    async with http.ws_connect(gateway.url + "/ws/echo") as ws:
        await ws.send_str("drop")
        msg = await asyncio.wait_for(ws.receive(), 10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.BAD_GATEWAY), msg
    assert "upstream" in (msg.extra or ""), msg



@pytest.mark.parametrize("code", [1006, 5000, 65535])
async def test_a_close_code_no_endpoint_may_send_is_not_relayed(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, code: int) -> None:
    """aiohttp takes 1006 (in its enum) and any code past 4999 from a peer, and the gateway passed
    it on: a client library that checks (the ``ws`` package, browsers, ``websockets``) fails the
    connection as a protocol error. A peer's close with such a code is taken as an end without a
    close frame: the client hears 1014, the upstream 1001."""
    async with http.ws_connect(gateway.url + "/ws/echo") as ws:
        await ws.send_str(f"close:{code}")
        msg = await asyncio.wait_for(ws.receive(), 10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.BAD_GATEWAY), msg
    for _ in range(100):  # the upstream that closed notes its socket's end too
        if fake_upstream.ws_closed:
            break
        await asyncio.sleep(0.02)
    before = len(fake_upstream.ws_closed)
    ws = await http.ws_connect(gateway.url + "/ws/echo")
    await ws.send_str("x")
    await ws.receive()
    await ws.close(code=code)  # aiohttp's client sends any code it is given
    for _ in range(100):
        if len(fake_upstream.ws_closed) > before:
            break
        await asyncio.sleep(0.02)
    assert fake_upstream.ws_closed[before:] == [aiohttp.WSCloseCode.GOING_AWAY]


async def test_an_upstream_message_over_the_size_limit_closes_both_sides_with_1009(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """The upstream's messages were taken at any size (max_msg_size=0), each held whole in the
    gateway's memory before it went on. Bounded as a client's are (``streams.max_request_body``):
    the upstream hears 1009 for its message, and the client 1009 with the reason."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"max_request_body": "64KiB"}))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(gw.url + "/ws/echo") as ws:
            await ws.send_str(f"big:{60 << 10}")  # within it, relayed
            assert len((await asyncio.wait_for(ws.receive(), 10)).data) == 60 << 10
            await ws.send_str(f"big:{100 << 10}")
            msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG), msg
        assert "upstream" in (msg.extra or ""), msg
    for _ in range(100):
        if fake_upstream.ws_closed:
            break
        await asyncio.sleep(0.02)
    assert fake_upstream.ws_closed == [aiohttp.WSCloseCode.MESSAGE_TOO_BIG]


async def test_an_upstream_that_stops_answering_pings_is_let_go_and_the_client_told(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """The gateway pinged its clients but not its upstreams: an upstream that hung (or a host gone
    behind a path that drops everything) held the client's socket open, silent, and a slot of the
    stream budget, until TCP gave up, hours later. The upstream side is pinged every
    ``streams.heartbeat`` too; one that does not answer is let go, the client hearing 1014 and why."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "max_streams": 1}},
                                           streams={"heartbeat": "300ms"}))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(gw.url + "/ws/deaf") as ws:  # answers the gateway's pings itself
            msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.BAD_GATEWAY), msg
        assert "upstream" in (msg.extra or ""), msg
        async with http.ws_connect(gw.url + "/ws/echo") as again:  # its slot is free
            await again.send_str("x")
            assert (await again.receive()).data == "x"
