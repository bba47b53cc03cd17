"""The streaming legs' own HTTP/1.1 client (``gateway.streamclient``), against a raw socket server
that writes exactly the bytes each test scripts: every byte of a body handed on in order however
the reads split it, what came with the head included; a broken, malformed or silent body never
taken for a clean end; kept-alive connections reused only when whole."""

from __future__ import annotations

import asyncio
import gc
import random
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.streamclient import MAX_SPARES, ConnectFailed, LegResponse, StreamClient
from gateway.upstream import Replica, request_url

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback server whose connections run ``script``; it keeps what each request's head was."""

    script: Script | None = None
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    url: URL = URL()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            assert self.script is not None
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    srv = RawServer()
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    yield srv
    server.close()


async def read_head(srv: RawServer, reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    srv.heads.append(head)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + (await reader.readexactly(length) if length else b"")


def chunked(parts: list[bytes], *, ext: bool = False, trailers: bytes = b"") -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=y" if ext else b"", p) for p in parts)
    return out + b"0\r\n" + trailers + b"\r\n"


HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENTS = [b"event: values\ndata: {\"n\": %d}\n\n" % i for i in range(20)]


async def open_leg(client: StreamClient, srv: RawServer, *, path: str = "/s", method: str = "GET",
                   body: bytes | None = None, read_timeout: float = 5.0) -> LegResponse:
    return await client.request(method, srv.url.with_path(path), {"Accept": "text/event-stream"}, body,
                                connect_timeout=2.0, read_timeout=read_timeout, on_release=lambda: None)


async def capture(resp: LegResponse) -> list[bytes]:
    got: list[bytes] = []
    with resp.attach(got.append):
        await resp.end()
    return got


@pytest.mark.parametrize("split", ["whole", "byte by byte", "random"])
async def test_every_byte_of_a_chunked_body_is_handed_on_in_order_however_the_reads_split_it(
        raw: RawServer, split: str) -> None:
    # The first ten as chunks with extensions, then the rest; the terminator once, with a trailer.
    wire = HEAD_CHUNKED + chunked(EVENTS[:10], ext=True)[:-5] + chunked(EVENTS[10:], trailers=b"X-T: 1\r\n")
    rng = random.Random(7)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        if split == "whole":
            writer.write(wire)
        else:
            pos = 0
            while pos < len(wire):
                step = 1 if split == "byte by byte" else rng.randint(1, 40)
                writer.write(wire[pos:pos + step])
                await writer.drain()
                await asyncio.sleep(0)
                pos += step
        await writer.drain()
        await reader.read()  # kept alive until the client lets go

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    await asyncio.sleep(0.05)  # some of the body waits for the capture to attach
    assert b"".join(await capture(resp)) == b"".join(EVENTS)
    resp.release()
    client.close()


async def test_a_sized_and_a_close_delimited_body_are_read_whole(raw: RawServer) -> None:
    body = b'{"detail": "not an event stream"}'

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await read_head(raw, reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body[:10])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(body[10:])
        await writer.drain()
        writer.close()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    assert (resp.status, resp.reason) == (404, "Not Found")
    assert await resp.content.read(5) == body[:5]
    assert await resp.content.read() == body[5:]
    resp.release()  # read whole and kept alive: the next request goes on the same connection
    resp = await open_leg(client, raw)
    assert b"".join([c async for c in resp.content.iter_any()]) == body
    resp.release()
    assert raw.connections == 1
    client.close()


@pytest.mark.parametrize("cut_at", [0, 1, 3, 5, 40])
async def test_a_body_cut_mid_chunk_ends_in_an_error_never_a_clean_end(raw: RawServer, cut_at: int) -> None:
    wire = chunked(EVENTS[:3])
    cut = len(chunked(EVENTS[:2])) - 5 + cut_at  # inside the third chunk's size line, body or CRLF

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + wire[:cut])
        await writer.drain()
        writer.transport.abort()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    got: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError), resp.attach(got.append):
        await resp.end()
    assert b"".join(EVENTS[:2]) == b"".join(got)[:len(b"".join(EVENTS[:2]))], "what came before the cut is handed on"
    resp.release()
    client.close()


