"""A small fake Agent Server for precise fault injection (a real aiohttp server on 127.0.0.1).

It speaks the parts of the Agent Server API the gateway treats specially, on
the wire the way langgraph-api does (CRLF frames, ``metadata`` first, no end
event, ``: heartbeat`` comments), plus an ``/echo`` endpoint for the proxy
tests. Runs execute in the background whether or not anyone listens, like
``on_disconnect: continue``.

By default it has **no** resume support: a join gets only what comes after it.
A run created with ``"stream_resumable": true`` gets ids (``<n>-0``) and a
replay buffer, for the re-attach tests. Like the real server, a join that
replays re-sends the last replayed event, same id, as its first live event.
The thread stream numbers every event; with Last-Event-ID (``-``, ``0`` or an id) it first replays
the thread's stored events of resumable runs after it, as the real server does.

``FakeAgentServer.behaviour`` makes it act like the other servers users run
(one that ignores ``stream_resumable``, one whose replay buffer has expired);
switches on ``FakeAgentServer.faults`` inject failures into the next requests.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler


@dataclass
class Behaviour:
    """How this server differs from a current LangGraph server with resumable runs."""

    # Older LangGraph versions, Aegra, custom servers: no ``id:`` lines, a join gets the live tail only.
    ignore_resumable: bool = False
    # A re-join with Last-Event-ID gets no replay (the buffer expired), only live events (with ids).
    replay_expired: bool = False
    # The real server's replay/live race: the last replayed event comes again as the first live one.
    resend_last_on_join: bool = True
    # A join of a run it does not know: the in-memory server says 200 and an error event; others 404.
    join_unknown_status: int = 200
    # Custom servers: a run's stream does not begin with LangGraph's ``metadata`` event.
    no_run_metadata: bool = False
    # Behind a compressing proxy (nginx with ``gzip_types text/event-stream``): an event stream is
    # gzip-encoded whenever the request accepts gzip (the real server itself never encodes).
    gzip_streams: bool = False
    # An SSE server that sets the client's reconnection time in a block of its own (``retry:``)
    # before every live event; its replay buffer holds the events alone.
    retry_blocks: bool = False
    # A proxy that compresses event streams whatever the request accepts (Accept-Encoding: identity too).
    gzip_streams_always: bool = False
    # A background run's answer names the run in its Content-Location (the real server's); off: only
    # its JSON does (a proxy in front that drops the header).
    background_content_location: bool = True
    # Behind a proxy that compresses JSON: a background run's answer is gzip-encoded when accepted.
    gzip_json: bool = False
    # A resumable run's ids as the in-memory runtime makes them: the millisecond (``<ms>-0``), the
    # same for every event of one millisecond (off: one number per event, which never repeats).
    ms_ids: bool = False


@dataclass
class Faults:
    hang: float = 0.0  # seconds to wait before answering any API request
    status: int = 0  # answer every API request with this status (e.g. 500)
    cut_after: int = -1  # the next stream response: drop the TCP connection after this many events (once)
    cuts: list[int] = field(default_factory=list)  # like cut_after, one entry per following stream response
    cut_mid_event: bool = False  # a cut sends the first half of the next event before the reset
    id_pad: int = 0  # bytes of padding on every event id of resumable runs (a server with huge ids)
    # The next stream response: after this many events, half of the next one, then silence with the
    # connection open (no heartbeat, no close), as a stalled server or a dead network path looks.
    stall_after: int = -1
    cancel_failures: int = 0  # the next this many cancel requests answer 503 (a blip of the server)
    slow_body: float = 0.0  # /echo: seconds between body chunks
    close_mid_body: bool = False  # /echo: send half the body, then drop the connection
    api_key: str | None = None  # when set, every API request needs this X-Api-Key (else 401)
    # (header, value): every API request must carry it (else 403), like an upstream whose
    # custom auth reads a header of its own (X-User) rather than Authorization or a key.
    require_header: tuple[str, str] | None = None
    # The next this many API requests find their connection closed (a reset, no answer): a kept-alive
    # connection whose idle timeout fired on the server as the request went out on it.
    drop_requests: int = 0


@dataclass
class Run:
    run_id: str
    thread_id: str | None
    n: int
    delay: float
    resumable: bool
    fail: bool = False
    pad: int = 0  # bytes of padding per custom event (to fill socket buffers)
    repeat: int = 1  # each custom event sent this many times back to back (a token streamed twice)
    pad_at: tuple[int, ...] | None = None  # only these custom events are padded (None: all of them)
    hold_at: tuple[int, ...] = ()  # before these custom events the run waits for ``resume`` (set by the test)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "pending"
    events: list[tuple[str | None, bytes]] = field(default_factory=list)  # (upstream id, frame)
    listeners: list[asyncio.Queue[bytes | None]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class _Untyped(web.Response):
    """aiohttp always sends a Content-Type with a body; uvicorn does not when the app sets none."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Content-Type", None)


