"""The public listener under hostile or odd input: bytes that are not UTF-8, malformed and slow
requests, spoofed forwarding headers, callers the upstream tells apart by a header of its own,
and answers in the API's own shape wherever the gateway answers itself.

Raw sockets where the point is bytes an HTTP client library would not send.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.langgraph_server import LangGraphServer
from tests.support.metrics import by_label
from tests.support.sse import Ev, read_events
from tests.support.runs import customs, new_thread, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def raw_request(url: str, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; everything the gateway answers until it closes (or ``timeout``)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = b""
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            await writer.drain()
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass  # what arrived before the gateway gave up on the connection is the answer
    writer.close()
    return data


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- 3. header bytes that are not UTF-8 -------------------------------------------------------------

@pytest.mark.parametrize("header", [b"Cookie", b"Authorization", b"X-Api-Key"])
async def test_non_utf8_header_bytes_never_give_500_and_the_run_is_captured(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, header: bytes) -> None:
    tid = await new_thread(http, gateway)
    body = orjson.dumps({"assistant_id": "a", "input": {"n": 3}})
    raw = await raw_request(gateway.url, b"POST /threads/" + tid.encode() + b"/runs/stream HTTP/1.1\r\nHost: x\r\n"
                            + header + b": a=\xe9\r\nContent-Type: application/json\r\nConnection: close\r\n"
                            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, _ = status_and_body(raw)
    assert status == 200, raw[:300]
    assert len(fake_upstream.runs) == 1, "one run created upstream"
    meta = (await gateway.gw.log.streams())[0]
    assert meta.kind == "run", "and it was captured"
    raw = await raw_request(gateway.url, b"GET " + meta.path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header
                            + b": a=\xe9\r\nLast-Event-ID: -1\r\nConnection: close\r\n\r\n")
    assert status_and_body(raw)[0] == 200, raw[:300]


async def test_a_run_created_upstream_is_never_left_uncaptured(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The budget is spent by the time the upstream has answered (a race with another capture):
    # the gateway cancels the run it could not capture, and says so.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           storage={"max_bytes": 3000}))
    tid = await new_thread(http, gw)
    fake_upstream.faults.hang = 0.5  # the next request is answered late
    late = asyncio.ensure_future(http.post(f"{gw.url}/threads/{tid}/runs/stream",
                                           json={"assistant_id": "a", "input": {"n": 300, "delay": 0.01}}))
    await asyncio.sleep(0.1)
    fake_upstream.faults.hang = 0
    filler = await stream_run(http, gw, tid, n=400, pad=50, delay=0.01)  # fills the budget meanwhile
    await read_events(filler, limit=60)
    r = await late
    assert r.status == 503 and "cancelled" in (await r.json())["detail"]
    runs = [run for run in fake_upstream.runs.values() if run.n == 300]
    assert len(runs) == 1
    for _ in range(40):
        if runs[0].status == "interrupted":
            break
        await asyncio.sleep(0.05)
    assert runs[0].status == "interrupted", "the run nobody can follow was cancelled upstream"
    filler.close()


# --- 4. a cached "yes" is only for the caller it was given to ------------------------------------------

async def _alices_run(http: aiohttp.ClientSession, gw: RunningGateway, fake_upstream: FakeAgentServer
                      ) -> tuple[str, list[Ev]]:
    """A run Alice streamed whole, on an upstream that lets only her (X-User: alice) in: its join URL
    and its events."""
    alice = {"X-User": "alice"}
    fake_upstream.faults.require_header = ("X-User", "alice")
    async with http.post(f"{gw.url}/threads", json={}, headers=alice) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", headers=alice,
                         json={"assistant_id": "a", "input": {"n": 3}}) as r:
        return gw.url + r.headers["Location"], await read_events(r)


async def test_a_cached_yes_is_not_reused_for_a_caller_the_upstream_tells_apart_by_its_own_header(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    alice = {"X-User": "alice"}
    loc, original = await _alices_run(http, gateway, fake_upstream)
    async with http.get(loc, headers={"Last-Event-ID": "-1", **alice}) as r:  # Alice: yes, and it is cached
        assert r.status == 200 and await read_events(r) == original
    for other in ({"X-User": "bob"}, {}):
        async with http.get(loc, headers={"Last-Event-ID": "-1", **other}) as r:
            assert r.status == 403, f"{other or 'anonymous'} read Alice's run from the cache"


async def test_a_resume_the_upstream_refuses_is_not_counted_as_served(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    # The outcome was counted before the access check asked the upstream: a 403 became a "hit".
    alice = {"X-User": "alice"}
    loc, events = await _alices_run(http, gateway, fake_upstream)
    ids = [e.id for e in events]
    before = await by_label(http, gateway.admin_url, "gateway_resumes_total", "outcome")
    for last in (ids[0], "-1", "1"):  # a hit, from the start, and an id of no capture of this run's
        async with http.get(loc, headers={"Last-Event-ID": str(last), "X-User": "bob"}) as r:
            assert r.status == 403
    after = await by_label(http, gateway.admin_url, "gateway_resumes_total", "outcome")
    assert after == before, "a refused resume served nothing"
    async with http.get(loc, headers={"Last-Event-ID": str(ids[0]), **alice}) as r:
        assert r.status == 200 and len(await read_events(r)) == len(ids) - 1
    after = await by_label(http, gateway.admin_url, "gateway_resumes_total", "outcome")
    assert after["hit"] == before["hit"] + 1


async def test_a_stateless_run_is_only_replayed_to_the_caller_that_started_it(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    alice = {"X-User": "alice"}
    fake_upstream.faults.require_header = ("X-User", "alice")
    async with http.post(f"{gateway.url}/runs/stream", headers=alice, json={"assistant_id": "a", "input": {"n": 3}}) as r:
        loc = gateway.url + r.headers["Location"]
        original = await read_events(r)
    async with http.get(loc, headers={"Last-Event-ID": "-1", **alice}) as r:
        assert r.status == 200 and await read_events(r) == original
    for other in ({"X-User": "bob"}, {}):
        async with http.get(loc, headers={"Last-Event-ID": "-1", **other}) as r:
            assert r.status == 404, f"{other or 'anonymous'} read Alice's stateless run"


# --- 5. malformed and slow requests ---------------------------------------------------------------------

async def test_a_malformed_request_gets_a_json_400_that_echoes_nothing(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    raw = await raw_request(gateway.url, b"GET /threads HTTP/1.1\r\nHost: x\r\nsecret-token-123 no colon\r\n\r\n")
    status, body = status_and_body(raw)
    assert status == 400
    assert b"application/json" in raw.split(b"\r\n\r\n")[0].lower()
    assert "detail" in orjson.loads(body)
    assert b"secret-token-123" not in raw, "request bytes are never echoed"
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]
    assert all("secret-token-123" not in r.getMessage() and r.exc_info is None for r in caplog.records)


async def _read_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             seconds: float) -> tuple[bytes, bool]:
    """What the gateway sends on a raw connection within ``seconds``, and whether it closed it."""
    raw, closed = b"", False
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                raw += chunk
            closed = True
    except TimeoutError:
        pass
    writer.close()
    return raw, closed


@pytest.mark.parametrize("path,size", [("/echo", 100), ("/echo", 5000), ("/threads/t1/runs", 100)],
                         ids=["forwarded, read first", "forwarded, streamed", "background run"])
async def test_a_chunked_body_that_breaks_off_malformed_gets_a_json_400_at_once(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, path: str, size: int) -> None:
    """A bad chunk after the request was handed on: aiohttp's parser leaves that body open and queues
    its 400 for later, so the gateway waited out clients.body_timeout and answered 408 (or, with the
    body streaming upstream, 502 blaming the upstream)."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"body_timeout": "60s", "body_buffer_bytes": "1KiB"}))
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    first = b'{"metadata": {"pad": "' + b"x" * size
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(first), first))
    await writer.drain()
    await asyncio.sleep(0.3)  # the request is being handled: what follows arrives on its own
    writer.write(b"ZZ\r\n")
    raw, _closed = await _read_until_closed(reader, writer, 20)  # well within body_timeout
    status, body = status_and_body(raw) if raw else (0, b"")
    assert (status, orjson.loads(body) if body else None) == (400, {"detail": "malformed HTTP request body"}), raw[:300]
    assert raw.count(b"HTTP/1.") == 1, "one answer, and the connection closed"


