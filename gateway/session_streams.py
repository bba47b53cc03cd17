"""Handlers for the v3 thread session's events (``/threads/{tid}/stream/events``): SSE on POST, a
WebSocket on GET, both served from the gateway's capture of the thread (``gateway.sessions``).

Over SSE the body's ``since`` is a position in the log (the ``seq`` the gateway sent), and the
stream never ends cleanly: the SDK takes a clean end for the end of its session, so the gateway
cuts when it cannot go on. Over the WebSocket, subscriptions are the gateway's (``since`` honoured
on subscribe as on reconnect, live events once per socket); every other command goes to the upstream's
``POST /threads/{tid}/commands`` with the client's headers, and its answer comes back on the socket.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import agentapi, sessions
from gateway.access import StreamHidden
from gateway.agentapi import Cursor, canonical_id, capturable
from gateway.errors import GatewayError
from gateway.eventlog import StorageError, StreamMeta
from gateway.follower import Follower, StreamCut, StreamGone
from gateway.hub import Attachment, Leg
from gateway.logs import STREAM_KEY
from gateway.responses import ClientSocket, close_reason, error_response, start_response
from gateway.streams import Reply, StreamHandlers
from gateway.upstream import Target

logger = logging.getLogger("gateway.session_streams")

_LEG_DROP = ("Last-Event-ID", "Content-Length", "Content-Type", "Accept")
# Client messages a session socket holds while it handles one (each within max_request_body); past
# them it stops reading until the worker catches up, as the upstream's server does.
_INBOX = 32


class SessionHandlers:
    def __init__(self, streams: StreamHandlers) -> None:
        self.streams = streams
        self.hub = streams.hub
        self.forwarder = streams.forwarder
        self._sockets: set[web.WebSocketResponse] = set()

    async def going_away(self) -> None:
        """The gateway stops: close every session socket with 1011, as one whose stream cannot go
        on here, so the SDK reconnects (to another replica, or here once back) where 1000 or 1001
        would end its session. A socket with a subscription gets it from its cut follower; one
        without was left to aiohttp's shutdown, held for the grace twice and dropped with no close
        frame."""
        await asyncio.gather(*(ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"the gateway is shutting down")
                               for ws in list(self._sockets)), return_exceptions=True)

    async def events(self, request: web.Request, target: Target, raw_tid: str) -> Reply:
        tid = canonical_id(raw_tid)
        upgrade = request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"
        if not capturable(tid):  # passed on as it is: a WebSocket as every other one the gateway proxies
            return await (self.forwarder.websocket(request, target) if upgrade else self.forwarder.forward(request, target))
        if request.method == "GET":
            return await (self._socket(request, target, tid) if upgrade else self.forwarder.forward(request, target))
        body = await self.forwarder.read_body(request, self.streams.cfg.max_request_body)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(400, "Invalid JSON body")
        try:
            flt = sessions.parse_filter(doc)
        except sessions.BadFilter as exc:
            return error_response(400, str(exc))
        since = sessions.resumed_since(sessions.parse_since(doc), request.headers.get("Last-Event-ID"))
        try:
            att, headers = await self._attach(request, target, tid, since)
        except StreamHidden:
            # The upstream no longer knows the thread and this is not who captured it: the log is
            # not theirs to read, and they get what the upstream itself gives them.
            return await self.forwarder.relay(request, target, await self.forwarder.open(request, target, data=body))
        if att.answer is not None:
            return await self.forwarder.relay(request, target, att.answer)
        assert att.follower is not None
        if att.leg is not None:
            headers.extend(agentapi.stream_headers())
        else:
            headers.update(agentapi.stream_headers())
        # The SDK reads no X-Gateway-Resume: what retention took past since is said in the stream, first.
        gap = sessions.resume_gap(since, att.held)
        first = b"" if gap is None else sessions.unsolicited(gap)
        return self.streams.send(request, att.follower, headers, flt.keep, sessions.frame, endless=True,
                                 first=first)  # a Reply

    async def _attach(self, request: web.Request, target: Target, tid: str, since: int | None,
                      ) -> tuple[Attachment, Any]:
        """The thread's session events: followed from the log after ``since`` (None: from the start),
        captured first if nobody does."""
        meta = agentapi.session_meta(target.pool.name, tid)
        request[STREAM_KEY] = meta.key
        cursor = Cursor("seq", since, str(since)) if since else Cursor("start", 0, "0")

        async def prepare() -> aiohttp.ClientResponse | None:
            self.streams.check_capacity(meta.key)
            return None

        async def position(request: web.Request, cursor: Cursor, held: StreamMeta, headers: Any) -> int:
            # As the upstream reads since: events after it, or everything. A since at or below the
            # capture's base is no id of this capture's (an upstream seq, or an earlier capture's),
            # but for one Redis still holds after coming back from a snapshot (``lost``: only those
            # above what it holds are gone). A since is a resume, counted as a run's Last-Event-ID
            # is (a subscription without one is a new session, not a resume).
            if cursor.kind != "seq" or held.lost(cursor.seq):
                if cursor.kind == "seq":
                    self.streams.tell_resume(request, cursor, "not_held", headers)
                return 0
            truncated = bool(held.first_seq) and cursor.seq < held.first_seq - 1
            self.streams.tell_resume(request, cursor, "truncated" if truncated else "hit", headers)
            return cursor.seq

        leg = Leg(self.forwarder.upstream_headers(request, drop=_LEG_DROP))
        att, headers = await self.streams.attach(request, target, meta, cursor, leg, prepare, position=position)
        if att.held is None and att.follower is not None and cursor.kind == "seq":
            # Nothing held, so ``position`` never ran: served from the start, a resume not held.
            self.streams.tell_resume(request, cursor, "not_held", headers)
        return att, headers

    # --- the WebSocket ----------------------------------------------------------------------------

    async def _socket(self, request: web.Request, target: Target, tid: str) -> web.StreamResponse:
        # A client's message is a command the gateway holds whole and sends upstream as a request
        # body: bounded as one (1009 past it), where the upstream's own socket stops at 16 MiB.
        ws = ClientSocket(max_msg_size=self.streams.cfg.max_request_body, heartbeat=self.hub.heartbeat)
        await start_response(request, ws)
        socket = _Socket(self, request, target, tid, ws)
        self._sockets.add(ws)
        try:
            await socket.serve()
        finally:
            self._sockets.discard(ws)
            await socket.close()
        return ws


@dataclass(frozen=True, slots=True)
class _Subscription:
    flt: sessions.Filter
    after: int  # its since: the events it gets from the socket's pump are later ones
    hidden: bool = False  # on a log that is not the client's: it gets nothing of it


class _Socket:
    """One client's WebSocket: its subscriptions, and commands passed to the upstream.

    As the upstream sends them, the socket's live events go out once each and in the log's order,
    however many subscriptions match: one follower of the log (the pump) sends what any of them
    matches. A new subscription first replays what it asks for (all of it, sent on the socket
    before or not, as the upstream's replay), from a follower of its own, up to what the pump has
    sent, while the pump waits; then the pump sends it the rest.
    """

    def __init__(self, handlers: SessionHandlers, request: web.Request, target: Target, tid: str,
                 ws: web.WebSocketResponse) -> None:
        self.handlers = handlers
        self.request = request
        self.target = target
        self.tid = tid
        self.ws = ws
        self.subs: dict[str, _Subscription] = {}
        self.applied = 0  # the highest seq sent on this socket (meta.applied_through_seq)
        self._send_lock = asyncio.Lock()
        self._order = asyncio.Lock()  # held by the pump while it sends a page, and by a replay
        self._pump: asyncio.Task[None] | None = None
        self._pumped = 0  # the pump's follower's position once its page was sent

    async def serve(self) -> None:
        """Read the socket all along, and handle its messages in order, one at a time, in a task of
        its own (as the upstream does). The upstream's server answers pings in its protocol layer,
        whatever its handler waits for; aiohttp answers them as the socket is read: read only between
        commands, a command that waited on a slow upstream, or a long replay, left the client's pings
        unanswered as long, and the SDK's keepalive drops a session whose pings go unanswered."""
        inbox: asyncio.Queue[aiohttp.WSMessage | None] = asyncio.Queue(_INBOX)
        worker = asyncio.create_task(self._work(inbox), name=f"session-socket:{self.tid}")
        try:
            async for msg in self.ws:
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    continue
                if not await _put(inbox, msg, worker) or msg.type == aiohttp.WSMsgType.BINARY:
                    break
            # What the client sent before it went is handled still, as the upstream handles it.
            if await _put(inbox, None, worker):
                await worker
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _work(self, inbox: asyncio.Queue[aiohttp.WSMessage | None]) -> None:
        try:
            while (msg := await inbox.get()) is not None:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    # Commands are JSON text; the upstream ends a socket that sends bytes. Ignored, the
                    # client would wait for an answer forever.
                    await self.ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=b"commands are JSON text")
                    return
                await self.handle(msg.data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client went while its command was answered
        except Exception:  # a task of the socket's own: logged, and the socket closed, never left silent
            logger.exception("a command on the session socket of thread %s failed", self.tid)
            await self.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"gateway error")

    async def handle(self, data: str) -> None:
        """One client message: a command, answered on the socket."""
        try:
            command = orjson.loads(data)
        except orjson.JSONDecodeError:
            await self.reply(_error(None, "invalid_argument", "Protocol commands must be valid JSON."))
            return
        if (not isinstance(command, dict) or not isinstance(command.get("id"), int)
                or isinstance(command.get("id"), bool) or not isinstance(command.get("method"), str)):
            await self.reply(_error(command.get("id") if isinstance(command, dict) else None, "invalid_argument",
                                    "Protocol commands must include an integer id and string method."))
            return
        method = command["method"]
        if method in ("subscription.subscribe", "subscription.reconnect"):
            await self.subscribe(command, reconnect=method == "subscription.reconnect")
        elif method == "subscription.unsubscribe":
            await self.unsubscribe(command)
        else:
            await self.reply(await self.upstream_command(data, command["id"]))

    async def reply(self, doc: dict[str, Any]) -> None:
        await self.send(orjson.dumps(doc))

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_str(data.decode())

    def meta(self) -> dict[str, int]:
        return {"applied_through_seq": self.applied}

    async def upstream_command(self, raw: str, cid: int) -> dict[str, Any]:
        """A command the gateway does not serve itself: the upstream answers it, as over HTTP, and
        within the budget for forwards (``max_connections``) as that request would be."""
        headers = self.handlers.forwarder.upstream_headers(self.request, drop=_LEG_DROP)
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json"
        headers["Accept-Encoding"] = "identity"  # the gateway reads the answer itself, whatever the client accepts
        try:
            resp = await self.handlers.forwarder.upstreams.send(
                self.target.pool, "POST", f"/threads/{self.tid}/commands", headers, data=raw.encode())
            try:
                status, doc = resp.status, orjson.loads(await resp.read())
            finally:
                resp.release()
        except (GatewayError, aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as exc:
            detail = exc.detail if isinstance(exc, GatewayError) else f"upstream answered badly: {exc}"
            return _error(cid, "unknown_error", detail)
        if isinstance(doc, dict) and doc.get("type") in ("success", "error") and "id" in doc:
            return doc
        # No protocol answer (a refusal's {"detail": ...}, from the upstream's auth or any status):
        # sent as it is, it names no command, and the client waits for its answer forever.
        said = doc.get("detail") if isinstance(doc, dict) else None
        return _error(cid, "unknown_error", f"the upstream answered the command with HTTP {status}"
                                            + (f": {said}" if isinstance(said, str) else ""))

    async def subscribe(self, command: dict[str, Any], *, reconnect: bool) -> None:
        cid, what = command["id"], command["method"]
        params = _params(command)
        try:
            flt = sessions.parse_filter(params, strict_namespaces=True)
        except sessions.BadFilter:
            channels = params.get("channels")
            word = ("requires a non-empty channels array" if not isinstance(channels, list) or not channels
                    else "received an unsupported channel")
            await self.reply(_error(cid, "invalid_argument", f"{what} {word}.", self.meta()))
            return
        since = sessions.parse_since(params)
        if reconnect and since is None:
            await self.reply(_error(cid, "invalid_argument", f"{what} requires a non-negative integer since.",
                                    self.meta()))
            return
        asked = params.get("subscription_id")
        sub_id = asked if reconnect and isinstance(asked, str) and asked else str(uuid.uuid4())
        try:
            att, _headers = await self.handlers._attach(self.request, self.target, self.tid, since)
        except StreamHidden:
            await self.hidden(cid, sub_id, reconnect)
            return
        except GatewayError as exc:  # what SSE answers with exc.status (the upstream unreachable)
            await self.refuse(exc.status, exc.detail)
            return
        except StorageError as exc:  # as a cut stream: over SSE, a 503 the client retries
            await self.cut(exc)
            return
        if att.answer is not None:
            status = att.answer.status
            att.answer.release()
            await self.refuse(status, f"the upstream refused the thread's events: HTTP {status}")
            return
        follower = att.follower
        assert follower is not None
        try:
            held = await self.handlers.hub.lookup(follower.key)
        except StorageError as exc:
            follower.close()
            await self.cut(exc)
            return
        except BaseException:
            follower.close()
            raise
        gap = sessions.resume_gap(since, held)
        if gap is not None and reconnect:
            follower.close()
            self.handlers.streams.resume_served(self.request)  # answered: what retention took
            await self.reply({**gap, "id": cid, "meta": self.meta()})
            return
        async with self._order:
            try:
                if gap is not None:
                    # A subscribe with since (how the SDK resumes a socket) gets what is left, as over
                    # SSE; retention took the rest, and that is said first: an unsolicited resume_gap,
                    # as the gap marker (the SDKs log it and go on).
                    await self.reply({**gap, "meta": self.meta()})
                replayed = await self.replay(follower, flt, self._pumped if self._pump else (held.head if held else 0))
            except (StreamCut, StreamGone, StorageError, ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
                follower.close()
                await self.cut(exc)
                return
            self.subs[sub_id] = _Subscription(flt, since or 0)
            self.handlers.streams.resume_served(self.request)  # this subscription's since
            if self._pump is None:
                head = held.head if held else 0
                if (follower.pos or 0) > head:
                    # A since past the head: the pump starts at the head, so that a subscription
                    # from an earlier since beside this one gets what comes before it at once.
                    follower.close()
                    follower = self.handlers.hub.follow(follower.key, head)
                self._pumped = follower.pos or 0
                self._pump = asyncio.create_task(self.pump(follower))
            else:
                follower.close()
        await self.reply({"type": "success", "id": cid, "result": {"subscription_id": sub_id,
                                                                   "replayed_events": replayed}, "meta": self.meta()})

    async def hidden(self, cid: int, sub_id: str, reconnect: bool) -> None:
        """A subscription to a log that is not this client's (the upstream no longer knows the thread,
        and this is not who captured it), answered as the upstream's socket answers one on a thread it
        does not know, as over SSE the upstream's own answer is relayed: a subscribe is accepted with
        nothing replayed and nothing to follow, a reconnect refused for want of a run."""
        if reconnect:
            await self.reply(_error(cid, "no_such_run", "No active run is bound to this thread."))
            return
        self.subs[sub_id] = _Subscription(sessions.Filter(frozenset()), 0, hidden=True)
        await self.reply({"type": "success", "id": cid, "result": {"subscription_id": sub_id, "replayed_events": 0},
                          "meta": self.meta()})

    async def replay(self, follower: Follower, flt: sessions.Filter, upto: int) -> int:
        """A new subscription's events up to ``upto`` (counted, then acknowledged, as the upstream
        does). Beside a pump, only those it sent already: the rest come from it, in order."""
        replayed = 0
        if (follower.pos or 0) >= upto:
            return 0
        async for page in follower.pages():
            for seq, body in page.entries:
                if self._pump is not None and seq > upto:
                    break
                if flt.keep(body):
                    self._sent(seq)
                    await self.send(sessions.wire(seq, body))
                    replayed += 1
            if (follower.pos or 0) >= upto:
                return replayed
        raise StreamCut(f"the capture of {follower.key} ended")

    async def pump(self, follower: Follower) -> None:
        """The live tail, for every subscription of the socket. The socket is closed with 1011 when
        the stream cannot go on here."""
        try:
            async for page in follower.pages():
                async with self._order:
                    for seq, body in page.entries:
                        if any(seq > sub.after and not sub.hidden and sub.flt.keep(body)
                               for sub in self.subs.values()):
                            self._sent(seq)
                            await self.send(sessions.wire(seq, body))
                    self._pumped = max(self._pumped, follower.pos or 0)
            raise StreamCut(f"the capture of {follower.key} ended")
        except (StreamCut, StreamGone, StorageError) as exc:
            await self.cut(exc)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        except Exception:  # a task of the socket's own: logged, and the socket closed, never left silent
            logger.exception("the event pump of a session socket on thread %s failed", self.tid)
            await self.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"gateway error")
        finally:
            follower.close()

    async def cut(self, exc: BaseException) -> None:
        """Close the socket so that the client reconnects: the stream cannot go on here."""
        if isinstance(exc, StorageError):
            # The log could not be read: a client over SSE is cut for it. Left open, this socket
            # would hear nothing more, ever; closed, the client resubscribes with since.
            logger.warning("reading the log failed (%s); closing the client's socket so it reconnects", exc)
            await self.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"event log unavailable")
        elif isinstance(exc, (StreamCut, StreamGone)):
            logger.info("%s; closing the client's socket so it reconnects", exc)
            await self.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"thread stream ended")

    async def refuse(self, status: int, detail: str) -> None:
        """A subscription refused as SSE refuses it with ``status``: the socket is closed with 4000
        plus the status, which both SDKs read as that status (a 4xx ends the stream, anything else is
        retried). An error answer would leave the socket open with nothing to follow: the Python
        SDK takes any answer to its subscribe for the stream's start, and waits for events forever."""
        code = 4000 + status if 400 <= status < 600 else aiohttp.WSCloseCode.INTERNAL_ERROR
        logger.info("subscription on thread %s refused (%d: %s); closing the client's socket with %d",
                    self.tid, status, detail, code)
        await self.ws.close(code=code, message=close_reason(detail))

    def _sent(self, seq: int) -> None:
        self.applied = max(self.applied, seq)

    async def unsubscribe(self, command: dict[str, Any]) -> None:
        sid = _params(command).get("subscription_id")
        if not isinstance(sid, str):
            await self.reply(_error(command["id"], "invalid_argument", "subscription.unsubscribe requires a "
                                    "subscription_id.", self.meta()))
            return
        if self.subs.pop(sid, None) is None:
            await self.reply(_error(command["id"], "no_such_subscription", f"Unknown subscription: {sid}", self.meta()))
            return
        if not self.subs:  # nobody on the socket follows the thread any more
            await self.close()
        await self.reply({"type": "success", "id": command["id"], "result": {}, "meta": self.meta()})

    async def close(self) -> None:
        self.subs.clear()
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


async def _put(inbox: asyncio.Queue[aiohttp.WSMessage | None], msg: aiohttp.WSMessage | None,
               worker: asyncio.Task[None]) -> bool:
    """``msg`` queued for the socket's worker, waiting while the queue is full (the socket is not
    read meanwhile: a client that floods commands is held back); False once the worker is gone."""
    if worker.done():
        return False
    if not inbox.full():
        inbox.put_nowait(msg)
        return True
    put = asyncio.ensure_future(inbox.put(msg))
    await asyncio.wait((put, worker), return_when=asyncio.FIRST_COMPLETED)
    if put.done():
        return True
    put.cancel()
    return False


def _params(command: dict[str, Any]) -> dict[str, Any]:
    params = command.get("params")
    return params if isinstance(params, dict) else {}


def _error(cid: Any, code: str, message: str, meta: dict[str, int] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "error", "id": cid, "error": code, "message": message}
    if meta is not None:
        doc["meta"] = meta
    return doc