def _indexes(raw: Any) -> tuple[int, ...] | None:
    """A run input's list of event indexes (None when not given)."""
    return tuple(int(i) for i in raw) if raw is not None else None


def _cors(request: web.Request, headers: Any) -> None:
    """The CORS headers langgraph-api's Starlette middleware adds: Allow-Origin and Expose-Headers to a
    request with an Origin, and ``Origin`` added to ``Vary`` on every answer, with an Origin or not."""
    if "Origin" in request.headers:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Expose-Headers"] = "x-pagination-total, x-pagination-next, content-location"
    headers["Vary"] = ", ".join([*headers.getall("Vary", []), "Origin"])


# The Last-Event-ID the real server's thread stream takes (anything else is 422).
_STREAM_ID = re.compile(r"^(?:[0-9]+(?:-(?:[0-9]+|\*))?|-)$")


def _invalid(doc: dict[str, Any]) -> web.Response | None:
    """A run request the server refuses, with jsonschema's message quoting the body it got, as
    langgraph-api answers: no assistant_id, or an input that is no object."""
    if "assistant_id" not in doc:
        what = "'assistant_id' is a required property"
    elif not isinstance(doc.get("input", {}), dict):
        what = f"{orjson.dumps(doc['input']).decode()} is not of type 'object'"
    else:
        return None
    return web.json_response({"detail": what + "\n\nOn instance:\n    " + orjson.dumps(doc).decode()}, status=422)


def _frame(event: str, data: object, uid: str | None) -> bytes:
    out = b"event: " + event.encode() + b"\r\ndata: " + orjson.dumps(data) + b"\r\n"
    if uid is not None:
        out += b"id: " + uid.encode() + b"\r\n"
    return out + b"\r\n"


