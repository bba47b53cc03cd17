"""Wiring: builds every part from the config, routes requests, runs both listeners.

The only module that knows all the others. Startup order: event log, upstreams,
hub (re-attaches streams a previous process left open), retention sweeper.
Shutdown runs it backwards after the listeners stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Awaitable, Callable

import orjson

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway import agentapi, runtime, stopsignals
from gateway.agentapi import Endpoint
from gateway.config import Config
from gateway.cors import exposing_location, vary_on_origin
from gateway.errors import NotFound, Unprocessable
from gateway.responses import error_middleware, failed
from gateway.eventlog import EventLog, StreamMeta, open_log
from gateway.hub import Hub
from gateway.legs import Legs
from gateway.listener import GatewayRunner, refusal
from gateway.logs import AccessLogger, answered, client_left, client_reset
from gateway.logview import matches, public, served_details, state_named
from gateway.metrics import PrometheusMetrics
from gateway.proxy import Forwarder, UpstreamHeaders
from gateway.session_streams import SessionHandlers
from gateway.streams import Reply, StreamHandlers
from gateway.upstream import Target, UpstreamError, Upstreams, classify

log = logging.getLogger("gateway.app")

# GET /streams: streams per page by default, and at most.
LIST_LIMIT, LIST_MAX = 100, 1000

# Which handler serves each captured endpoint (gateway.agentapi names them and their paths).
StreamRoute = Callable[["Gateway", web.Request, Target, tuple[str, ...]], Awaitable[Reply]]
STREAM_HANDLERS: dict[Endpoint, StreamRoute] = {
    "create_run_stream": lambda g, r, t, ids: g.streams.create_run_stream(r, t, stateless=False),
    "create_stateless_run_stream": lambda g, r, t, ids: g.streams.create_run_stream(r, t, stateless=True),
    "create_background_run": lambda g, r, t, ids: g.streams.create_background_run(r, t),
    "join_run": lambda g, r, t, ids: g.streams.join_run(r, t, ids[0], ids[1]),
    "join_stateless_run": lambda g, r, t, ids: g.streams.join_run(r, t, None, ids[0]),
    "join_thread": lambda g, r, t, ids: g.streams.join_thread(r, t, ids[0]),
    "session_events": lambda g, r, t, ids: g.sessions.events(r, t, ids[0]),
}


class Gateway:
    """The application object: owns every long-lived part and background task."""

    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = PrometheusMetrics(self.registry)
        self.log: EventLog = open_log(cfg.storage, on_commit=self.metrics.committed)
        self.upstreams = Upstreams(cfg, observer=self.metrics.replica_health)
        self.forwarder = Forwarder(self.upstreams, cfg.clients, cfg.streams.max_request_body, cfg.streams.heartbeat)
        self.hub = Hub(self.log, cfg.streams, Legs(self.upstreams), self._cancel_run, self.metrics)
        self.streams: StreamHandlers = StreamHandlers(self.hub, self.log, self.forwarder, cfg.streams, self.metrics.resumed)
        self.sessions: SessionHandlers = SessionHandlers(self.streams)
        self.metrics.bind_gauges(lambda: self.log.size, lambda: self.hub.live_count(),
                                 lambda: len(self.hub.followers), lambda: 1 if self.log.failure else 0,
                                 self._pool_use, cfg.storage.max_bytes)
        self._sweeper: asyncio.Task[None] | None = None
        self._storage_open = False
        self.stopping = False  # from the shutdown's first step on: /readyz says not ready

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.log.open()
        self._storage_open = True
        await self.upstreams.start()
        await self.hub.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="retention")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.hub.stop()
        await self.upstreams.close()
        self._storage_open = False
        await self.log.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.storage.sweep_interval)
            try:
                await self.log.sweep()
            except Exception:
                log.exception("retention sweep failed; will retry")

    def _pool_use(self) -> list[tuple[str, str, int, int, int]]:
        return [(b.upstream, b.kind, b.in_use, b.limit, b.refused)
                for p in self.upstreams.pools.values() for b in p.budgets.values()]

    # --- upstream calls the hub makes on its own --------------------------------------------

    async def _cancel_run(self, meta: StreamMeta, auth: dict[str, str]) -> None:
        path = agentapi.cancel_path(meta)
        if path is None:
            return
        pool = self.upstreams.pools[meta.upstream]
        headers = dict(pool.cfg.headers)
        headers.update(auth)
        resp = await self.upstreams.send(pool, "POST", path, headers, kind="check")
        resp.release()
        if resp.status >= 300 and classify(resp.status) == "retry":  # not done; asking again may do it
            raise UpstreamError(f"upstream '{pool.name}' answered the cancel of run {meta.run_id} with HTTP {resp.status}")
        log.info("cancelled run %s upstream: HTTP %d", meta.run_id, resp.status)

    # --- HTTP ------------------------------------------------------------------------------

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Every request of the client listener, start to end, in this one coroutine.

        In order: the refusals (``gateway.listener``), the route, errors as answers
        (``gateway.responses``), how the request ended for the access log (``gateway.logs``), and
        the request metric. One coroutine, not three aiohttp middlewares around a handler: an idle
        stream keeps its whole chain of waiting coroutines for hours, ~0.3 KiB each.
        """
        target = self.upstreams.route(request.rel_url.raw_path)
        refused = refusal(request)
        if refused is not None:  # answered, and logged: counted as every other answer is
            self.metrics.request_done(target.pool.name, request.method, refused.status)
            return answered(request, refused)
        began = asyncio.get_running_loop().time()
        status = 500
        try:
            try:
                reply = await self._handler(request, target)
                # A streaming handler hands back the coroutine that streams its response rather than
                # await it (gateway.streams.Reply): awaited here, with its frame gone.
                resp = reply if isinstance(reply, web.StreamResponse) else await reply
                status = resp.status
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:
                status = getattr(exc, "status", 500)
                resp = failed(request, exc)
                # What was sent, as the access line says it: a stream cut after it started (storage
                # failed under it) was a 200, not the 5xx its exception would have answered before.
                status = resp.status
        except asyncio.CancelledError:
            status = client_left(request, began)
            raise
        except ConnectionResetError:  # the client left; nothing to answer
            resp = client_reset(request)
            status = resp.status
            return resp
        finally:
            self.metrics.request_done(target.pool.name, request.method, status)
        return answered(request, resp)

    def _handler(self, request: web.Request, target: Target) -> Awaitable[Reply]:
        """Which handler answers a request: a captured stream's, a WebSocket's, or the forwarder.
        It returns the handler's coroutine rather than awaiting it: one coroutine fewer per stream."""
        captured = agentapi.route(request.method, target.path)
        if captured is None and _is_websocket(request):
            return self.forwarder.websocket(request, target)
        if captured is not None:
            endpoint, ids = captured
            return STREAM_HANDLERS[endpoint](self, request, target, ids)
        return self.forwarder.forward(request, target)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.streams.max_request_body)  # no middlewares: see serve
        # (?s): a decoded path may hold a line break (%0A); "." alone would leave it to aiohttp's
        # text/plain 404 instead of the upstream.
        app.router.add_route("*", "/{tail:(?s:.*)}", self.serve)
        app.on_shutdown.append(self._end_client_streams)
        app.on_response_prepare.append(self._cors)
        return app

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """Cross-origin clients read every answer: the upstream's CORS headers on the ones the
        gateway makes itself, and Location exposed wherever Content-Location is (gateway.cors)."""
        origin = request.headers.get("Origin")
        forwarded = isinstance(response, UpstreamHeaders)  # its Vary is the upstream's own
        if not forwarded:  # the gateway's own answer, Origin or not: it varies on it as the upstream's do
            vary_on_origin(response.headers)
        if origin is None:
            return
        if "Access-Control-Allow-Origin" in response.headers:  # forwarded: the upstream's own
            if "Access-Control-Expose-Headers" in response.headers:
                response.headers["Access-Control-Expose-Headers"] = exposing_location(
                    response.headers["Access-Control-Expose-Headers"])
            return
        upstream = self.upstreams.route(request.rel_url.raw_path).pool.name
        learned = self.upstreams.cors.headers_for(upstream, origin)
        if learned:  # added to a forwarded answer that had none (a 5xx page): its Vary kept, Origin added
            response.headers.update(learned)
            vary_on_origin(response.headers)

    async def _end_client_streams(self, _app: web.Application) -> None:
        self.hub.end_clients()
        await asyncio.gather(self.forwarder.going_away(self.cfg.shutdown_grace), self.sessions.going_away())

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        app.router.add_get("/streams", self._list_streams)
        app.router.add_get("/streams/{key:(?s:.+)}", self._show_stream)
        return app

    async def _list_streams(self, request: web.Request) -> web.Response:
        """A page of the log's streams in key order, with who follows them here:
        ``?state=live|finished&upstream=&thread=&limit=&after=``; ``X-Pagination-Next`` is the
        ``after`` of the next page (absent on the last)."""
        q = request.query
        state = state_named(q["state"]) if "state" in q else None
        if "state" in q and state is None:
            raise Unprocessable("state must be live or finished")
        try:
            limit = int(q.get("limit", LIST_LIMIT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= LIST_MAX:
            raise Unprocessable(f"limit must be an integer from 1 to {LIST_MAX}")
        upstream, thread = q.get("upstream"), q.get("thread")
        metas, after = await self.log.list_streams(
            q.get("after", ""), limit,
            lambda m: matches(m, state=state, upstream=upstream, thread=thread, older=None, newer=None))
        resp = web.json_response([self._with_followers(m) for m in metas], dumps=_dumps)
        if after is not None:
            resp.headers["X-Pagination-Next"] = after
        return resp

    async def _show_stream(self, request: web.Request) -> web.Response:
        """One stream by key (``default/run/<id>``) or by run or thread id: metadata, followers, markers."""
        ident = request.match_info["key"]
        meta = await self.log.lookup(ident)
        for key in agentapi.keys_for(ident, list(self.upstreams.pools))[1:]:  # an id: never a scan of every stream
            if meta is not None:
                break
            meta = await self.log.lookup(key)
        if meta is None:
            raise NotFound(f"no stream {ident!r} in the log")
        doc = await served_details(self.log, meta)
        doc.update(self._with_followers(meta))
        doc["followers_everywhere"] = await self.log.followers(meta.key, doc["followers_here"])
        return web.json_response(doc, dumps=_dumps)

    def _with_followers(self, meta: StreamMeta) -> dict[str, Any]:
        return {**public(meta), "followers_here": self.hub.following(meta.key),
                "captured_here": self.hub.live(meta.key) is not None}

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        pools = {name: [r.label for r in p.replicas if r.healthy and r.checked]
                 for name, p in self.upstreams.pools.items()}
        failure = self.log.failure
        storage = "closed" if not self._storage_open else "open" if failure is None else f"storage failing: {failure}"
        ready = self._storage_open and failure is None and self.upstreams.ready and not self.stopping
        status = "shutting down" if self.stopping else "ready" if ready else "not ready"
        body = {"status": status, "storage": storage, "healthy_replicas": pools}
        return web.json_response(body, status=200 if ready else 503)


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def _dumps(doc: Any) -> str:
    return orjson.dumps(doc).decode()


class Server:
    """Both listeners around a Gateway, with graceful shutdown."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        cfg = gateway.cfg
        # handler_cancellation: a client that hangs up stops its handler at once,
        # so its subscription and upstream request are released without waiting.
        self.main = GatewayRunner(gateway.app(), clients=cfg.clients, handler_cancellation=True,
                                  shutdown_timeout=cfg.shutdown_grace, access_log_class=AccessLogger,
                                  access_log=logging.getLogger("gateway.access"))
        self.admin = web.AppRunner(gateway.admin_app(), access_log=None, shutdown_timeout=1.0)
        self.addresses: dict[str, tuple[str, int]] = {}

    async def start(self) -> None:
        cfg = self.gateway.cfg
        await self.gateway.start()
        # Workers share the public port (the kernel spreads connections); each has its own admin port.
        admin_port = cfg.admin.port + cfg.worker_index if cfg.admin.port else 0
        for name, runner, host, port, shared in (("main", self.main, cfg.listen.host, cfg.listen.port, cfg.workers > 1),
                                                 ("admin", self.admin, cfg.admin.host, admin_port, False)):
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=shared or None,
                               backlog=cfg.clients.backlog)
            await site.start()
            self.addresses[name] = runner.addresses[0][:2]
        log.info("listening on http://%s:%d (admin http://%s:%d)", *self.addresses["main"], *self.addresses["admin"])

    async def stop(self) -> None:
        # Stop accepting, end client streams at an event boundary, give plain requests
        # the grace period, then stop ingest and close storage. Not ready from the first step on:
        # the public listener no longer accepts while the admin one still answers.
        self.gateway.stopping = True
        await self.main.cleanup()
        await self.admin.cleanup()
        await self.gateway.stop()


# CPython's default (700 allocations) starts a young collection every few events and a full one
# every few hundred streams, each traversing every object alive (~45 ms at 1,000 streams, every
# stream stalled meanwhile). Streams leave no reference cycles (tests/test_memory.py), so the
# collector has little to find: it runs on fewer, larger generations.
async def serve(cfg: Config) -> None:
    server = Server(Gateway(cfg))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stopsignals.STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    stopsignals.release()  # one that came while the gateway loaded stops it now
    try:
        await server.start()
        runtime.tune()
        await stop.wait()
        log.info("shutting down (grace %.1fs)", cfg.shutdown_grace)
    finally:
        await server.stop()
        _ignore_further_stops(loop)


def _ignore_further_stops(loop: asyncio.AbstractEventLoop) -> None:
    # The stop was asked for and is done; another SIGTERM/SIGINT (the supervisor passing Ctrl-C on,
    # a user pressing it again) must not turn a clean exit into a traceback or a death by signal.
    # Left to asyncio, the loop's close shuts its self-pipe before it unhooks the handlers (a signal
    # in between is written to a closed descriptor), then restores the defaults that kill or raise.
    for sig in stopsignals.STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
