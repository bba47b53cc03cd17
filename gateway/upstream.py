"""Upstreams: the route table, replica pools with health checks, and sending requests.

A request that never reached a replica (connection refused, connect timeout)
is retried on the next replica; once bytes were sent it is never replayed, so
a run is never created twice.

Connections are budgeted per upstream and per kind of traffic, so one kind can
never starve another: plain forwards (``max_connections``), the legs of captured
streams (``max_streams``), the gateway's own short checks (access, does the run
exist, cancel), and health checks on a session of their own that never queues
behind traffic. A request that finds its budget spent waits at most
``pool_timeout`` and then gets a 503 naming the upstream; the gateway's own
saturation never counts against a replica's health.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Mapping, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import config
from gateway.cors import CorsMemory
from gateway.errors import GatewayError
from gateway.sse import SSEProtocolError
from gateway.streamclient import ConnectFailed, LegResponse, StreamClient

log = logging.getLogger("gateway.upstream")

# What a connection to an upstream is for; each kind has its own budget.
Kind = Literal["forward", "stream", "check"]


class UpstreamError(GatewayError):
    """The upstream could not be asked, or did not answer: what a client gets is 502, 503 or 504."""

    status = 502


class UpstreamUnreachable(UpstreamError):
    """No replica accepted the connection, or the upstream broke the exchange."""


class BadUpstreamResponse(UpstreamError):
    """The upstream answered with something the gateway cannot pass on (a body over its limit)."""


class NoHealthyReplica(UpstreamError):
    status = 503


class PoolFull(UpstreamError):
    """Every connection the gateway may open to an upstream for this kind of request is in use."""

    status = 503


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504


class AnswerBody(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...

    async def read(self, n: int = -1) -> bytes: ...


class Answer(Protocol):
    """An upstream's answer, its head read: from aiohttp's client (forwards, checks) or from a
    streaming leg (``gateway.streamclient``). What relaying it to a client needs."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> AnswerBody: ...

    def release(self) -> Any: ...

    def close(self) -> None: ...


class UpstreamRefused(Exception):
    """An upstream answer that asking again will not change (a 404 re-join, a malformed stream)."""


def as_upstream_error(exc: BaseException, who: str, timeout: float | None = None) -> UpstreamError:
    """A failed exchange with an upstream (aiohttp's and asyncio's errors) as what a client is told:
    the one mapping, for a request and for a body read after it."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"{who} did not answer" + (f" within {timeout:g}s" if timeout else " in time"))
    return UpstreamUnreachable(f"{who} failed: {exc or exc.__class__.__name__}")


# A request that failed with one of these never reached the replica: trying the next one is safe.
_NOT_REACHED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, ConnectFailed)
R = TypeVar("R")


class _Headed(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...


H = TypeVar("H", bound=_Headed)

Verdict = Literal["retry", "permanent", "refused"]


def classify(failure: BaseException | int) -> Verdict:
    """What an upstream failure, or an answer's HTTP status, means to whoever asked: the one rule.

    - ``refused``: the upstream says no to this caller (401, 403, 404): its answer stands and is
      relayed as it is; never retried.
    - ``permanent``: asking again gets the same (any other 4xx but 408 and 429, a stream that is
      not SSE or breaks the protocol): give up and say so.
    - ``retry``: the upstream or the path to it may recover (5xx, 408, 429, a refused or broken
      connection, a timeout, a full pool): try again later, or fall back.
    """
    if isinstance(failure, int):
        if failure in (401, 403, 404):
            return "refused"
        if 400 <= failure < 500 and failure not in (408, 429):
            return "permanent"
        return "retry"
    if isinstance(failure, (UpstreamRefused, SSEProtocolError)):
        return "permanent"
    return "retry"
def _keepalive(seconds: float) -> dict[str, Any]:
    """aiohttp's connector arguments for an idle connection closed after ``seconds`` (0: never reused)."""
    return {"force_close": True} if seconds <= 0 else {"keepalive_timeout": seconds}