class FakeAgentServer:
    def __init__(self) -> None:
        self.faults = Faults()
        self.behaviour = Behaviour()
        self.runs: dict[str, Run] = {}
        self.thread_listeners: dict[str, list[asyncio.Queue[bytes | None]]] = {}
        # A thread's events of resumable runs, as its stream replays them: (id, frame).
        self.thread_events: dict[str, list[tuple[str, bytes]]] = {}
        # The threads it knows: created, or run on (the fake creates a run on any thread, kinder than
        # the real server's 404); GET of any other is the real server's 404.
        self.threads: set[str] = set()
        self._thread_seq = 0
        self.requests: list[tuple[str, str]] = []  # (method, path_qs) of every request but health checks
        self.ws_closed: list[int | None] = []  # close codes of /ws/echo sockets, as the server saw them
        self.ws_answers: list[int | None] = []  # the peer's answer to each close the server sent
        self.ws_headers: list[dict[str, str]] = []
        self.heartbeat = 5.0
        # The handler task of every thread stream being served: its queue, and whether it waits for a frame.
        self._thread_streams: dict[asyncio.Task[Any], tuple[asyncio.Queue[bytes | None], bool]] = {}
        # The v3 session of a thread, scripted: (method, data JSON without ``seq``) of each event it holds,
        # replayed from the start on every connection with seqs from 1, as the real server does. The
        # JSON is sent as the test wrote it: a server other than langgraph-api's (JSON.stringify in a
        # JS server) escapes a lone surrogate as ``\ud800`` where langgraph-api writes ``?``.
        # A script entry that is bytes alone is a whole frame sent as it is, neither numbered nor
        # changed, and by the first connection that gets to it only, never replayed (what
        # langgraph-api sends outside the protocol: the error event of its SSE layer).
        self.session_events: dict[str, list[tuple[str, bytes] | bytes]] = {}
        self._session_frames_sent: set[tuple[str, int]] = set()  # (thread, index) of each such frame sent
        # A frame each connection to the thread's session sends after its replay, then ends: as
        # langgraph-api when its producer raises on an event of the thread's history, every time.
        self.session_failure: dict[str, bytes] = {}
        self.session_legs = 0  # session connections served
        self.session_end_after_replay = 0  # the next this many session connections end after their replay
        self.session_drops = 0  # bumped: every open session connection ends (a connection dropped upstream)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.name = "fake"
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # --- server lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_mw])
        r = app.router
        r.add_get("/ok", self.ok)
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_post("/threads", self.create_thread)
        r.add_get("/threads/{tid}", self.get_thread)
        r.add_post("/threads/{tid}/runs/stream", self.create_stream)
        r.add_post("/runs/stream", self.create_stream)
        r.add_post("/threads/{tid}/runs", self.create_background)
        r.add_get("/threads/{tid}/runs/{rid}/stream", self.join)
        r.add_get("/threads/{tid}/runs/{rid}", self.get_run)
        r.add_post("/threads/{tid}/runs/{rid}/cancel", self.cancel)
        r.add_get("/threads/{tid}/stream", self.thread_stream)
        r.add_get("/redirect", self.redirect)
        r.add_get("/big", self.big)
        r.add_get("/notype", self.notype)
        r.add_get("/ws/echo", self.ws_echo)
        r.add_get("/ws/deaf", self.ws_deaf)
        r.add_post("/threads/{tid}/commands", self.command)
        r.add_post("/threads/{tid}/stream/events", self.session_stream)
        return app

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> FakeAgentServer:
        """Serve on 127.0.0.1 (``ssl_context``: over TLS, an https:// upstream)."""
        # Header limits as generous as uvicorn's (it took a 200 KB header line and 300 headers).
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=0.5,
                                    max_line_size=1 << 20, max_field_size=1 << 20, max_headers=1000)
        await self.runner.setup()
        self.scheme = "https" if ssl_context is not None else "http"
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        # Every run's last frames are queued to its listeners (and the threads' listeners) ...
        await asyncio.gather(*tasks, return_exceptions=True)
        # ... and a thread stream never ends by itself: the runner's shutdown would wait its whole
        # grace for it, then cancel it. Cancel it as soon as it has written what was queued to it
        # (it then waits for its next frame), so the client sees the same cut, without the wait.
        deadline = asyncio.get_running_loop().time() + 0.5
        while asyncio.get_running_loop().time() < deadline and any(
                not idle or not q.empty() for q, idle in self._thread_streams.values()):
            await asyncio.sleep(0.001)
        for task in list(self._thread_streams):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/runs"):
            # uvicorn runs a plain request to its end when its client hangs up: the real server
            # creates a background run all the same (read off langgraph dev). aiohttp would cancel it,
            # and fail a body read after the hang-up: uvicorn has the body queued by then.
            await request.read()
            return await asyncio.shield(self._answer(request, handler))
        return await self._answer(request, handler)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/ok":
            self.requests.append((request.method, request.path_qs))
            if self.faults.drop_requests > 0 and request.transport is not None:
                self.faults.drop_requests -= 1
                request.transport.abort()
                return web.Response()  # written nowhere: the connection is gone
            if self.faults.hang:
                await asyncio.sleep(self.faults.hang)
            if self.faults.status:
                return web.json_response({"detail": "injected failure"}, status=self.faults.status)
            if self.faults.api_key is not None and request.headers.get("X-Api-Key") != self.faults.api_key:
                return web.json_response({"detail": "Invalid API key"}, status=401)
            if self.faults.require_header is not None:
                name, value = self.faults.require_header
                if request.headers.get(name) != value:
                    return web.json_response({"detail": "Forbidden"}, status=403)
        resp = await handler(request)
        if not resp.prepared:
            _cors(request, resp.headers)
        return resp

    async def wait_status(self, run_id: str, status: str, timeout: float = 5.0) -> str:
        """The run's status once it is ``status``, or whatever it is after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.runs[run_id].status != status and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.runs[run_id].status

    # --- plain endpoints ---------------------------------------------------------------------

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        doc = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.rel_url.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_b64": base64.b64encode(body).decode(),
        }
        payload = orjson.dumps(doc)
        status = int(request.query.get("status", "200"))
        resp = web.StreamResponse(status=status, headers={
            "Content-Type": "application/json", "X-Upstream": "fake", "Connection": "keep-alive, X-Hop",
            "X-Hop": "should-not-pass", "Content-Length": str(len(payload)),
            "Location": request.query.get("location", "/threads/t1/runs/r1"),
            "Content-Location": request.query.get("content_location", "/threads/t1"),
        })
        await resp.prepare(request)
        if self.faults.close_mid_body:
            await resp.write(payload[: len(payload) // 2])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if self.faults.slow_body:
            for i in range(0, len(payload), 16):
                await resp.write(payload[i:i + 16])
                await asyncio.sleep(self.faults.slow_body)
        else:
            await resp.write(payload)
        await resp.write_eof()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        """``size`` bytes of body, written as fast as the client reads them (a large download)."""
        size = int(request.query.get("size", "1048576"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        await resp.prepare(request)
        chunk = b"x" * 65536
        left = size
        while left > 0:
            await resp.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        await resp.write_eof()
        return resp

    async def ws_echo(self, request: web.Request) -> web.WebSocketResponse:
        """A WebSocket that echoes; ``close:<code>`` closes it with that code (any: the server may send
        one no endpoint may), ``burst:<n>`` sends n messages of 64 KiB at once (as fast as the reader
        takes them), ``big:<n>`` one message of n bytes, ``drop`` ends the connection without a
        close frame."""
        self.ws_headers.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("echo.v1",))
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.CLOSE:  # the peer's code (ws.close_code is the one sent back)
                self.ws_closed.append(int(msg.data))
                break
            if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                self.ws_closed.append(None)
                break
            if msg.type == WSMsgType.TEXT and msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"asked to")
                self.ws_answers.append(ws.close_code)  # after close(): the code the peer answered with
            elif msg.type == WSMsgType.TEXT and msg.data.startswith("big:"):
                await ws.send_bytes(b"x" * int(msg.data[4:]))
            elif msg.type == WSMsgType.TEXT and msg.data == "drop":
                assert request.transport is not None
                request.transport.close()
                self.ws_closed.append(None)
                break
            elif msg.type == WSMsgType.TEXT and msg.data.startswith("burst:"):
                for i in range(int(msg.data[6:])):
                    await ws.send_bytes(i.to_bytes(4, "big") + b"x" * 65532)
            elif msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def ws_deaf(self, request: web.Request) -> web.WebSocketResponse:
        """A WebSocket that answers nothing, not even pings: a hung server (its loop blocked) or a
        host gone behind a network path that drops everything looks so, the connection still open."""
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for _msg in ws:
            pass
        return ws

    async def command(self, request: web.Request) -> web.Response:
        """A v3 protocol command: refused with 403 and a ``detail`` (as the server's auth refuses a
        request) for ``Authorization: Bearer forbidden``; else answered with an empty success."""
        doc = await request.json()
        if request.headers.get("Authorization") == "Bearer forbidden":
            return web.json_response({"detail": "Forbidden"}, status=403)
        return web.json_response({"type": "success", "id": doc.get("id"), "result": {}})

    async def notype(self, request: web.Request) -> web.Response:
        """A body with no Content-Type, as langgraph-api answers some 422s."""
        return _Untyped(status=422, body=b"Namespace label '' must be a non-empty string without periods")

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": f"{self.url}/echo/landed"})

    async def create_thread(self, request: web.Request) -> web.Response:
        await request.read()  # the real server parses the whole body before it answers
        tid = str(uuid.uuid4())
        self.threads.add(tid)
        return web.json_response({"thread_id": tid, "status": "idle"})

    async def get_thread(self, request: web.Request) -> web.Response:
        tid = request.match_info["tid"]
        if tid not in self.threads:
            return web.json_response({"detail": f"Thread with ID {tid} not found"}, status=404)
        return web.json_response({"thread_id": tid, "status": "idle"})

    def _new_run(self, tid: str | None, doc: dict[str, Any]) -> Run:
        inp = doc.get("input") or {}
        resumable = doc.get("stream_resumable") is True and not self.behaviour.ignore_resumable
        run = Run(run_id=str(uuid.uuid4()), thread_id=tid, n=int(inp.get("n", 3)),
                  delay=float(inp.get("delay", 0.0)), resumable=resumable,
                  fail=doc.get("assistant_id") == "fail", pad=int(inp.get("pad", 0)),
                  repeat=int(inp.get("repeat", 1)), pad_at=_indexes(inp.get("pad_at")),
                  hold_at=_indexes(inp.get("hold_at")) or ())
        self.runs[run.run_id] = run
        if tid is not None:
            self.threads.add(tid)
        run.task = asyncio.create_task(self._execute(run))
        return run

    async def _execute(self, run: Run) -> None:
        run.status = "running"
        if not self.behaviour.no_run_metadata:
            self._emit(run, "metadata", {"run_id": run.run_id, "attempt": 1})
        try:
            for i in range(run.n):
                if i in run.hold_at:
                    await run.resume.wait()
                    run.resume.clear()  # one hold let go per set
                if run.delay:
                    await asyncio.sleep(run.delay)
                elif i % 64 == 0:
                    await asyncio.sleep(0)
                for _ in range(run.repeat):
                    self._emit(run, "custom", {"i": i, "of": run.n, "pad": "x" * run.pad}
                               if run.pad and (run.pad_at is None or i in run.pad_at) else {"i": i, "of": run.n})
            if run.fail:
                self._emit(run, "error", {"error": "ValueError", "message": "boom"}, store=False)
                run.status = "error"
            else:
                run.status = "success"
        except asyncio.CancelledError:
            run.status = "interrupted"
        finally:
            for q in run.listeners:
                q.put_nowait(None)
            self._thread_emit(run, "metadata", {"status": "run_done", "run_id": run.run_id})
            run.done.set()

    def _emit(self, run: Run, event: str, data: object, store: bool = True) -> None:
        number = int(time.time() * 1000) if self.behaviour.ms_ids else 1000 + len(run.events)
        uid = f"{number}-0" + "x" * self.faults.id_pad if run.resumable else None
        frame = _frame(event, data, uid)
        if store:
            run.events.append((uid, frame))
        live = b"retry: 3000\r\n\r\n" + frame if self.behaviour.retry_blocks else frame
        for q in run.listeners:
            q.put_nowait(live)
        self._thread_emit(run, event, data, store)

    def _thread_emit(self, run: Run, event: str, data: object, store: bool = True) -> None:
        if run.thread_id is None:
            return
        # Every thread stream event has an id (one sequence for the server, as a timestamp is);
        # only those of resumable runs are kept for replay, and never a run's final error.
        self._thread_seq += 1
        uid = f"{2_000_000_000 + self._thread_seq}-0"
        frame = _frame(event, data, uid)
        if run.resumable and store:
            self.thread_events.setdefault(run.thread_id, []).append((uid, frame))
        for q in self.thread_listeners.get(run.thread_id, []):
            q.put_nowait(frame)

    # --- streaming endpoints -----------------------------------------------------------------

    async def _stream(self, request: web.Request, run: Run, replay: list[bytes]) -> web.StreamResponse:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        if run.done.is_set():
            q.put_nowait(None)
        else:
            run.listeners.append(q)
        base = f"/threads/{run.thread_id}/runs/{run.run_id}" if run.thread_id else f"/runs/{run.run_id}"
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no", "Location": base + "/stream", "Content-Location": base,
        })
        _cors(request, resp.headers)
        self._maybe_compress(request, resp)
        await resp.prepare(request)
        sent = 0
        cut = self._next_cut()
        stall, self.faults.stall_after = self.faults.stall_after, -1
        try:
            for frame in replay:
                await resp.write(frame)
            if replay and self.behaviour.resend_last_on_join:
                await resp.write(replay[-1])
            async for frame in self._frames(q, resp):
                if stall >= 0 and sent >= stall:
                    await resp.write(frame[: len(frame) // 2])
                    await asyncio.Event().wait()  # until the client gives up on this connection
                if cut >= 0 and sent >= cut:
                    if self.faults.cut_mid_event:
                        await resp.write(frame[: len(frame) // 2])
                        await asyncio.sleep(0.01)
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await resp.write(frame)
                sent += 1
            await resp.write_eof()
        finally:
            if q in run.listeners:
                run.listeners.remove(q)
        return resp

    def _maybe_compress(self, request: web.Request, resp: web.StreamResponse) -> None:
        accepts = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        if self.behaviour.gzip_streams_always or (self.behaviour.gzip_streams and accepts):
            resp.enable_compression(web.ContentCoding.gzip)

    def _next_cut(self) -> int:
        if self.faults.cuts:
            return self.faults.cuts.pop(0)
        cut, self.faults.cut_after = self.faults.cut_after, -1
        return cut

    async def create_stream(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        if (refused := _invalid(doc)) is not None:
            return refused
        if doc.get("multitask_strategy") == "reject":
            return web.json_response({"detail": "Thread is already running a task."}, status=409)
        run = self._new_run(request.match_info.get("tid"), doc)
        return await self._stream(request, run, [])

    async def create_background(self, request: web.Request) -> web.Response:
        doc = await request.json()
        if (refused := _invalid(doc)) is not None:
            return refused
        run = self._new_run(request.match_info["tid"], doc)
        resp = web.json_response({"run_id": run.run_id, "thread_id": run.thread_id, "status": "pending",
                                  "kwargs": {"resumable": run.resumable}})
        if self.behaviour.background_content_location:
            resp.headers["Content-Location"] = f"/threads/{run.thread_id}/runs/{run.run_id}"
        if self.behaviour.gzip_json and "gzip" in request.headers.get("Accept-Encoding", "").lower():
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    async def join(self, request: web.Request) -> web.StreamResponse:
        run = self.runs.get(request.match_info["rid"])
        if run is None and self.behaviour.join_unknown_status != 200:
            return web.json_response({"detail": "Run not found"}, status=self.behaviour.join_unknown_status)
        if run is None:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_frame("error", {"error": "HTTPException", "message": "404: Run not found"}, None))
            await resp.write_eof()
            return resp
        replay: list[bytes] = []
        last = request.headers.get("Last-Event-ID")
        if run.resumable and last and not self.behaviour.replay_expired:
            after = -1 if last == "-1" else int(last.split("-")[0])
            replay = [f for uid, f in run.events if uid is not None and int(uid.split("-")[0]) > after]
        return await self._stream(request, run, replay)

    async def get_run(self, request: web.Request) -> web.Response:
        run = self.runs.get(request.match_info["rid"])
        if run is None:
            return web.json_response({"detail": "Run not found"}, status=404)
        return web.json_response({"run_id": run.run_id, "thread_id": run.thread_id, "status": run.status})

    async def cancel(self, request: web.Request) -> web.Response:
        if self.faults.cancel_failures > 0:
            self.faults.cancel_failures -= 1
            return web.json_response({"detail": "Service Unavailable"}, status=503)
        run = self.runs.get(request.match_info["rid"])
        if run is None or run.task is None or run.done.is_set():
            return web.json_response({"detail": "No runs found to cancel."}, status=404)
        run.task.cancel()
        return web.Response(status=202)

    async def session_stream(self, request: web.Request) -> web.StreamResponse:
        """The v3 session's events: what is scripted for the thread from the start, then what is
        scripted later as it comes, with heartbeats, the connection open (or ended, as one dropped
        upstream: after the replay, ``session_end_after_replay``, or when ``session_drops`` moves)."""
        tid = request.match_info["tid"]
        self.session_legs += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        drops, sent, beat = self.session_drops, 0, loop.time()
        while True:  # what is scripted, and each event scripted later as it comes (live)
            script = self.session_events.get(tid, [])
            for seq, entry in enumerate(script[sent:], sent + 1):
                if isinstance(entry, bytes):
                    if (tid, seq) not in self._session_frames_sent:
                        self._session_frames_sent.add((tid, seq))
                        await resp.write(entry)
                    continue
                method, data = entry
                await resp.write(b"event: %s\r\ndata: {\"seq\":%d,%s\r\nid: %d\r\n\r\n"
                                 % (method.encode(), seq, data[1:], seq))
            sent = len(script)
            if tid in self.session_failure:
                await resp.write(self.session_failure[tid])
                return resp
            if self.session_end_after_replay > 0:
                self.session_end_after_replay -= 1
                return resp
            if self.session_drops != drops:
                return resp
            await asyncio.sleep(0.02)
            if loop.time() - beat >= self.heartbeat:
                beat = loop.time()
                await resp.write(b": heartbeat\r\n\r\n")

    async def thread_stream(self, request: web.Request) -> web.StreamResponse:
        tid = request.match_info["tid"]
        last = request.headers.get("Last-Event-ID") or None
        if last is not None and not _STREAM_ID.match(last):
            return web.json_response({"detail": "Invalid last-event-id: must be a valid Redis stream ID"}, status=422)
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        listeners = self.thread_listeners.setdefault(tid, [])
        listeners.append(q)
        # What is stored after the id, compared as strings as the real server does.
        replay = [] if last is None else [f for uid, f in self.thread_events.get(tid, []) if uid > last]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        _cors(request, resp.headers)
        self._maybe_compress(request, resp)
        await resp.prepare(request)
        me = asyncio.current_task()
        assert me is not None
        try:
            for frame in replay:
                await resp.write(frame)
            async for frame in self._frames(q, resp, me):
                await resp.write(frame)
        finally:
            listeners.remove(q)
            self._thread_streams.pop(me, None)
        return resp

    async def _frames(self, q: asyncio.Queue[bytes | None], resp: web.StreamResponse,
                      thread_stream: asyncio.Task[Any] | None = None) -> AsyncIterator[bytes]:
        """Frames from a listener queue until None, with heartbeat comments while idle (as langgraph-api)."""
        while True:
            if thread_stream is not None:
                self._thread_streams[thread_stream] = (q, True)
            try:
                frame = await asyncio.wait_for(q.get(), self.heartbeat)
            except asyncio.TimeoutError:
                frame = b": heartbeat\r\n\r\n"
                if thread_stream is not None:
                    self._thread_streams[thread_stream] = (q, False)
                await resp.write(frame)
                continue
            if thread_stream is not None:
                self._thread_streams[thread_stream] = (q, False)
            if frame is None:
                return
            yield frame
