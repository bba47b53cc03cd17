"""Handlers for the streaming endpoints: capture run and thread streams, serve joins and resumes.

Thin on purpose: request parsing and response writing live here; capture,
re-joins, fan-out and replay are the hub's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Callable
from urllib.parse import unquote_plus

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.access import CHECK_TIMEOUT, AccessCheck, with_captor
from gateway.config import Streams
from gateway.errors import (
    GatewayError,
    InvalidEventId,
    StorageUnavailable,
    Unprocessable,
    cut,
    send_body,
    start_response,
)
from gateway.eventlog import EventLog, StreamMeta
from gateway.follower import Follower, StreamCut, StreamGone
from gateway.hub import CapturedElsewhere, Hub, Ingest, is_event_stream
from gateway.logs import RESUME_OUTCOME, STREAM_KEY
from gateway.proxy import Forwarder, RelayedBody, client_headers
from gateway.sse import EVENT_END, HEARTBEAT, frame
from gateway.stream_params import (
    Cursor,
    RunRequest,
    canonical_id,
    is_uuid,
    parse_cursor,
    prepare_run_request,
    run_mode_filter,
    thread_mode_filter,
    truthy,
)
from gateway.upstream import Kind, Target

log = logging.getLogger("gateway.streams")

_CAPTURABLE_ID = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")
RESUME_HEADER = "X-Gateway-Resume"
# Parameters of a run join the gateway applies itself; the rest go to the upstream.
_JOIN_PARAMS = ("stream_mode", "cancel_on_disconnect", "last_event_id")

_RUN_IN_PATH = re.compile(r"^(?:.*?)(?:/threads/(?P<tid>[^/]+))?/runs/(?P<rid>[^/?]+)")


def run_key(upstream: str, run_id: str) -> str:
    return f"{upstream}/run/{run_id}"


def thread_key(upstream: str, thread_id: str) -> str:
    return f"{upstream}/thread/{thread_id}"


def _run_ids(resp: aiohttp.ClientResponse) -> tuple[str | None, str | None]:
    for h in ("Content-Location", "Location"):
        v = resp.headers.get(h)
        if v and (m := _RUN_IN_PATH.match(v)):
            tid, rid = m.group("tid"), m.group("rid")
            return (canonical_id(tid) if tid else None), canonical_id(rid)
    return None, None


class StreamHandlers:
    def __init__(self, hub: Hub, log_: EventLog, forwarder: Forwarder, cfg: Streams,
                 on_resume: Callable[[str], None] = lambda outcome: None) -> None:
        self.access = AccessCheck(forwarder.upstreams, cfg.authorize_ttl) if cfg.authorize_replay else None
        self.hub = hub
        self.log = log_
        self.forwarder = forwarder
        self.cfg = cfg
        self.on_resume = on_resume

    def _check_capacity(self, key: str | None = None) -> None:
        # Refuse before anything reaches the upstream, so no run is created that we cannot hold.
        if self.log.failure is not None:
            raise StorageUnavailable(f"event log storage is failing ({self.log.failure}); new captures are "
                                     "refused until it recovers")
        if not self.log.accepting(key):
            raise StorageUnavailable("event log is at its disk budget and every stream held is live; "
                                     "new captures are refused until runs finish")

    # --- POST .../runs/stream ------------------------------------------------------------------

    async def create_run_stream(self, request: web.Request, target: Target, *, stateless: bool) -> web.StreamResponse:
        run = prepare_run_request(await self.forwarder.read_body(request, self.cfg.max_request_body),
                                  ask_resumable=self.cfg.request_resumable, stateless=stateless)
        self._check_capacity()
        resp = await self._create_run(request, target, run, "stream")
        if not is_event_stream(resp):
            return await self.forwarder.relay(request, target, resp)
        tid, rid = _run_ids(resp)
        pool = target.pool.name
        if rid is None or not _capturable(rid):  # not an Agent Server run stream: captured, not joinable
            rid = f"unnamed-{uuid.uuid4()}"
        if tid is not None and not _capturable(tid):
            tid = None
        path = f"/runs/{rid}/stream" if stateless or tid is None else f"/threads/{tid}/runs/{rid}/stream"
        meta = StreamMeta(key=run_key(pool, rid), kind="run", upstream=pool, path=path,
                          thread_id=None if stateless else tid, run_id=rid,
                          resumable=run.resumable and not stateless)
        request[STREAM_KEY] = meta.key
        cancel_on_orphan = run.cancel_on_disconnect
        del run  # its bodies would live as long as the stream (4 KiB each: orjson's buffer)
        try:
            await self._capture(request, meta, resp, cancel_on_orphan=cancel_on_orphan)
        except CapturedElsewhere:
            pass  # another replica captured this run already: follow what it commits
        except Exception as exc:
            await self._abandon(request, meta, exc)
        follower = self.hub.follow(meta.key, 0)
        return await self._send(request, follower, client_headers(resp, target, drop=("Content-Length",)), None)

    async def _create_run(self, request: web.Request, target: Target, run: RunRequest, kind: Kind) -> aiohttp.ClientResponse:
        """Send a run-creating request; if the upstream refuses the body as the gateway changed it,
        send the client's own, so the answer (and its validation error) is about what the client sent."""
        headers = self.forwarder.upstream_headers(request, drop=("Content-Length",))
        resp = await self.forwarder.open(request, target, data=run.body, headers=headers, kind=kind)
        if run.resend_as_sent(resp.status):
            resp.release()
            resp = await self.forwarder.open(request, target, data=run.original, headers=headers, kind=kind)
        return resp

    async def _abandon(self, request: web.Request, meta: StreamMeta, exc: Exception) -> None:
        """A run exists upstream that the gateway cannot capture: cancel it, and say so (503)."""
        log.error("run %s was created upstream but could not be captured (%s); cancelling it", meta.run_id, exc)
        what = "it was closed"
        if meta.thread_id is not None:
            try:
                await self.hub.cancel_upstream(meta, self._auth(request))
                what = "it was cancelled upstream"
            except Exception as cancel_exc:  # say what happened either way
                what = f"cancelling it upstream failed too ({cancel_exc})"
        raise StorageUnavailable(f"run {meta.run_id} was created upstream but the gateway could not capture it "
                                 f"({exc}); {what}") from exc

    # --- POST /threads/{tid}/runs ---------------------------------------------------------------

    async def create_background_run(self, request: web.Request, target: Target) -> web.StreamResponse:
        run = prepare_run_request(await self.forwarder.read_body(request, self.cfg.max_request_body),
                                  ask_resumable=self.cfg.request_resumable, stateless=False, streaming=False)
        self._check_capacity()
        resp = await self._create_run(request, target, run, "forward")
        # Shielded: once the upstream has created the run, capture starts even if the client hangs up.
        return await asyncio.shield(self.hub.run_owned(self._answer_background(request, target, resp, run)))

    async def _answer_background(self, request: web.Request, target: Target, resp: aiohttp.ClientResponse,
                                 run: RunRequest) -> web.StreamResponse:
        try:
            body = await self.forwarder.read_json_response(resp, self.cfg.max_request_body)
            headers = client_headers(resp, target, drop=("Content-Length",))
            status, reason = resp.status, resp.reason
        finally:
            resp.release()
        if status == 200:
            await self._capture_background(request, target, body, run)
        return RelayedBody(status=status, reason=reason, body=body, headers=headers)

    async def _capture_background(self, request: web.Request, target: Target, body: bytes, run: RunRequest) -> None:
        try:
            doc = orjson.loads(body)
            tid, rid = canonical_id(str(doc["thread_id"])), canonical_id(str(doc["run_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("background run response had no run_id/thread_id; not captured")
            return
        pool = target.pool.name
        meta = StreamMeta(key=run_key(pool, rid), kind="run", upstream=pool,
                          path=f"/threads/{tid}/runs/{rid}/stream", thread_id=tid, run_id=rid, resumable=run.resumable)
        if self.hub.live(meta.key) is not None:
            return
        try:
            await self._capture(request, meta, None)
        except CapturedElsewhere:
            pass
        except Exception as exc:
            await self._abandon(request, meta, exc)

    # --- GET .../runs/{rid}/stream ----------------------------------------------------------------

    async def join_run(self, request: web.Request, target: Target, raw_tid: str | None,
                       raw_rid: str) -> web.StreamResponse:
        cursor = parse_cursor(request)
        keep = run_mode_filter(request)
        cancel = truthy(request.query.get("cancel_on_disconnect"))
        tid, rid = (canonical_id(raw_tid) if raw_tid is not None else None), canonical_id(raw_rid)
        if not _capturable(rid) or (tid is not None and not _capturable(tid)):
            return await self.forwarder.forward(request, target)
        pool = target.pool.name
        key = run_key(pool, rid)
        request[STREAM_KEY] = key
        meta = await self.log.lookup(key)
        if meta is not None and tid is not None and meta.thread_id not in (None, tid):
            # Held, but under another thread: not ours to serve. The upstream answers as it would.
            return await self.forwarder.forward(request, target)
        if meta is not None:
            headers: CIMultiDict[str] = CIMultiDict()
            after = await self._resume_from(request, cursor, meta, headers)
            if (denied := await self._denial(request, target, meta)) is not None:
                return await self.forwarder.relay(request, target, denied)
            headers["Content-Type"] = "text/event-stream; charset=utf-8"
            headers["Location"] = target.client_path(meta.path)
            headers["Content-Location"] = target.client_path(meta.path.removesuffix("/stream"))
            follower = await self.hub.join(key, after, cancel_on_disconnect=cancel, auth=self._auth(request))
            return await self._send(request, follower, headers, keep)
        if tid is None:
            if not is_uuid(rid):  # the route is the gateway's: answer as the Agent Server answers bad ids
                raise Unprocessable("Invalid run ID: must be a UUID")
            # The upstream has no such route for stateless runs; let it answer (404).
            self._count_resume(request, cursor, "not_held")
            return await self.forwarder.forward(request, target)
        # Not held: capture it from the upstream from here on (one capture, however many ask at once).
        async with self.hub.capture_lock(key):
            if await self.log.lookup(key) is not None:
                opened: tuple[Follower, CIMultiDict[str]] | aiohttp.ClientResponse | None = None
            else:
                opened = await self._capture_run_join(request, target, tid, rid, cursor, cancel)
        if opened is None:  # another client's request captured it meanwhile
            return await self.join_run(request, target, tid, rid)
        if isinstance(opened, aiohttp.ClientResponse):
            return await self.forwarder.relay(request, target, opened)
        follower, headers = opened
        return await self._send(request, follower, headers, keep)

    async def _capture_run_join(self, request: web.Request, target: Target, tid: str, rid: str, cursor: Cursor,
                                cancel: bool) -> tuple[Follower, CIMultiDict[str]] | aiohttp.ClientResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        if cursor.kind in ("start", "seq"):
            self._count_resume(request, cursor, "not_held")
            headers[RESUME_HEADER] = "not-held"
        key = run_key(target.pool.name, rid)
        self._check_capacity(key)
        if not await self._run_exists(request, target, tid, rid):
            return await self.forwarder.open(request, target)  # the upstream's own answer, not captured
        meta = StreamMeta(key=key, kind="run", upstream=target.pool.name, path=f"/threads/{tid}/runs/{rid}/stream",
                          thread_id=tid, run_id=rid, resumable=cursor.kind != "none")
        query = _drop_params(request.rel_url.raw_query_string, _JOIN_PARAMS)
        try:
            opened = await self._open_capture(request, meta, cursor, query, cancel)
        except CapturedElsewhere:  # a client of another replica asked for it at the same moment
            headers["Content-Type"] = "text/event-stream; charset=utf-8"
            await self._wait_elsewhere(key, target)
            return self.hub.follow(key, 0), headers
        if isinstance(opened, aiohttp.ClientResponse):
            return opened
        _ing, resp = opened
        headers.extend(client_headers(resp, target, drop=("Content-Length",)))
        return self.hub.follow(key, 0), headers

    async def _run_exists(self, request: web.Request, target: Target, tid: str, rid: str) -> bool:
        """Ask before capturing: the upstream answers a join of an unknown run with 200 and an
        error event, which must not become a 'finished run' in the log."""
        try:
            resp = await self.forwarder.upstreams.send(target.pool, "GET", f"/threads/{tid}/runs/{rid}",
                                                       self.forwarder.check_headers(request),
                                                       timeout=CHECK_TIMEOUT, kind="check")
        except GatewayError:
            return True  # no quick answer: the join itself will tell
        resp.release()
        return resp.status != 404

    # --- GET /threads/{tid}/stream ------------------------------------------------------------------

    async def join_thread(self, request: web.Request, target: Target, raw_tid: str) -> web.StreamResponse:
        cursor = parse_cursor(request)
        keep = thread_mode_filter(request)
        tid = canonical_id(raw_tid)
        if not _capturable(tid):
            return await self.forwarder.forward(request, target)
        pool = target.pool.name
        key = thread_key(pool, tid)
        request[STREAM_KEY] = key
        headers: CIMultiDict[str] = CIMultiDict()
        relay: aiohttp.ClientResponse | None = None
        # Everything from "is it held?" to registering the follower happens under the key's
        # lock: a capture another client starts meanwhile cannot skip the checks below.
        async with self.hub.capture_lock(key):
            meta = await self.log.lookup(key)
            after: int | None = 0
            if meta is not None:
                after = await self._resume_from(request, cursor, meta, headers)
                relay = await self._denial(request, target, meta)
            elif cursor.kind != "none":
                self._count_resume(request, cursor, "not_held")
                headers[RESUME_HEADER] = "not-held"
            if relay is None and self.hub.live(key) is None:
                self._check_capacity(key)
                new = StreamMeta(key=key, kind="thread", upstream=pool, path=f"/threads/{tid}/stream",
                                 thread_id=tid, resumable=True)
                try:
                    opened: tuple[Ingest, aiohttp.ClientResponse] | aiohttp.ClientResponse | None = (
                        await self._open_capture(request, new, cursor, "", False))
                except CapturedElsewhere:
                    opened = None
                    await self._wait_elsewhere(key, target)
                if isinstance(opened, aiohttp.ClientResponse):
                    relay = opened
                elif opened is not None:
                    headers.extend(client_headers(opened[1], target, drop=("Content-Length",)))
                else:
                    headers["Content-Type"] = "text/event-stream; charset=utf-8"
            elif relay is None:
                headers["Content-Type"] = "text/event-stream; charset=utf-8"
            if relay is None:
                follower = self.hub.follow(key, after)
        if relay is not None:
            return await self.forwarder.relay(request, target, relay)
        return await self._send(request, follower, headers, keep)

    # --- capture on a client's behalf ----------------------------------------------------------------

    async def _capture(self, request: web.Request, meta: StreamMeta, resp: aiohttp.ClientResponse | None,
                       cancel_on_orphan: bool = False) -> Ingest:
        """Capture a stream whose first leg is ``resp`` (None: the hub opens it)."""
        identity = with_captor(meta, self.forwarder.check_headers(request))
        return await self.hub.capture(identity, resp, auth=self._auth(request), cancel_on_orphan=cancel_on_orphan)

    async def _open_capture(self, request: web.Request, meta: StreamMeta, cursor: Cursor, query: str,
                            cancel: bool) -> tuple[Ingest, aiohttp.ClientResponse] | aiohttp.ClientResponse:
        """Have the hub open a leg with the client's headers and capture it."""
        fwd = self.forwarder.upstream_headers(request, drop=("Last-Event-ID",))
        return await self.hub.open_capture(with_captor(meta, self.forwarder.check_headers(request)), cursor, fwd,
                                           query, auth=self._auth(request), cancel_on_orphan=cancel)

    async def _wait_elsewhere(self, key: str, target: Target) -> None:
        try:
            await self.hub.wait_for(key, target.pool.cfg.pool_timeout)
        except CapturedElsewhere:
            raise StorageUnavailable("another gateway replica claimed this stream but has not started "
                                     "capturing it; try again") from None

    async def _denial(self, request: web.Request, target: Target, meta: StreamMeta) -> aiohttp.ClientResponse | None:
        if self.access is None:
            return None
        return await self.access.denial(target.pool, meta, self.forwarder.check_headers(request))

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
        if cursor.kind == "seq" and cursor.seq <= meta.base:
            # An id from an earlier capture of this run or thread (before retention removed it, or
            # from a log moved aside): none of the events held follow it. Everything, and say so.
            headers[RESUME_HEADER] = "not-held"
            self._count_resume(request, cursor, "not_held")
            return 0
        if cursor.kind in ("start", "seq") and meta.first_seq and cursor.seq < meta.first_seq - 1:
            headers[RESUME_HEADER] = "truncated"
            self._count_resume(request, cursor, "truncated")
        else:
            self._count_resume(request, cursor, "hit")
        return cursor.after()

    def _count_resume(self, request: web.Request, cursor: Cursor, outcome: str) -> None:
        if cursor.kind != "none":
            self.on_resume(outcome)
            request[RESUME_OUTCOME] = outcome

    # --- writing ------------------------------------------------------------------------------------

    async def _send(self, request: web.Request, follower: Follower, headers: CIMultiDict[str],
                    keep: Callable[[bytes], bool] | None) -> web.StreamResponse:
        headers.setdefault("Cache-Control", "no-store")
        headers["X-Accel-Buffering"] = "no"
        out = web.StreamResponse(status=200, headers=headers)
        loop = asyncio.get_running_loop()
        sent_at = 0.0  # when a filtered stream last wrote: it owes its client a heartbeat too
        try:
            await start_response(request, out)
            sent_at = loop.time()
            async for page in follower.pages():
                if not page:
                    data = HEARTBEAT
                elif keep is None:
                    data = page.wire()  # a replayed page's bytes are shared by every client reading it
                else:
                    data = frame(e for e in page.entries if keep(e[1]))
                    # Events come but none is this client's: the follower never idles, so the
                    # heartbeat is owed from here, or a load balancer drops a quiet connection.
                    if not data:
                        if loop.time() - sent_at < follower.source.heartbeat:
                            continue
                        data = HEARTBEAT
                    sent_at = loop.time()
                await send_body(request, out, data, self.forwarder.clients.write_timeout, EVENT_END)
            await out.write_eof()
            return out
        except TimeoutError:
            log.info("client on %s too slow to write to; dropped (it can resume)", request.path)
            cut(request)
            return out
        except (StreamGone, StreamCut) as exc:
            log.info("%s; cutting the client so it retries", exc)
            cut(request)
            return out
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return out
        finally:
            follower.close()


def _capturable(ident: str) -> bool:
    """Run and thread ids the log will key a stream by (UUIDs in practice); others are just forwarded."""
    return bool(_CAPTURABLE_ID.match(ident))


def _drop_params(raw_qs: str, names: tuple[str, ...]) -> str:
    """The raw query string without some parameters; the rest stays byte-for-byte."""
    parts = [p for p in raw_qs.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in names]
    return "&".join(parts)