@pytest.mark.parametrize("bad", [b"zz\r\n", b"5\r\nabcdeXY", b"-1\r\n", b"1" * 2000])
async def test_a_malformed_chunked_body_is_an_error(raw: RawServer, bad: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5] + bad)
        await reader.read()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    with pytest.raises(aiohttp.ClientPayloadError, match="malformed chunked body"):
        await capture(resp)
    resp.release()
    client.close()


@pytest.mark.parametrize("head", [b"HTTP/1.1 2000 OK\r\n\r\n", b"SPDY 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000])
async def test_a_malformed_or_oversized_head_is_an_error(raw: RawServer, head: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(head)
        await reader.read()

    raw.script = script
    client = StreamClient()
    with pytest.raises(aiohttp.ClientPayloadError):
        await open_leg(client, raw)
    client.close()


async def test_informational_answers_before_the_real_one_are_skipped(raw: RawServer) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                     + HEAD_CHUNKED + chunked(EVENTS[:2]))
        await reader.read()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    assert resp.status == 200 and "Link" not in resp.headers
    assert b"".join(await capture(resp)) == b"".join(EVENTS[:2])
    resp.release()
    client.close()


async def test_the_idle_check_right_after_a_resume_does_not_count_the_pause(raw: RawServer) -> None:
    """Paused by the gateway for longer than a read timeout, then resumed: the upstream's silence
    counts from the resume. The leg's idle check can come right after it (CI met that race in
    the test below); it must not see the pause as silence."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5])
        await reader.read()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw, read_timeout=0.2)
    with resp.attach(lambda _data: None):
        resume = resp.pause()
        await asyncio.sleep(0.5)
        resume()
        conn = resp._conn
        conn._check_idle()  # the check that comes next, at once
        assert conn.exc is None
    resp.close()
    client.close()


async def test_a_silent_upstream_times_out_but_a_leg_the_gateway_paused_does_not(raw: RawServer) -> None:
    go = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5])
        await go.wait()
        writer.write(chunked(EVENTS[1:2]))
        await reader.read()

    raw.script = script
    client = StreamClient()
    # Paused by the capture (its log is behind) for three read timeouts: not the upstream's silence.
    resp = await open_leg(client, raw, read_timeout=0.2)
    got: list[bytes] = []
    with resp.attach(got.append):
        resume = resp.pause()
        await asyncio.sleep(0.6)
        go.set()
        resume()
        await resp.end()
    assert b"".join(got) == b"".join(EVENTS[:2])
    resp.release()
    client.close()
    # Not paused, and nothing comes after the first event: the leg ends with a read timeout.
    go.clear()
    client = StreamClient()
    resp = await open_leg(client, raw, read_timeout=0.2)
    with pytest.raises(aiohttp.SocketTimeoutError, match="sent nothing for 0.2 s"):
        await capture(resp)
    resp.release()
    client.close()


async def test_a_sink_that_fails_ends_the_leg_with_its_error_and_gets_nothing_more(raw: RawServer) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED)
        for e in EVENTS:
            writer.write(chunked([e])[:-5])
            await writer.drain()
            await asyncio.sleep(0.005)
        await reader.read()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    got: list[bytes] = []

    def sink(data: bytes) -> None:
        got.append(data)
        if len(got) == 3:
            raise RuntimeError("storage failed")

    with pytest.raises(RuntimeError, match="storage failed"), resp.attach(sink):
        await resp.end()
    await asyncio.sleep(0.05)
    assert len(got) == 3
    resp.release()
    client.close()


async def test_kept_alive_connections_are_reused_only_when_whole(raw: RawServer) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(raw, reader)
            if b"/close" in head:
                writer.write(HEAD_CHUNKED + chunked(EVENTS[:1]))
                await writer.drain()
                return  # the connection closes once the answer is out
            if b"/part" in head:
                writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5])
                continue  # the rest never comes
            writer.write(HEAD_CHUNKED + chunked(EVENTS[:2]))
            await writer.drain()

    raw.script = script
    client = StreamClient()
    for _ in range(3):
        resp = await open_leg(client, raw)
        await capture(resp)
        resp.release()
    assert raw.connections == 1
    resp = await open_leg(client, raw, path="/part")
    resp.release()  # let go before its body ended: that connection is closed, not reused
    resp = await open_leg(client, raw)
    await capture(resp)
    resp.release()
    assert raw.connections == 2
    resp = await open_leg(client, raw, path="/close")
    await capture(resp)
    resp.release()
    await asyncio.sleep(0.05)  # the upstream's close reaches the idle connection
    resp = await open_leg(client, raw)  # a new connection, not the closed one
    await capture(resp)
    resp.release()
    assert raw.connections == 3
    client.close()


async def test_streams_that_come_faster_than_connects_finish_find_a_connection_opened_ahead(raw: RawServer) -> None:
    loop = asyncio.get_running_loop()
    served_on: list[float] = []  # per request: when the server accepted the connection it came on
    unused = 0  # connections closed without carrying a request

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal unused
        accepted = loop.time()
        try:
            await read_head(raw, reader)
        except asyncio.IncompleteReadError:
            unused += 1
            return
        served_on.append(accepted)
        writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5])  # the body goes on
        await writer.drain()
        await reader.read()

    async def until(done: Callable[[], bool]) -> None:
        for _ in range(300):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not within 3 s")

    raw.script = script
    client = StreamClient(keepalive=0.5)
    quiet = [await open_leg(client, raw), await open_leg(client, raw)]
    await asyncio.sleep(0.1)
    assert raw.connections == 2, "one stream at a time, each while no connect is under way: no spare"
    burst = await asyncio.gather(*(open_leg(client, raw) for _ in range(8)))
    await until(lambda: raw.connections > 10)  # spares, connected ahead while the burst connected
    assert raw.connections <= 10 + MAX_SPARES
    asked_at = loop.time()
    late = await open_leg(client, raw)
    assert served_on[-1] < asked_at, "the next stream went out on a connection made before it came"
    await until(lambda: unused > 0)  # spares nobody takes close as idle connections do
    for resp in (*quiet, *burst, late):
        resp.close()
    client.close()


async def test_the_request_carries_host_length_and_the_urls_credentials(raw: RawServer) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + chunked([]))
        await reader.read()

    raw.script = script
    client = StreamClient()
    url = raw.url.with_user("svc").with_password("pw").with_path("/threads/t/runs/stream").with_query("a=1")
    resp = await client.request("POST", url, {"Authorization": "Bearer client", "X-Api-Key": "k"}, b'{"x": 1}',
                                connect_timeout=2.0, read_timeout=5.0, on_release=lambda: None)
    await capture(resp)
    resp.release()
    head = raw.heads[0].decode()
    assert head.startswith("POST /threads/t/runs/stream?a=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{raw.url.port}\r\n" in head and "Content-Length: 8\r\n" in head
    assert "Authorization: Basic c3ZjOnB3\r\n" in head and "Bearer" not in head
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", raw.url, {"X-Bad": "a\r\nInjected: 1"}, None,
                             connect_timeout=2.0, read_timeout=5.0, on_release=lambda: None)
    client.close()


async def test_no_connection_is_a_connect_failure_safe_to_try_elsewhere() -> None:
    client = StreamClient()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed):
        await client.request("GET", URL(f"http://127.0.0.1:{port}/"), {}, None,
                             connect_timeout=2.0, read_timeout=5.0, on_release=lambda: None)
    client.close()


async def test_a_disconnect_before_the_answer_is_a_server_disconnect(raw: RawServer) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)

    raw.script = script
    client = StreamClient()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await open_leg(client, raw, method="POST", body=b"{}")
    assert raw.connections == 1, "a POST is never sent twice"
    client.close()


async def test_an_https_upstream_is_verified_and_an_untrusted_one_refused(
        certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD_CHUNKED + chunked(EVENTS[:2]))
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/s")
    try:
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await StreamClient().request("GET", url, {}, None, connect_timeout=5.0, read_timeout=5.0,
                                         on_release=lambda: None)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the operator trusts it: OpenSSL's own variable
        client = StreamClient()
        resp = await client.request("GET", url, {}, None, connect_timeout=5.0, read_timeout=5.0,
                                    on_release=lambda: None)
        assert b"".join(await capture(resp)) == b"".join(EVENTS[:2])
        resp.release()
        client.close()
    finally:
        server.close()


async def test_a_leg_that_ends_while_the_capture_paused_it_leaves_a_connection_that_reads(raw: RawServer) -> None:
    """The capture pauses a leg whose log is behind; a leg can end in the very read that paused it.
    Its connection goes back to the pool, and the next request on it must not wait for ever."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(raw, reader)
            writer.write(HEAD_CHUNKED + chunked(EVENTS[:3]))  # the whole answer in one read
            await writer.drain()

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw, read_timeout=1.0)
    got: list[bytes] = []

    def sink(data: bytes) -> None:
        got.append(data)
        resp.pause()  # the log is behind; the leg is released before anyone resumes it

    with resp.attach(sink):
        await resp.end()
    resp.release()
    resp = await open_leg(client, raw, read_timeout=1.0)  # the same connection, reading again
    assert b"".join(await capture(resp)) == b"".join(EVENTS[:3])
    resp.release()
    assert raw.connections == 1
    client.close()


async def test_closing_an_answer_already_released_leaves_its_connection_to_the_next_request(raw: RawServer) -> None:
    """A capture cancelled after its leg ended (while its commits settle) closes that leg again; by
    then the connection may carry another stream's request, which must not be cut."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(raw, reader)
            writer.write(HEAD_CHUNKED + chunked(EVENTS[:1])[:-5])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(chunked(EVENTS[1:3]))
            await writer.drain()

    raw.script = script
    client = StreamClient()
    first = await open_leg(client, raw)
    await capture(first)
    first.release()
    second = await open_leg(client, raw)  # on the connection the first one gave back
    first.close()
    assert b"".join(await capture(second)) == b"".join(EVENTS[:3])
    second.release()
    assert raw.connections == 1
    client.close()


async def test_bytes_on_an_idle_pooled_connection_keep_it_from_being_reused(raw: RawServer) -> None:
    """An upstream that writes to a connection nobody asked anything on (a stray answer) must not
    have those bytes, or what follows them, taken for the next request's answer."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(raw, reader)
        writer.write(HEAD_CHUNKED + chunked(EVENTS[:1]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n")  # while the connection idles
        while True:
            await read_head(raw, reader)
            writer.write(b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n")

    raw.script = script
    client = StreamClient()
    resp = await open_leg(client, raw)
    await capture(resp)
    resp.release()
    await asyncio.sleep(0.2)
    raw.script = _answer_once  # a new connection gets the good answer
    resp = await open_leg(client, raw)
    assert resp.status == 200 and b"".join(await capture(resp)) == b"".join(EVENTS[:2])
    resp.release()
    assert raw.connections == 2
    client.close()


async def _answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(HEAD_CHUNKED + chunked(EVENTS[:2]))
    await writer.drain()
    await reader.read()


async def test_an_answer_dropped_without_a_release_gives_back_its_budget_slot(raw: RawServer) -> None:
    raw.script = _answer_once
    client = StreamClient()
    released: list[int] = []
    resp = await client.request("GET", raw.url, {}, None, connect_timeout=2.0, read_timeout=5.0,
                                on_release=lambda: released.append(1))
    del resp  # a path that forgot to release it
    gc.collect()
    assert released == [1]
    client.close()


def test_a_clients_authorization_is_kept_over_the_credentials_in_a_replicas_url() -> None:
    replica = Replica(URL("http://svc:pw@127.0.0.1:9/api"))
    assert request_url(replica, "/threads", {"X-Api-Key": "k"}).user == "svc"  # the gateway's own requests
    url = request_url(replica, "/threads?a=1", CIMultiDict({"authorization": "Bearer client"}))
    assert (url.user, url.password, url.raw_path_qs) == (None, None, "/api/threads?a=1")


def test_a_leg_reads_whole_on_uvloop() -> None:
    """uvloop's TCP transport is not a subclass of asyncio.Transport: the client must not care
    (it refused every leg on uvloop, a 500 for every streamed run, when it checked the class)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes]:
        srv = RawServer()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(srv, reader)
            writer.write(HEAD_CHUNKED + chunked(EVENTS))
            await writer.drain()
            await reader.read()

        srv.script = script
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        srv.url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            resp = await open_leg(StreamClient(), srv)
            assert resp.status == 200
            return await capture(resp)
        finally:
            server.close()

    got = uvloop.run(main())
    assert b"".join(got) == b"".join(EVENTS)
