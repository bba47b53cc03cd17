"""Upstreams: the route table, replica pools with health checks, and sending requests.

A request that never reached a replica (connection refused, connect timeout)
is retried on the next healthy replica; once bytes were sent it is never
replayed, so a run is never created twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway import config
from gateway.errors import NoHealthyReplica, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("gateway.upstream")


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


class Pool:
    """The replicas of one named upstream, spread round-robin over the healthy ones."""

    def __init__(self, cfg: config.Upstream, observer: HealthObserver | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.replicas = [Replica(u) for u in cfg.urls]
        self._rr = itertools.count()
        self._observer = observer
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        for r in self.replicas:
            self._notify(r)

    def candidates(self) -> list[Replica]:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            return []
        start = next(self._rr) % len(healthy)
        return healthy[start:] + healthy[:start]

    def owns(self, url: URL) -> bool:
        return any(r.url.origin() == url.origin() for r in self.replicas)

    def mark_down(self, replica: Replica, reason: object) -> None:
        replica.successes = 0
        if replica.healthy:
            replica.healthy = False
            log.warning("upstream %s replica %s taken out: %s", self.name, replica.label, reason)
            self._notify(replica)

    def record_check(self, replica: Replica, ok: bool, reason: object = None) -> None:
        h = self.cfg.health
        if ok:
            replica.checked = True
            replica.failures = 0
            replica.successes += 1
            if not replica.healthy and replica.successes >= h.healthy_threshold:
                replica.healthy = True
                log.info("upstream %s replica %s is back", self.name, replica.label)
                self._notify(replica)
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
    pools: dict[str, Pool] = field(init=False)
    _routes: list[tuple[str, Pool]] = field(init=False)
    _session: aiohttp.ClientSession | None = field(init=False, default=None)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.pools = {u.name: Pool(u, self.observer) for u in self.cfg.upstreams}
        self._routes = [("" if r.prefix == "/" else r.prefix, self.pools[r.upstream]) for r in self.cfg.routes]

    async def start(self) -> None:
        limit = sum(u.max_connections for u in self.cfg.upstreams)
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, enable_cleanup_closed=True)
        # auto_decompress off: bodies pass through byte-for-byte, Content-Encoding and all.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        for pool in self.pools.values():
            self._tasks.append(asyncio.create_task(self._health_loop(pool), name=f"health:{pool.name}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

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
                   data: Any = None, timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        """Send to the first replica that accepts the connection; response headers are read.

        ``timeout`` overrides the pool's (for the gateway's own quick checks).
        """
        assert self._session is not None, "upstreams not started"
        candidates = pool.candidates()
        if not candidates:
            raise NoHealthyReplica(f"upstream '{pool.name}' has no healthy replica")
        refused: list[str] = []
        for replica in candidates:
            url = URL(replica.base + path_qs, encoded=True)
            try:
                return await self._session.request(
                    method, url, headers=headers, data=data, allow_redirects=False,
                    timeout=timeout or pool.timeout, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never reached the replica: safe to try the next one.
                pool.mark_down(replica, exc)
                refused.append(f"{replica.label}: {exc.__class__.__name__}")
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                limit = (timeout or pool.timeout).sock_read or (timeout or pool.timeout).total
                raise UpstreamTimeout(
                    f"upstream '{pool.name}' ({replica.label}) did not answer within {limit:g}s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamUnreachable(f"upstream '{pool.name}' ({replica.label}) failed: {exc or exc.__class__.__name__}") from None
        raise UpstreamUnreachable(f"upstream '{pool.name}' unreachable: {'; '.join(refused)}")

    async def _health_loop(self, pool: Pool) -> None:
        h = pool.cfg.health
        timeout = aiohttp.ClientTimeout(total=h.timeout)
        while True:  # check at once, so readiness is known before the first interval
            await asyncio.gather(*(self._check(pool, r, h.path, timeout) for r in pool.replicas))
            await asyncio.sleep(h.interval)

    async def _check(self, pool: Pool, replica: Replica, path: str, timeout: aiohttp.ClientTimeout) -> None:
        assert self._session is not None
        try:
            async with self._session.get(replica.base + path, timeout=timeout, headers=dict(pool.cfg.headers)) as resp:
                await resp.read()
                pool.record_check(replica, 200 <= resp.status < 300, f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            pool.record_check(replica, False, exc.__class__.__name__)
        except Exception:  # a bug here must not kill health checking for good
            log.exception("health check of %s crashed", replica.label)