# The gateway's own checks are short and few per client: this many at once per upstream.
CHECK_CONNECTIONS = 64


@dataclass(slots=True)
class Replica:
    url: URL
    healthy: bool = True  # optimistic for routing until a check says otherwise
    checked: bool = False  # a health check has passed at least once (readiness)
    failures: int = 0
    successes: int = 0

    @property
    def base(self) -> str:
        """The URL requests go to (with credentials, if the config has any)."""
        return str(self.url)

    @property
    def label(self) -> str:
        """The URL as shown in logs, metrics and error details: never with credentials."""
        return str(self.url.with_user(None))


# (upstream name, replica url, healthy) -> None; the metrics hook.
HealthObserver = Callable[[str, str, bool], None]


class Budget:
    """The connections one upstream may have open for one kind of traffic."""

    def __init__(self, upstream: str, kind: Kind, limit: int, wait: float) -> None:
        self.upstream = upstream
        self.kind = kind
        self.limit = limit
        self.wait = wait
        self.in_use = 0
        self.refused = 0  # requests that found the pool full (metrics)
        self._sem = asyncio.Semaphore(limit)

    async def acquire(self) -> None:
        if not self._sem.locked():  # free: taken at once, without arming a timer for a wait that never comes
            await self._sem.acquire()
            self.in_use += 1
            return
        try:
            async with asyncio.timeout(self.wait):
                await self._sem.acquire()
        except TimeoutError:
            self.refused += 1
            raise PoolFull(f"upstream '{self.upstream}': the connection pool for {self.kind} requests is full "
                           f"({self.limit} in use for {self.wait:g}s); try again later") from None
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        self._sem.release()


