"""Handlers for the streaming endpoints: parse the request, ask the hub, write the answer.

Thin on purpose: whether a stream is held, captured, followed elsewhere or taken over is the
hub's decision (``Hub.attach``); the Agent Server's paths and keys are ``gateway.agentapi``'s.
What stays here is HTTP: the client's cursor and filters, its credentials and access, the
resume outcome it is told, and the SSE response.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import partial
from typing import Any, Awaitable, Callable, Coroutine, Iterable, TypeVar
from urllib.parse import unquote_plus

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway import agentapi
from gateway.access import CHECK_TIMEOUT, AccessCheck, Refused, with_captor
from gateway.agentapi import Cursor, canonical_id, capturable, is_uuid
from gateway.capture import is_event_stream
from gateway.config import Streams
from gateway.errors import InvalidEventId, StorageUnavailable, Unprocessable
from gateway.eventlog import Entry, EventLog, StreamMeta
from gateway.follower import Follower, StreamCut, StreamGone
from gateway.hub import Attachment, Hub, Join, Leg, Prepare
from gateway.logs import RESUME_OUTCOME, STREAM_KEY
from gateway.metrics import ResumeOutcome
from gateway.proxy import Forwarder, RelayedBody, client_headers, decoded_body
from gateway.replay import EMPTY
from gateway.responses import StallGuard, cut, express_writer, send_body, start_response
from gateway.sse import EVENT_END, HEARTBEAT, frame
from gateway.stream_params import (
    RunRequest,
    last_param,
    parse_cursor,
    prepare_run_request,
    run_mode_filter,
    thread_mode_filter,
    truthy,
)
from gateway.streamclient import LegResponse
from gateway.upstream import Answer, PoolFull, Target, UpstreamError

A = TypeVar("A", bound=Answer)

# What a streaming handler returns: its response, or the coroutine that streams it (``send``), handed
# back unawaited so the handler's own frame, and all it held, is gone while the stream lasts; the
# one place that awaits it is ``Gateway.serve``.
Reply = web.StreamResponse | Coroutine[Any, Any, web.StreamResponse]
# A background run's upstream answer, and the gateway's own answer when it read that one whole.
Created = tuple[aiohttp.ClientResponse, web.StreamResponse | None]
# A run created streaming: the upstream's answer, and this client's follower of its capture (None: the
# answer is no event stream, relayed as it is).
Started = tuple[LegResponse, Follower | None]
# What a client is attached to, and the headers it is told about its resume.
Attached = tuple[Attachment, CIMultiDict[str]]

logger = logging.getLogger("gateway.streams")

RESUME_HEADER = "X-Gateway-Resume"
# A captured stream's leg headers a client does not get: the gateway writes its own framing, of
# the events decoded (gateway.capture.decoded), never encoded.
CAPTURED_DROP = ("Content-Length", "Content-Encoding")
# Parameters of a run join the gateway applies itself; the rest go to the upstream.
_JOIN_PARAMS = ("stream_mode", "cancel_on_disconnect", "last_event_id")
# A resume's outcome found while attaching, counted once it is served (StreamHandlers.resume_served).
_RESUMING: web.RequestKey[ResumeOutcome] = web.RequestKey("gateway.resuming")


# Where a client starts in a held stream: (request, its cursor, the stream, headers to tell it) -> after.
Position = Callable[[web.Request, Cursor, StreamMeta, CIMultiDict[str]], Awaitable[int | None]]


class _NotOurs(Exception):
    """The stream held under this key belongs to another thread: the upstream answers as it would."""


class StreamHandlers:
    def __init__(self, hub: Hub, log_: EventLog, forwarder: Forwarder, cfg: Streams,
                 on_resume: Callable[[ResumeOutcome], None] = lambda outcome: None) -> None:
        self.access = AccessCheck(forwarder.upstreams, cfg.authorize_ttl) if cfg.authorize_replay else None
        self.hub = hub
        self.log = log_
        self.forwarder = forwarder
        self.cfg = cfg
        self.on_resume = on_resume

    def check_capacity(self, key: str | None = None) -> None:
        # Refuse before anything reaches the upstream, so no run is created that we cannot hold.
        if self.log.failure is not None:
            raise StorageUnavailable(f"event log storage is failing ({self.log.failure}); new captures are "
                                     "refused until it recovers")
        if not self.log.accepting(key):
            raise StorageUnavailable("event log is at its disk budget and every stream held is live; "
                                     "new captures are refused until runs finish")

    # --- POST .../runs/stream ------------------------------------------------------------------

    async def create_run_stream(self, request: web.Request, target: Target, *, stateless: bool) -> Reply:
        run = prepare_run_request(await self.forwarder.read_body(request, self.cfg.max_request_body),
                                  ask_resumable=self.cfg.request_resumable, stateless=stateless)
        self.check_capacity()
        # Owned by the hub from the request upstream to the capture's start, as a background run is:
        # a client that leaves meanwhile leaves a run created upstream (told to continue, when the
        # client asked for a cancel on disconnect), which is captured all the same, and cancelled.
        starting = self._start_run_stream(request, target, run, stateless)
        del run  # its bodies would live as long as the stream (4 KiB each: orjson's buffer)
        resp, follower = await self.hub.hand_over(starting, _leave_unstarted)
        if follower is None:
            return await self.forwarder.relay(request, target, resp)
        return self.send(request, follower, client_headers(resp, target, drop=CAPTURED_DROP),
                         None)  # a Reply: awaited by the caller

    async def _start_run_stream(self, request: web.Request, target: Target, run: RunRequest,
                                stateless: bool) -> Started:
        """Create a run streaming and begin its capture, with this client following it; the answer
        alone (no follower) when it is no event stream."""
        resp = await self._create_run(run, partial(self.forwarder.open_stream, request, target,
                                                   headers=self.forwarder.upstream_headers(request, drop=("Content-Length",))))
        if not is_event_stream(resp):
            return resp, None
        tid, rid = agentapi.run_ids(resp.headers)
        if rid is None or not capturable(rid):  # not an Agent Server run stream: captured, not joinable
            rid = f"unnamed-{uuid.uuid4()}"
        if stateless or (tid is not None and not capturable(tid)):
            tid = None
        meta = agentapi.run_meta(target.pool.name, tid, rid, resumable=run.resumable)
        request[STREAM_KEY] = meta.key
        # Subscribed before the capture begins: the run's first events, which may commit with the
        # begin, reach this client from the feed, not from a read of the log.
        follower = self.hub.follow(meta.key, 0)
        try:
            await self._capture(request, meta, resp, run.cancel_on_disconnect)
        except BaseException:
            follower.close()
            raise
        return resp, follower

    async def _create_run(self, run: RunRequest, send: Callable[[bytes], Awaitable[A]]) -> A:
        """Send a run-creating request with ``send``; if the upstream refuses the body as the gateway
        changed it, send the client's own, so the answer (and its validation error) is about what
        the client sent."""
        resp = await send(run.body)
        if run.resend_as_sent(resp.status):
            resp.release()
            resp = await send(run.original)
        return resp

    async def _capture(self, request: web.Request, meta: StreamMeta, resp: LegResponse | None,
                       cancel_on_orphan: bool = False) -> None:
        """Capture a run just created upstream; if the log cannot take it, cancel it there and say so (503)."""
        try:
            await self.hub.capture(with_captor(meta, self.forwarder.check_headers(request)), resp,
                                   auth=self._auth(request), cancel_on_orphan=cancel_on_orphan)
        except Exception as exc:
            logger.error("run %s was created upstream but could not be captured (%s); cancelling it", meta.run_id, exc)
            what = "it was closed"
            if meta.thread_id is not None:
                try:
                    await self.hub.cancel_upstream(meta, self._auth(request))
                    what = "it was cancelled upstream"
                except Exception as cancel_exc:  # say what happened either way
                    what = f"cancelling it upstream failed too ({cancel_exc})"
            raise StorageUnavailable(f"run {meta.run_id} was created upstream but the gateway could not capture "
                                     f"it ({exc}); {what}") from exc

    # --- POST /threads/{tid}/runs ---------------------------------------------------------------

    async def create_background_run(self, request: web.Request, target: Target) -> web.StreamResponse:
        run = prepare_run_request(await self.forwarder.read_body(request, self.cfg.max_request_body),
                                  ask_resumable=self.cfg.request_resumable, stateless=False, streaming=False)
        self.check_capacity()
        # Shielded from the request on: the upstream creates the run even if the client hangs up
        # before its answer (uvicorn finishes a plain request), and a run created is captured.
        resp, answer = await self.hub.hand_over(self._create_background(request, target, run), _release_unrelayed)
        if answer is not None:
            return answer
        return await self.forwarder.relay(request, target, resp)

    async def _create_background(self, request: web.Request, target: Target,
                                 run: RunRequest) -> Created:
        headers = self.forwarder.upstream_headers(request, drop=("Content-Length",))
        resp = await self._create_run(run, lambda body: self.forwarder.open(request, target, data=body, headers=headers))
        try:
            return resp, await self._capture_background(request, target, resp, run)
        except BaseException:
            resp.release()
            raise

    async def _capture_background(self, request: web.Request, target: Target, resp: aiohttp.ClientResponse,
                                  run: RunRequest) -> web.StreamResponse | None:
        """Capture the run a background request created; None: the upstream's answer is to be relayed
        as it comes. The run's ids come from the answer's Content-Location, as for a run created
        streaming: its JSON echoes what the client sent (input, metadata twice), so it may be bigger
        than any limit on requests. Only an answer that names no run there is read whole for them."""
        if resp.status != 200:
            return None  # no run was created
        answer: web.StreamResponse | None = None
        tid, rid = agentapi.run_ids(resp.headers)
        if tid is None or rid is None or not (capturable(tid) and capturable(rid)):
            try:
                body = await self.forwarder.read_json_response(resp, self.cfg.max_request_body)
                answer = RelayedBody(status=200, reason=resp.reason, body=body,
                                     headers=client_headers(resp, target, drop=("Content-Length",)))
            finally:
                resp.release()
            try:  # decoded: it was asked with the client's Accept-Encoding
                doc = orjson.loads(decoded_body(body, resp.headers.get("Content-Encoding", ""),
                                                self.cfg.max_request_body) or b"")
                tid, rid = canonical_id(str(doc["thread_id"])), canonical_id(str(doc["run_id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                logger.warning("background run response had no run_id/thread_id; not captured")
                return answer
        await self._capture(request, agentapi.run_meta(target.pool.name, tid, rid, resumable=run.resumable), None)
        return answer

    # --- GET .../runs/{rid}/stream and GET /threads/{tid}/stream ------------------------------------

    async def join_run(self, request: web.Request, target: Target, raw_tid: str | None, raw_rid: str) -> Reply:
        cursor = parse_cursor(request)
        keep = run_mode_filter(request)
        tid, rid = (canonical_id(raw_tid) if raw_tid is not None else None), canonical_id(raw_rid)
        if not capturable(rid) or (tid is not None and not capturable(tid)):
            return await self.forwarder.forward(request, target)
        meta = agentapi.run_meta(target.pool.name, tid, rid, resumable=cursor.kind != "none")
        request[STREAM_KEY] = meta.key
        query = _drop_params(request.rel_url.raw_query_string, _JOIN_PARAMS)
        leg = Leg(self.forwarder.upstream_headers(request, drop=("Last-Event-ID",)), query) if tid is not None else None

        async def prepare() -> Answer | None:
            self.check_capacity(meta.key)
            if not await self._exists(request, target, meta):
                return await self.forwarder.open(request, target)  # the upstream's own answer, not captured
            return None

        # A stateless run has no cancel endpoint upstream: only one created with on_disconnect=cancel
        # is cancelled (its leg closed); one created to continue goes on, and so does its capture.
        cancel = tid is not None and truthy(last_param(request, "cancel_on_disconnect"))
        attaching = self._attach_or_not_ours(request, target, meta, cursor, leg, prepare, cancel=cancel, thread=tid)
        attached = await (self._attach_owned(attaching) if cancel else attaching)
        if attached is None:  # held, but under another thread: not ours to serve
            return await self.forwarder.forward(request, target)
        att, headers = attached
        if att.held is None and att.answer is None and att.follower is None:
            if not is_uuid(rid):  # the route is the gateway's: answer as the Agent Server answers bad ids
                raise Unprocessable("Invalid run ID: must be a UUID")
            # The upstream has no such route for stateless runs; let it answer (404).
            self.tell_resume(request, cursor, "not_held")
            self.resume_served(request)  # the upstream answers it
            return await self.forwarder.forward(request, target)
        return await self._answer(request, target, att, headers, cursor, keep, not_held=("start", "seq"))

    async def join_thread(self, request: web.Request, target: Target, raw_tid: str) -> Reply:
        cursor = parse_cursor(request)
        keep = thread_mode_filter(request)
        tid = canonical_id(raw_tid)
        if not capturable(tid):
            return await self.forwarder.forward(request, target)
        meta = agentapi.thread_meta(target.pool.name, tid)
        request[STREAM_KEY] = meta.key

        async def prepare() -> Answer | None:
            self.check_capacity(meta.key)
            if not await self._exists(request, target, meta):
                return await self.forwarder.open(request, target)  # the upstream's own answer, not captured
            return None

        att, headers = await self.attach(request, target, meta, cursor,
                                          Leg(self.forwarder.upstream_headers(request, drop=("Last-Event-ID",))),
                                          prepare)
        return await self._answer(request, target, att, headers, cursor, keep, not_held=("start", "seq", "upstream"))

    async def _attach_or_not_ours(self, request: web.Request, target: Target, meta: StreamMeta, cursor: Cursor,
                                  leg: Leg | None, prepare: Prepare, *, cancel: bool,
                                  thread: str | None) -> Attached | None:
        try:
            return await self.attach(request, target, meta, cursor, leg, prepare, cancel=cancel, thread=thread)
        except _NotOurs:
            return None

    async def _attach_owned(self, attaching: Awaitable[Attached | None]) -> Attached | None:
        """A join that asked for a cancel on disconnect, attached even if its client leaves meanwhile
        (asking the upstream whether the run exists, opening the leg): the upstream's join was told
        nothing of the cancel, so the client must leave as a follower, which cancels the run as when
        it leaves later."""
        return await self.hub.hand_over(attaching, _leave_unused_attachment)

    async def attach(self, request: web.Request, target: Target, meta: StreamMeta, cursor: Cursor, leg: Leg | None,
                     prepare: Prepare, cancel: bool = False, thread: str | None = None,
                     position: Position | None = None) -> tuple[Attachment, CIMultiDict[str]]:
        """Ask the hub for the stream; the headers the client is told about its resume come back too.
        ``position``: where the client starts in a held stream (default: after its Last-Event-ID)."""
        headers: CIMultiDict[str] = CIMultiDict()

        async def resume(held: StreamMeta) -> int | None:
            if thread is not None and held.thread_id not in (None, thread):
                raise _NotOurs()
            # Access first: a resume the upstream refuses serves nothing, so it is not counted.
            await self._check_access(request, target, held)
            return await (position or self._resume_from)(request, cursor, held, headers)

        join = Join(with_captor(meta, self.forwarder.check_headers(request)), cursor, self._auth(request), leg,
                    cancel_on_orphan=cancel, wait=target.pool.cfg.pool_timeout)
        try:
            return await self.hub.attach(join, resume, prepare), headers
        except Refused as refused:
            return Attachment(answer=refused.resp), headers

    async def _answer(self, request: web.Request, target: Target, att: Attachment, headers: CIMultiDict[str],
                      cursor: Cursor, keep: Callable[[bytes], bool] | None,
                      not_held: tuple[str, ...]) -> Reply:
        if att.answer is not None:
            return await self.forwarder.relay(request, target, att.answer)
        assert att.follower is not None
        if att.held is None and cursor.kind in not_held:
            self.tell_resume(request, cursor, "not_held", headers)
        if att.leg is not None:
            headers.extend(client_headers(att.leg, target, drop=CAPTURED_DROP))
        else:
            headers.update(agentapi.stream_headers())
            if att.held is not None and att.held.kind == "run":
                headers["Location"] = target.client_path(att.held.path)
                headers["Content-Location"] = target.client_path(agentapi.resource_path(att.held))
        return self.send(request, att.follower, headers, keep)  # a Reply: awaited by the caller

    async def _exists(self, request: web.Request, target: Target, meta: StreamMeta) -> bool:
        """Ask before capturing: the upstream answers a join of an unknown run with 200 and an
        error event, which must not become a 'finished run' in the log, and the stream of an unknown
        thread with 200 and heartbeats, which must not become an empty thread stream in it."""
        try:
            resp = await self.forwarder.upstreams.send(target.pool, "GET", agentapi.resource_path(meta),
                                                       self.forwarder.check_headers(request),
                                                       timeout=CHECK_TIMEOUT, kind="check")
        except PoolFull:
            raise  # the gateway could not ask at all (its check connections are in use): a 503, no guess
        except UpstreamError:
            return True  # no quick answer: the join itself will tell
        resp.release()
        return resp.status != 404

    async def _check_access(self, request: web.Request, target: Target, meta: StreamMeta) -> None:
        if self.access is not None:
            await self.access.check(target.pool, meta, self.forwarder.check_headers(request))

    def _auth(self, request: web.Request) -> dict[str, str]:
        """The client's credential headers (streams.auth_headers) the gateway may reuse for it."""
        return {h: request.headers[h] for h in self.cfg.auth_headers if h in request.headers}

    # --- where a resume starts ---------------------------------------------------------------------

    async def _resume_from(self, request: web.Request, cursor: Cursor, meta: StreamMeta,
                           headers: CIMultiDict[str]) -> int | None:
        """Where a client resuming ``meta`` starts: after its id, or from the start when its id is not
        one of this capture's; counts the outcome and says it in ``X-Gateway-Resume``."""
        if cursor.kind == "upstream":
            raise InvalidEventId(f"Invalid Last-Event-ID {cursor.raw!r}: this stream is served by the "
                                 "gateway; resume with an id the gateway sent")
        if cursor.kind == "seq" and cursor.seq > await self.log.last_seq():
            # An id above every id ever handed out would wait forever for events: say so instead.
            raise InvalidEventId(f"Invalid Last-Event-ID {cursor.raw!r}: this gateway has not sent that id yet")
        if cursor.kind == "seq" and meta.lost(cursor.seq):
            # An id from an earlier capture of this run or thread (before retention removed it, or
            # from a log moved aside), or of events Redis lost (back from an older snapshot): none
            # of the events held follow it. Everything, and say so.
            self.tell_resume(request, cursor, "not_held", headers)
            return 0
        if cursor.kind in ("start", "seq") and meta.first_seq and cursor.seq < meta.first_seq - 1:
            self.tell_resume(request, cursor, "truncated", headers)
        elif cursor.kind == "start" and not await self.hub.start_held(meta):
            # A run first joined mid-stream (the gateway never saw it begin), or a thread stream first
            # captured at its live tail, is held from then on: a client asking for all of it gets
            # what is held, and is told its start is not.
            self.tell_resume(request, cursor, "truncated", headers)
        else:
            self.tell_resume(request, cursor, "hit", headers)
        return cursor.after()

    def tell_resume(self, request: web.Request, cursor: Cursor, outcome: ResumeOutcome,
                    headers: CIMultiDict[str] | None = None) -> None:
        """A resume's outcome, in one place: said in ``X-Gateway-Resume`` (``headers``: the response's)
        unless it is a hit, and counted (``resume_served``) once it is served, when a resume was asked.
        Found while the client is attached, it may still serve nothing: the leg of a thread stream let
        go is refused (a 5xx), a takeover fails, the client leaves before the answer starts."""
        if headers is not None and outcome != "hit":
            headers[RESUME_HEADER] = outcome.replace("_", "-")
        if cursor.kind != "none":
            request[_RESUMING] = outcome

    def resume_served(self, request: web.Request) -> None:
        """The resume told last (``tell_resume``) is served: counted (the metric, the access log's field), once."""
        outcome = request.pop(_RESUMING, None)
        if outcome is not None:
            self.on_resume(outcome)
            request[RESUME_OUTCOME] = outcome

    # --- writing ------------------------------------------------------------------------------------

    async def send(self, request: web.Request, follower: Follower, headers: CIMultiDict[str],
                    keep: Callable[[bytes], bool] | None, framer: Callable[[Iterable[Entry]], bytes] = frame,
                    endless: bool = False, first: bytes = b"") -> web.StreamResponse:
        """Stream what ``follower`` reads to the client: pages framed by ``framer`` (filtered by ``keep``).
        ``endless``: the stream has no end a client may see (a v3 session): a cut, never a clean end.
        ``first``: written before what the follower reads (what the client is told of its resume)."""
        headers.setdefault("Cache-Control", "no-store")
        headers["X-Accel-Buffering"] = "no"
        out = web.StreamResponse(status=200, headers=headers)
        headers.clear()  # out has its own copy; this parameter would live as long as the stream
        loop = asyncio.get_running_loop()
        sent_at = 0.0  # when a filtered stream last wrote: it owes its client a heartbeat too
        guard = StallGuard(self.forwarder.clients.write_timeout)
        try:
            await start_response(request, out)
            self.resume_served(request)
            out.headers.clear()  # on the wire: aiohttp reads them no more, and out lives as long as the stream
            if first:
                await send_body(request, out, first, guard, EVENT_END, follower.stopping)
            sent_at = loop.time()
            if keep is None and framer is frame and (write := express_writer(request)) is not None:
                follower.express(write)  # a filtered stream owes heartbeats by time: it stays on the task
            async for page in follower.pages():
                if not page:
                    data = HEARTBEAT
                elif keep is None and framer is frame:
                    data = page.wire()  # a replayed page's bytes are shared by every client reading it
                    # Its events are no longer needed here: a page nobody shares goes now, not after
                    # its write, which a stalled client holds until the write timeout.
                    page = EMPTY
                else:
                    data = framer(e for e in page.entries if keep is None or keep(e[1]))
                    # Events come but none is this client's: the follower never idles, so the
                    # heartbeat is owed from here, or a load balancer drops a quiet connection.
                    if not data:
                        if loop.time() - sent_at < follower.source.heartbeat:
                            continue
                        data = HEARTBEAT
                    sent_at = loop.time()
                await send_body(request, out, data, guard, EVENT_END, follower.stopping)
            if endless:
                raise StreamCut(f"the capture of {follower.key} ended")
            await out.write_eof()
            return out
        except TimeoutError:
            logger.info("client on %s too slow to write to; dropped (it can resume)", request.path)
            cut(request)
            return out
        except (StreamGone, StreamCut) as exc:
            logger.info("%s; cutting the client so it retries", exc)
            cut(request)
            return out
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return out
        finally:
            guard.close()
            follower.close()


def _leave_unused_attachment(attached: Attached | None) -> None:
    """A join whose client hung up while it was being attached: it leaves what it was attached to."""
    if attached is None:
        return
    att = attached[0]
    if att.follower is not None:
        att.follower.close()
    if att.answer is not None:
        att.answer.release()


def _leave_unstarted(started: Started) -> None:
    """A run created streaming whose client hung up before its stream started: the client leaves the
    capture (the run is cancelled if it asked for that, as when it leaves later), or the answer
    nobody relays is let go."""
    resp, follower = started
    if follower is not None:
        follower.close()
    else:
        resp.release()


def _release_unrelayed(created: Created) -> None:
    """The answer of a background run whose client hung up: nobody relays it."""
    created[0].release()


def _drop_params(raw_qs: str, names: tuple[str, ...]) -> str:
    """The raw query string without some parameters; the rest stays byte-for-byte."""
    parts = [p for p in raw_qs.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in names]
    return "&".join(parts)