async def test_a_pipelined_body_that_breaks_off_malformed_gets_a_json_400_once_its_turn_comes(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """The same break in the body of a request queued behind another (pipelined): its handler had not
    started when the bad chunk came, so its body was left open and it waited out body_timeout."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"body_timeout": "60s"}))
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    fake_upstream.faults.hang = 1.0  # the first request is answered late: the second waits its turn
    first = b'{"metadata": {"pad": "xx'
    writer.write(b"GET /threads/t1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(first), first))
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(b"ZZ\r\n")
    await asyncio.sleep(0.2)
    fake_upstream.faults.hang = 0
    raw, closed = await _read_until_closed(reader, writer, 20)  # well within body_timeout
    assert closed, "the connection is closed after the 400 (its parser cannot go on)"
    answers = raw.split(b"HTTP/")[1:]
    assert len(answers) == 2, raw[:800]
    assert b"t1" in answers[0], "the first request is answered as it would be alone"
    status, body = status_and_body(b"HTTP/" + answers[1])
    assert (status, orjson.loads(body)) == (400, {"detail": "malformed HTTP request body"}), answers[1][:300]


async def test_a_body_that_stalls_gets_its_408_and_the_connection_ends_with_it(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """The 408 says Connection: close, and the gateway held the connection (a max_connections slot)
    for aiohttp's 10 s of lingering over a body nobody would read, or kept reading requests on it."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"body_timeout": "500ms"}))
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"a\": ")  # and then nothing: the client stalls
    await writer.drain()
    raw, closed = await _read_until_closed(reader, writer, 5)  # the body timeout and then some; lingering: 10 s
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:300]
    assert closed, "the connection ends with the answer that says it does"