class Pool:
    """The replicas of one named upstream, spread round-robin over the healthy ones."""

    def __init__(self, cfg: config.Upstream, observer: HealthObserver | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.replicas = [Replica(u) for u in cfg.urls]
        # Its own connections, so each upstream's idle ones close after its own keep-alive: the
        # forwarding session (made by Upstreams.start, in the loop) and the streaming legs' client.
        self.session: aiohttp.ClientSession | None = None
        self.streams = StreamClient(cfg.keepalive)
        self._rr = itertools.count()
        self._observer = observer
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        self.budgets: dict[Kind, Budget] = {
            "forward": Budget(cfg.name, "forward", cfg.max_connections, cfg.pool_timeout),
            "stream": Budget(cfg.name, "stream", cfg.max_streams, cfg.pool_timeout),
            "check": Budget(cfg.name, "check", CHECK_CONNECTIONS, cfg.pool_timeout),
        }
        for r in self.replicas:
            self._notify(r)

    def candidates(self) -> list[Replica]:
        """Healthy replicas round-robin; when none is, all of them (a replica marked down may
        be back already, and trying costs a refused connection, while refusing costs the request)."""
        pick = [r for r in self.replicas if r.healthy] or self.replicas
        start = next(self._rr) % len(pick)
        return pick[start:] + pick[:start]

    def owns(self, url: URL) -> bool:
        """Whether an absolute URL an upstream answered with names one of its replicas. The scheme
        may differ: behind a proxy that terminated TLS the server is told X-Forwarded-Proto: https
        and names itself https://<its host:port>, a URL no client can use."""
        return any(r.url.host == url.host and (r.url.port == url.port or r.url.explicit_port == url.explicit_port)
                   for r in self.replicas)

    def mark_down(self, replica: Replica, reason: object) -> None:
        replica.successes = 0
        if replica.healthy:
            replica.healthy = False
            log.warning("upstream %s replica %s taken out: %s", self.name, replica.label, reason)
            self._notify(replica)

    def mark_up(self, replica: Replica, why: str) -> None:
        if not replica.healthy:
            replica.healthy = True
            log.info("upstream %s replica %s is back (%s)", self.name, replica.label, why)
            self._notify(replica)

    def answered(self, replica: Replica) -> None:
        """A request reached ``replica``: back in rotation if a refused connection took it out, but
        not if its health checks did. Their verdict stands until one passes: an upstream behind a
        proxy whose backend died answers every request (502, 503), and each answer put it back,
        readiness and the health gauge saying up between checks while every client got errors."""
        if replica.failures < self.cfg.health.unhealthy_threshold:
            self.mark_up(replica, "it answered a request")

    def record_check(self, replica: Replica, ok: bool, reason: object = None) -> None:
        h = self.cfg.health
        if ok:
            replica.checked = True
            replica.failures = 0
            replica.successes += 1
            if replica.successes >= h.healthy_threshold:
                self.mark_up(replica, "health check passed")
        else:
            replica.successes = 0
            replica.failures += 1
            if replica.healthy and replica.failures >= h.unhealthy_threshold:
                self.mark_down(replica, f"health check failed {replica.failures} times ({reason})")

    def _notify(self, replica: Replica) -> None:
        if self._observer is not None:
            self._observer(self.name, replica.label, replica.healthy)

    @property
    def ready(self) -> bool:
        return any(r.healthy and r.checked for r in self.replicas)


def request_url(replica: Replica, path_qs: str, headers: Mapping[str, str]) -> URL:
    """Where a request to ``replica`` goes. Credentials in a replica's URL authenticate the gateway's
    own requests; a request that carries its own Authorization (a client's token) keeps it, and the
    URL's credentials are left off (aiohttp refuses the two together)."""
    url = URL(replica.base + path_qs, encoded=True)
    if (url.raw_user or url.raw_password) and any(k.lower() == "authorization" for k in headers):
        url = url.with_user(None)
    return url


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client path goes: the pool, the route prefix it came in under, the upstream path."""

    pool: Pool
    prefix: str  # "" for the root route
    path: str

    def client_path(self, upstream_path: str) -> str:
        """An upstream path as the client must see it (under the route prefix)."""
        return self.prefix + upstream_path


@dataclass
class Upstreams:
    cfg: config.Config
    observer: HealthObserver | None = None
    # What each upstream answers browsers of each origin (see gateway.cors): learned from every answer.
    cors: CorsMemory = field(default_factory=CorsMemory)
    pools: dict[str, Pool] = field(init=False)
    _routes: list[tuple[str, Pool]] = field(init=False)
    _health_session: aiohttp.ClientSession | None = field(init=False, default=None)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.pools = {u.name: Pool(u, self.observer) for u in self.cfg.upstreams}
        self._routes = [("" if r.prefix == "/" else r.prefix, self.pools[r.upstream]) for r in self.cfg.routes]

    async def start(self) -> None:
        for pool in self.pools.values():
            # No connector limit: the budgets above are the limits, with bounded waits. Idle connections
            # go before the upstream's own keep-alive closes them (aiohttp keeps them 15 s by default).
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True,
                                             **_keepalive(pool.cfg.keepalive))
            # auto_decompress off: bodies pass through byte-for-byte, Content-Encoding and all.
            pool.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 cookie_jar=aiohttp.DummyCookieJar())
        replicas = sum(len(p.replicas) for p in self.pools.values())
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * replicas, enable_cleanup_closed=True,
                                           **_keepalive(min(p.cfg.keepalive for p in self.pools.values()))),
            cookie_jar=aiohttp.DummyCookieJar())
        for pool in self.pools.values():
            self._tasks.append(asyncio.create_task(self._health_loop(pool), name=f"health:{pool.name}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for session in (*(p.session for p in self.pools.values()), self._health_session):
            if session is not None:
                await session.close()
        for pool in self.pools.values():
            pool.session = None
            pool.streams.close()
        self._health_session = None

    @property
    def ready(self) -> bool:
        return all(p.ready for p in self.pools.values())

    def route(self, path: str) -> Target:
        for prefix, pool in self._routes:
            if not prefix:
                return Target(pool, "", path)
            if path == prefix or path.startswith(prefix + "/"):
                return Target(pool, prefix, path[len(prefix):] or "/")
        raise AssertionError("config guarantees a root route")

    async def send(self, pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str] | dict[str, str],
                   data: Any = None, timeout: aiohttp.ClientTimeout | None = None,
                   kind: Kind = "forward", again: bool = False) -> aiohttp.ClientResponse:
        """Send to the first replica that accepts the connection; response headers are read.

        The connection counts against ``pool``'s budget for ``kind`` until the response
        is released. ``timeout`` overrides the pool's (for the gateway's own quick checks).
        ``again``: the request may be sent once more if its connection broke before any answer
        (``agentapi.may_send_again``; aiohttp does that itself for the idempotent methods).
        """
        assert pool.session is not None, "upstreams not started"
        budget = pool.budgets[kind]
        resp = await self._budgeted(pool, budget, headers, lambda: self._send(
            pool, method, path_qs, headers, data, timeout or pool.timeout, again))
        conn = resp.connection
        if conn is None:  # nothing left to read: the connection is back in the pool already
            budget.release()
        else:
            conn.add_callback(budget.release)  # called once, when the response lets go of it
        return resp

    async def _budgeted(self, pool: Pool, budget: Budget, headers: Mapping[str, str],
                        send: Callable[[], Awaitable[H]]) -> H:
        """``send`` within a slot of ``budget`` (given back if it fails; the caller ties it to the
        answer otherwise), and the upstream's CORS headers learnt from what it answered."""
        await budget.acquire()
        try:
            resp = await send()
        except BaseException:
            budget.release()
            raise
        self.cors.learn(pool.name, headers, resp.status, resp.headers)
        return resp

    async def _send(self, pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str] | dict[str, str],
                    data: Any, timeout: aiohttp.ClientTimeout, again: bool) -> aiohttp.ClientResponse:
        session = pool.session
        assert session is not None

        async def attempt(replica: Replica) -> aiohttp.ClientResponse:
            url = request_url(replica, path_qs, headers)
            tries = 2 if again else 1
            for i in range(tries):
                try:
                    return await session.request(
                        method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout,
                        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
                except _NOT_REACHED:
                    raise  # never connected: the next replica's (_first_reached)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # A kept-alive connection the server closed as the request went out on it (its
                    # idle timer, under load): unanswered. Sent once more only if it may be.
                    if i == tries - 1:
                        raise
            raise AssertionError("unreachable: the last try returns or raises")

        return await self._first_reached(pool, attempt, timeout.sock_read or timeout.total)

    async def _first_reached(self, pool: Pool, attempt: Callable[[Replica], Awaitable[R]],
                             timeout: float | None = None) -> R:
        """``attempt`` on the pool's replicas in turn until one is reached: the one failover rule.

        A replica never reached (a refused connection, a connect timeout) is marked down and the
        next one tried; once one is reached, what it answers, or how it failed (502/504), is the
        answer: a request that reached a replica is never sent again."""
        refused: list[str] = []
        for replica in pool.candidates():
            try:
                result = await attempt(replica)
            except _NOT_REACHED as exc:
                pool.mark_down(replica, exc)
                refused.append(f"{replica.label}: {exc if isinstance(exc, ConnectFailed) else exc.__class__.__name__}")
                continue
            except aiohttp.WSServerHandshakeError:  # reached, and it answered: the caller relays its status
                pool.answered(replica)
                raise
            except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
                raise as_upstream_error(exc, f"upstream '{pool.name}' ({replica.label})", timeout) from None
            pool.answered(replica)
            return result
        if not pool.replicas:
            raise NoHealthyReplica(f"upstream '{pool.name}' has no replica")
        raise UpstreamUnreachable(f"upstream '{pool.name}' unreachable: {'; '.join(refused)}")

    async def send_stream(self, pool: Pool, method: Literal["GET", "POST"], path_qs: str,
                          headers: CIMultiDict[str], data: bytes | None = None) -> LegResponse:
        """Open a streaming leg (a body the gateway captures) on its own client; head read.

        The same rules as ``send``: the pool's budget for streams, the next replica when one
        refuses the connection, the pool's connect and read timeouts, the same errors.

        The gateway parses a leg's bytes as SSE and writes its own framing to clients, so a leg is
        asked for unencoded bytes whatever the client accepts: a compressing proxy in front of the
        upstream would otherwise gzip it, and the capture would read no events at all."""
        headers = CIMultiDict(headers)
        headers["Accept-Encoding"] = "identity"
        budget = pool.budgets["stream"]
        return await self._budgeted(pool, budget, headers, lambda: self._send_stream(
            pool, method, path_qs, headers, data, budget.release))

    async def _send_stream(self, pool: Pool, method: str, path_qs: str, headers: CIMultiDict[str],
                           data: bytes | None, on_release: Callable[[], None]) -> LegResponse:
        cfg = pool.cfg
        return await self._first_reached(pool, lambda replica: pool.streams.request(
            method, request_url(replica, path_qs, headers), headers, data,
            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout, on_release=on_release,
        ), cfg.read_timeout)

    @contextlib.asynccontextmanager
    async def websocket(self, pool: Pool, path_qs: str, headers: CIMultiDict[str], protocols: list[str],
                        max_message: int, heartbeat: float) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket to the first replica that accepts the connection, held against the pool's
        budget for streams until the block ends. Raises aiohttp.WSServerHandshakeError when the
        upstream answers the upgrade with something else (its status is the caller's to relay).
        A message of the upstream's is held whole: past ``max_message`` bytes the socket is closed
        with 1009 (the receive that met it answers an ERROR message). The upstream is pinged every
        ``heartbeat``: one that hung (or a host gone silent) is let go when it does not answer."""
        assert pool.session is not None, "upstreams not started"
        budget = pool.budgets["stream"]
        await budget.acquire()
        try:
            ws = await self._ws_connect(pool, path_qs, headers, protocols, max_message, heartbeat)
            try:
                yield ws
            finally:
                await ws.close()
        finally:
            budget.release()

    async def _ws_connect(self, pool: Pool, path_qs: str, headers: CIMultiDict[str],
                          protocols: list[str], max_message: int,
                          heartbeat: float) -> aiohttp.ClientWebSocketResponse:
        session = pool.session
        assert session is not None
        return await self._first_reached(pool, lambda replica: session.ws_connect(
            request_url(replica, path_qs, headers), headers=headers, protocols=protocols,
            timeout=aiohttp.ClientWSTimeout(ws_close=10.0), autoping=True, autoclose=False, max_msg_size=max_message,
            heartbeat=heartbeat))

    async def _health_loop(self, pool: Pool) -> None:
        h = pool.cfg.health
        timeout = aiohttp.ClientTimeout(total=h.timeout)
        while True:  # check at once, so readiness is known before the first interval
            await asyncio.gather(*(self._check(pool, r, h.path, timeout) for r in pool.replicas))
            await asyncio.sleep(h.interval)

    async def _check(self, pool: Pool, replica: Replica, path: str, timeout: aiohttp.ClientTimeout) -> None:
        assert self._health_session is not None
        headers = dict(pool.cfg.headers)
        try:  # the URL as for any request: the service's Authorization, if set, wins over the URL's credentials
            async with self._health_session.get(request_url(replica, path, headers), timeout=timeout,
                                                headers=headers) as resp:
                await resp.read()
                pool.record_check(replica, 200 <= resp.status < 300, f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            pool.record_check(replica, False, exc.__class__.__name__)
        except Exception:  # a bug here must not kill health checking for good
            log.exception("health check of %s crashed", replica.label)