@pytest.mark.parametrize("request_line", [b"OPTIONS * HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1",
                                          b"GET http://example.com HTTP/1.1"])
async def test_a_request_target_that_is_no_path_gets_a_json_404(
        lg_gateway: RunningGateway, langgraph_server: LangGraphServer, request_line: bytes) -> None:
    """aiohttp's router answered these itself, before the gateway's route: a text/plain '404: Not Found'.
    The Agent Server answers ``OPTIONS *`` with its JSON 404."""
    raw = await raw_request(lg_gateway.url, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, body = status_and_body(raw)
    assert (status, b"application/json" in raw.split(b"\r\n\r\n")[0].lower()) == (404, True), raw[:300]
    assert orjson.loads(body) == {"detail": "Not Found"}
    if request_line.startswith(b"OPTIONS"):
        direct = await raw_request(langgraph_server.url, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_and_body(direct) == (status, body)


async def test_long_header_lines_pass_as_they_do_upstream_and_oversized_ones_leak_nothing(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    raw = await raw_request(gateway.url, b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000
                            + b"\r\nConnection: close\r\n\r\n")
    assert status_and_body(raw)[0] == 200, raw[:200]
    token = b"Bearer " + b"s3cr3t" * 400_000  # beyond any sane limit
    raw = await raw_request(gateway.url, b"GET /echo/x HTTP/1.1\r\nHost: x\r\nAuthorization: " + token
                            + b"\r\nConnection: close\r\n\r\n")
    if raw:  # a JSON refusal, or a plain close: both are fine, a leak is not
        status, body = status_and_body(raw)
        assert status in (400, 431) and b"s3cr3t" not in raw and "detail" in orjson.loads(body)
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_header_limits_are_the_readmes_and_beyond_them_the_answer_is_a_json_431(
        gateway: RunningGateway) -> None:
    """README: header lines up to clients.max_header_bytes (1 MiB), up to clients.max_headers (1,000)
    of them; oversized headers get 431 in JSON. (The test above accepts any refusal, or none.)"""
    line = b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Long: %s\r\nConnection: close\r\n\r\n"
    assert status_and_body(await raw_request(gateway.url, line % (b"a" * ((1 << 20) - 100))))[0] == 200
    many = b"GET /echo/x HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n"
    for refused in (line % (b"a" * ((1 << 20) + 100)), many % b"".join(b"X-H%d: v\r\n" % i for i in range(1000))):
        status, body = status_and_body(await raw_request(gateway.url, refused))
        assert status == 431 and "detail" in orjson.loads(body)


async def test_connections_that_never_finish_their_headers_are_closed(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"header_timeout": "500ms"}))
    host, port = gw.url.removeprefix("http://").split(":")
    conns = []
    for _ in range(30):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /thr")  # and then nothing more, like a slowloris client
        conns.append((reader, writer))
    try:
        closed = 0
        for reader, _ in conns:
            try:
                async with asyncio.timeout(5):
                    await reader.read()  # b"" (or a refusal) once the gateway gives up on it
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(conns)
    finally:
        for _, writer in conns:
            writer.close()


async def test_connections_beyond_the_cap_get_a_clear_503(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"max_connections": 4}))
    host, port = gw.url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(4)]
    try:
        await asyncio.sleep(0.1)
        raw = await raw_request(gw.url, b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        status, body = status_and_body(raw)
        assert status == 503 and "connections" in orjson.loads(body)["detail"]
    finally:
        for s in held:
            s.close()
    await asyncio.sleep(0.1)
    async with http.get(f"{gw.url}/echo/x") as r:  # below the cap again
        assert r.status == 200



async def test_a_connection_refused_at_the_cap_counts_as_the_503_it_was_answered(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """gateway_requests_total{status} counts every request answered, as the access log writes a line
    for each: the 503 a connection beyond clients.max_connections gets was logged but never counted,
    so a gateway turning clients away at its cap showed no 5xx at all on the requests panel."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"max_connections": 2}))
    host, port = gw.url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        for _ in range(3):
            status, _body = status_and_body(await raw_request(gw.url, b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n",
                                                              timeout=5))
            assert status == 503
    finally:
        for s in held:
            s.close()
    counted = await by_label(http, gw.admin_url, "gateway_requests_total", "status")
    assert counted.get("5xx") == 3.0, counted


# --- 6. forwarding headers only from proxies the operator trusts -----------------------------------------

async def test_client_sent_forwarded_host_and_proto_are_overwritten(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/echo/h", headers={"X-Forwarded-Host": "evil.example",
                                                         "X-Forwarded-Proto": "https"}) as r:
        got = {k.lower(): v for k, v in (await r.json())["headers"]}
    assert got["x-forwarded-host"] == gateway.url.removeprefix("http://")
    assert got["x-forwarded-proto"] == "http"


async def test_a_trusted_proxy_may_set_forwarded_host_and_proto(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           clients={"trusted_proxies": ["127.0.0.0/8"]}))
    async with http.get(f"{gw.url}/echo/h", headers={"X-Forwarded-Host": "app.example",
                                                    "X-Forwarded-Proto": "https"}) as r:
        got = {k.lower(): v for k, v in (await r.json())["headers"]}
    assert got["x-forwarded-host"] == "app.example" and got["x-forwarded-proto"] == "https"


# --- 7. and 8. answers in the API's shape; the upstream's answers as it gave them -----------------------

async def test_a_malformed_run_id_on_a_route_served_from_the_log_is_422(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/runs/not-a-uuid/stream", headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 422
        assert await r.json() == {"detail": "Invalid run ID: must be a UUID"}


async def test_an_upstream_body_without_content_type_keeps_none(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/notype") as r:
        assert r.status == 422
        assert "Content-Type" not in r.headers, r.headers.get("Content-Type")
        assert await r.read() == b"Namespace label '' must be a non-empty string without periods"


async def test_the_upstreams_validation_error_quotes_the_body_the_client_sent(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs/stream", json={"input": {"n": 1}}) as r:
        assert r.status == 422
        detail = (await r.json())["detail"]
    assert "stream_resumable" not in detail and '"input"' in detail


@pytest.mark.parametrize("path", ["/runs/stream", "/runs"])
async def test_a_well_formed_run_request_the_upstream_refuses_is_sent_again_as_the_client_sent_it(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, path: str) -> None:
    """README: the gateway adds stream_resumable to well-formed run requests, and if the upstream refuses
    the body as the gateway changed it (422), it sends the client's own body instead, so the validation
    error is about what the client sent. (The test above is a body the gateway does not change.)"""
    tid = await new_thread(http, gateway)
    sent = {"assistant_id": "a", "input": "not an object", "on_disconnect": "cancel"}
    fake_upstream.requests.clear()
    async with http.post(f"{gateway.url}/threads/{tid}{path}", json=sent) as r:
        assert r.status == 422
        detail = (await r.json())["detail"]
    assert detail.endswith(orjson.dumps(sent).decode()), "the error quotes the client's own body"
    creates = [p for m, p in fake_upstream.requests if m == "POST"]
    assert creates == [f"/threads/{tid}{path}"] * 2, "asked once as changed, once as sent"


# --- 9. CORS on the answers the gateway makes itself ----------------------------------------------------

async def test_a_stream_served_from_the_log_carries_the_upstreams_cors_headers(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    origin = {"Origin": "http://127.0.0.1:9999"}
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs/stream", headers=origin,
                         json={"assistant_id": "a", "input": {"n": 3}}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"  # forwarded: the upstream's own
        loc = gateway.url + r.headers["Location"]
        await read_events(r)
    for _ in range(2):  # the first asks the upstream, the second comes from the cached answer
        async with http.get(loc, headers={"Last-Event-ID": "-1", **origin}) as r:
            assert r.status == 200
            assert r.headers.get("Access-Control-Allow-Origin") == "*"
            exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"content-location", "location"} <= exposed
            assert customs(await read_events(r)) == [0, 1, 2]


async def test_the_503s_the_gateway_makes_itself_carry_the_upstreams_cors_headers(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: the answers the gateway makes itself (a stream served from its log, a 503) carry what the
    upstream answered the same Origin last, so a browser page on another origin can read them."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "max_connections": 1,
                                                                  "pool_timeout": "200ms"}},
                                           storage={"max_bytes": 2000}))
    origin = {"Origin": "http://127.0.0.1:9999"}
    tid = await new_thread(http, gw, origin)  # the upstream's answer to this origin is learned
    live = await stream_run(http, gw, tid, n=400, delay=0.01, pad=50)
    await read_events(live, limit=60)  # over budget, and the only stream is live
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", headers=origin,
                         json={"assistant_id": "a", "input": {"n": 1}}) as r:
        assert r.status == 503 and r.headers.get("Access-Control-Allow-Origin") == "*", dict(r.headers)
    fake_upstream.faults.slow_body = 0.5  # holds the one forward connection for a while
    slow = asyncio.create_task(http.get(f"{gw.url}/echo/slow"))
    await asyncio.sleep(0.1)
    async with http.get(f"{gw.url}/echo/x", headers=origin) as r:
        assert r.status == 503 and "pool" in (await r.json())["detail"]
        assert r.headers.get("Access-Control-Allow-Origin") == "*", dict(r.headers)
    (await slow).close()
    live.close()


async def _upstream_answering(answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.AppRunner:
    """An upstream on a free loopback port that answers every request with ``answer``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_an_origin_the_upstream_stopped_allowing_gets_no_cors_on_the_gateways_own_answers(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: the answers the gateway makes itself carry what the upstream answered the same Origin
    *last*. An answer without CORS headers taught nothing, so an origin the upstream had allowed once
    kept being allowed on the gateway's own answers after the upstream stopped allowing it (its
    allow-list changed): the gateway vouched for a page the upstream refuses."""
    allowed = {"http://app.example"}

    async def answer(request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in allowed else {}
        return web.json_response({"ok": True}, headers=headers)

    runner = await _upstream_answering(answer)
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {
            "urls": [f"http://127.0.0.1:{runner.addresses[0][1]}"]}}))
        origin = {"Origin": "http://app.example"}
        # A join with a malformed id: the gateway's own 422, made before any upstream request.
        own = f"{gw.url}/threads/{'1' * 8}-1111-1111-1111-{'1' * 12}/runs/{'2' * 8}-2222-2222-2222-{'2' * 12}/stream"
        for still_allowed in (True, False):
            if not still_allowed:
                allowed.clear()
            async with http.get(f"{gw.url}/info", headers=origin) as r:
                assert r.status == 200
                assert r.headers.get("Access-Control-Allow-Origin") == (origin["Origin"] if still_allowed else None)
            async with http.get(own, headers={"Last-Event-ID": "bad", **origin}) as r:
                assert r.status == 422
                assert r.headers.get("Access-Control-Allow-Origin") == (origin["Origin"] if still_allowed else None)
    finally:
        await runner.cleanup()

async def test_the_gateways_own_answers_vary_on_origin_even_to_a_request_without_one(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """The upstream sends ``Vary: Origin`` on every answer (Starlette's CORS middleware), so a cache in
    front of the gateway keys its answers by Origin. The gateway's own answers (a stream replayed from
    its log, its 422) had none when the request had no Origin: a cache could store that answer (no
    CORS headers) and serve it to a page on an allowed origin, or the reverse."""
    tid = await new_thread(http, gateway)
    async with http.post(f"{gateway.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": 2}}) as r:
        assert "origin" in _vary(r), "forwarded: the upstream's own"
        loc = gateway.url + r.headers["Location"]
        await read_events(r)
    for headers in ({}, {"Origin": "http://127.0.0.1:9999"}):
        async with http.get(loc, headers={"Last-Event-ID": "-1", **headers}) as r:
            assert r.status == 200
            assert customs(await read_events(r)) == [0, 1]
            assert _vary(r).count("origin") == 1, r.headers.getall("Vary", [])
        bad = f"{gateway.url}/threads/{tid}/runs/{'2' * 8}-2222-2222-2222-{'2' * 12}/stream"
        async with http.get(bad, headers={"Last-Event-ID": "bad", **headers}) as r:
            assert r.status == 422
            assert _vary(r).count("origin") == 1, r.headers.getall("Vary", [])


async def test_cors_added_to_a_forwarded_error_keeps_the_upstreams_vary(
        make_gateway: MakeGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A server's 5xx page often comes without CORS headers (Starlette's from outside its CORS
    middleware); the gateway adds the ones the upstream answered that origin, and replaced the
    upstream's ``Vary`` with its own ``Origin``: a cache then served one encoding's error to all."""

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/boom":
            return web.json_response({"detail": "boom"}, status=500, headers={"Vary": "Accept-Encoding"})
        return web.json_response({"ok": True}, headers={"Access-Control-Allow-Origin": "*", "Vary": "Origin"})

    runner = await _upstream_answering(answer)
    try:
        gw = await make_gateway(gateway_config(tmp_path, {"default": {
            "urls": [f"http://127.0.0.1:{runner.addresses[0][1]}"]}}))
        origin = {"Origin": "http://app.example"}
        async with http.get(f"{gw.url}/info", headers=origin) as r:  # what the upstream allows is learnt
            assert r.status == 200
        async with http.get(f"{gw.url}/boom", headers=origin) as r:
            assert r.status == 500
            assert r.headers.get("Access-Control-Allow-Origin") == "*"
            assert sorted(_vary(r)) == ["accept-encoding", "origin"], r.headers.getall("Vary", [])
    finally:
        await runner.cleanup()


def _vary(r: aiohttp.ClientResponse) -> list[str]:
    return [v.strip().lower() for line in r.headers.getall("Vary", []) for v in line.split(",") if v.strip()]


async def test_a_preflight_does_not_hide_the_exposed_headers_of_a_stream_served_from_the_log(
        lg_gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """A browser preflights its re-join (Last-Event-ID is no simple header). The upstream's answer to a
    preflight has no Expose-Headers; the gateway learnt it as the origin's CORS, so the replay that
    followed (access cached, nothing asked upstream) let the page read no Location, Content-Location
    or X-Gateway-Resume, where the server's own join exposes Content-Location."""
    origin = {"Origin": "http://127.0.0.1:9999"}
    async with http.post(f"{lg_gateway.url}/threads", json={}, headers=origin) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{lg_gateway.url}/threads/{tid}/runs/stream", headers=origin,
                         json={"assistant_id": "ticker", "input": {"n": 2, "delay": 0}, "stream_mode": ["custom"]}) as r:
        loc = lg_gateway.url + r.headers["Location"]
        await read_events(r)
    for _ in range(2):  # the first asks the upstream whether this client may read the run, the second not
        async with http.options(loc, headers={**origin, "Access-Control-Request-Method": "GET",
                                              "Access-Control-Request-Headers": "last-event-id"}) as r:
            assert r.status == 200 and "Access-Control-Expose-Headers" not in r.headers
        async with http.get(loc, headers={"Last-Event-ID": "-1", **origin}) as r:
            assert r.status == 200
            exposed = {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
            assert {"content-location", "location", "x-gateway-resume"} <= exposed, r.headers
            await read_events(r)


# --- found by the OpenAPI fuzz (tests/test_fuzz.py): differences from the Agent Server --------------------

async def test_a_stream_mode_that_is_no_json_array_filters_everything_out_like_upstream(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=3)
    await read_events(resp)
    for mode in ("[bad", "[1]"):
        async with http.get(gateway.url + resp.headers["Location"], params={"stream_mode": mode},
                            headers={"Last-Event-ID": "-1"}) as r:
            assert r.status == 200, await r.text()
            assert await read_events(r) == []


async def test_a_blank_thread_stream_mode_is_refused_like_upstream(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, gateway)
    for modes in ("lifecycle,", " "):
        async with http.get(f"{gateway.url}/threads/{tid}/stream", params={"stream_modes": modes}) as r:
            assert r.status == 422
            assert (await r.json())["detail"].startswith("Invalid stream mode: ")


async def test_a_request_line_without_a_version_gets_an_http_1_1_400(gateway: RunningGateway) -> None:
    raw = await raw_request(gateway.url, b"GET /ok\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:60]
    assert orjson.loads(status_and_body(raw)[1])["detail"].startswith("malformed HTTP request")


async def test_pipelined_requests_on_one_connection_are_answered_in_order(gateway: RunningGateway) -> None:
    # HTTP/1.1 pipelining: several requests in one write, one answer each, in the order sent. (The
    # connection keeps its parsed requests in a list of its own rather than aiohttp's deque.)
    one = b"GET /threads/%s HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = await raw_request(gateway.url, one % b"t-1" + one % b"t-2" + one % b"t-3" + last)
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 4, raw[:400]
    for n, answer in zip((b"t-1", b"t-2", b"t-3"), answers):
        assert n in answer, answer[:300]  # the upstream names the thread it did not find
    assert answers[3].startswith(b"200 "), answers[3][:100]


@pytest.mark.parametrize("raw", ["%0A", "a%0Db", "x%0A%0Dy", "%0A%F2%9C%AB%9B%C3%81"])
async def test_a_path_with_an_encoded_line_break_is_forwarded_like_any_other(
        gateway: RunningGateway, fake_upstream: FakeAgentServer, http: aiohttp.ClientSession, raw: str) -> None:
    """A decoded path may hold CR or LF (%0A, %0D): the gateway's routes match it and forward it, so
    the upstream answers as it does directly, never aiohttp's own text/plain 404 made by the gateway
    (found by the long fuzz run against a real agent server)."""
    path = f"/assistants/{raw}?delete_threads=true"
    async with http.delete(URL(fake_upstream.url + path, encoded=True)) as r:
        direct = (r.status, r.headers.get("Content-Type"), await r.read())
    sent = fake_upstream.requests[-1]
    async with http.delete(URL(gateway.url + path, encoded=True)) as r:
        assert (r.status, r.headers.get("Content-Type"), await r.read()) == direct
    assert len(fake_upstream.requests) >= 2 and fake_upstream.requests[-1] == sent, "forwarded upstream"


async def test_a_thread_stream_of_a_thread_the_upstream_does_not_know_stores_nothing(
        make_gateway: Callable[..., Awaitable[RunningGateway]], fake_upstream: FakeAgentServer,
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The upstream answers the stream of a thread it does not know with 200 and heartbeats, forever.
    # Captured, each such join left an empty thread stream in the log, finished when its linger ran
    # out and kept until retention: any client could fill the log's metadata with made-up ids.
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"thread_linger": "100ms"}))
    known = await new_thread(http, gw)
    for tid in [str(uuid.uuid4()) for _ in range(5)] + [known]:
        async with http.get(f"{gw.url}/threads/{tid}/stream") as r:
            assert r.status == 200 and r.content_type == "text/event-stream", tid  # as the upstream answers
    for _ in range(100):  # the lingers run out (bounded)
        if not gw.gw.hub.live_count():
            break
        await asyncio.sleep(0.05)
    held = [m.thread_id for m in await gw.gw.log.streams()]
    assert held == [known], "only the thread the upstream knows is captured"


@pytest.mark.parametrize("refusal", [404, 500])
async def test_a_resume_the_upstream_then_refuses_is_not_counted_as_served(
        make_gateway: Callable[..., Awaitable[RunningGateway]], fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, refusal: int) -> None:
    """A thread stream held in the log but let go (nobody followed it for thread_linger) is opened again
    through a leg when a client resumes it. The resume was counted as a hit when its position was found,
    before the leg was asked for: an upstream that then refuses the thread (gone: 404; failing: 500) left
    a resume counted that served nothing."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"thread_linger": "100ms"}))
    tid = await new_thread(http, gw.url)
    following = await http.get(f"{gw.url}/threads/{tid}/stream")
    async with await stream_run(http, gw.url, tid, assistant="a", n=3) as r:
        await read_events(r)
    seen = await read_events(following, limit=2)
    following.close()
    key = f"default/thread/{tid}"
    for _ in range(200):  # let go once its linger is over
        if gw.gw.hub.live(key) is None:
            break
        await asyncio.sleep(0.02)
    assert gw.gw.hub.live(key) is None
    before = await by_label(http, gw.admin_url, "gateway_resumes_total", "outcome")
    fake_upstream.faults.status = refusal
    async with http.get(f"{gw.url}/threads/{tid}/stream", headers={"Last-Event-ID": seen[0].id or ""}) as r:
        assert r.status >= 400
    fake_upstream.faults.status = 0
    after = await by_label(http, gw.admin_url, "gateway_resumes_total", "outcome")
    assert after == before, "a resume that served nothing is not counted"
    async with http.get(f"{gw.url}/threads/{tid}/stream", headers={"Last-Event-ID": seen[0].id or ""}) as r:
        assert r.status == 200
        await read_events(r, limit=1)
    after = await by_label(http, gw.admin_url, "gateway_resumes_total", "outcome")
    assert after["hit"] == before["hit"] + 1, "a resume served is counted, once"
