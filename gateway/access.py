"""Who may read a stream the log holds: the upstream decides, the log remembers who captured it.

Serving a replay from the log must not bypass the upstream's own auth. Before
a client reads a held stream, the gateway asks the upstream for the run (or
thread) with that client's headers, and answers as the upstream does when it
says no. Positive answers are cached briefly, and identical checks under way at
once share one upstream request, so a reconnect storm costs one upstream request
per caller and stream, not one per reconnect.

A cached yes, and the fallback below, are keyed by *every* header that reaches
the upstream's check (but for a few per-request tracing and caching headers no
auth scheme reads), not only by well-known credential headers: the gateway
cannot know which header the upstream authenticates by (a custom ``X-User``,
a cookie, an IP behind ``X-Forwarded-For``), so only a request the upstream
could not tell apart from the one it said yes to reuses that yes.

When the upstream cannot answer (down, or a stateless run it has no route
for), the client's headers must match those of the client that started the
capture; the log keeps a salted hash of them, never the values.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Mapping

import aiohttp

from gateway import agentapi
from gateway.errors import GatewayError
from gateway.eventlog import StreamMeta
from gateway.upstream import Answer, Pool, PoolFull, Upstreams, UpstreamError, classify

log = logging.getLogger("gateway.access")

# Enough for every client of a busy gateway within the cache TTL; oldest entries go first.
_CACHE_ENTRIES = 10_000
# A resume must not hang on a slow upstream for its full read timeout: past this, the
# captor comparison decides.
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=3.0)
# Headers that change from one request of the same caller to the next and that no auth
# scheme reads: left out of the key, or every traced client would miss every time.
_NOT_IDENTITY = frozenset({
    "traceparent", "tracestate", "baggage", "sentry-trace", "x-request-id", "x-amzn-trace-id",
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
    "x-cloud-trace-context", "cache-control", "pragma", "accept-encoding", "accept-language",
    "if-none-match", "if-modified-since",
})


def fingerprint(headers: Mapping[str, str], salt: str) -> str:
    """A salted hash of the identity a request shows the upstream (header values are never kept).

    Header values may carry bytes that are not UTF-8 (aiohttp keeps them as surrogates).
    """
    h = hashlib.sha256(salt.encode())
    for name, value in sorted((k.lower(), v) for k, v in headers.items() if k.lower() not in _NOT_IDENTITY):
        h.update(b"\0" + name.encode("utf-8", "surrogateescape") + b"\0" + value.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def with_captor(meta: StreamMeta, identity: Mapping[str, str]) -> StreamMeta:
    """``meta`` recording (hashed) who starts its capture, for the checks the upstream cannot answer."""
    salt = secrets.token_hex(8)
    return replace(meta, auth_salt=salt, auth_digest=fingerprint(identity, salt))


class AccessCheck:
    def __init__(self, upstreams: Upstreams, ttl: float) -> None:
        self.upstreams = upstreams
        self.ttl = ttl
        self._ok: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._flights: dict[tuple[str, str], asyncio.Future[None]] = {}  # checks under way, by cache key
        self._salt = secrets.token_hex(8)  # the cache's own: its keys are worthless outside this process

    def _same_captor(self, meta: StreamMeta, identity: Mapping[str, str]) -> bool:
        if meta.auth_digest is None or meta.auth_salt is None:
            return False  # nothing recorded (a log from before): only the upstream may say yes
        return secrets.compare_digest(meta.auth_digest, fingerprint(identity, meta.auth_salt))

    async def check(self, pool: Pool, meta: StreamMeta, headers: Mapping[str, str]) -> None:
        """Returns when the client may read ``meta``; raises Refused with the upstream's refusal (to
        relay as is), or StreamHidden.

        ``headers`` are the client's as they reach the upstream's check: they go with the
        check, and they are the identity that a cached yes and the captor are matched by.
        """
        cache_key = (meta.key, fingerprint(headers, self._salt))
        if self._cached(cache_key):
            return
        flight = self._flights.get(cache_key)
        if flight is not None:
            # The same question is being asked for a request the upstream could not tell apart from
            # this one: wait for that answer instead of asking again (a reconnect storm sends
            # hundreds at once). Only a yes is shared; anything else, this request asks for itself.
            await asyncio.shield(flight)
            if not self._cached(cache_key):
                await self._ask(pool, meta, headers, cache_key)
            return
        flight = self._flights[cache_key] = asyncio.get_running_loop().create_future()
        try:
            await self._ask(pool, meta, headers, cache_key)
        finally:
            del self._flights[cache_key]
            flight.set_result(None)

    def _cached(self, cache_key: tuple[str, str]) -> bool:
        expires = self._ok.get(cache_key)
        return expires is not None and expires > time.monotonic()

    async def _ask(self, pool: Pool, meta: StreamMeta, headers: Mapping[str, str], cache_key: tuple[str, str]) -> None:
        if meta.thread_id is None:
            self._captor_only(meta, headers)
            return
        try:
            resp = await self.upstreams.send(pool, "GET", agentapi.resource_path(meta), dict(headers),
                                             timeout=CHECK_TIMEOUT, kind="check")
        except PoolFull:
            # The gateway could not ask (its own check connections are all in use): that is no
            # answer of the upstream's, and a 404 would tell the client its run does not exist. The
            # captor may read on; anyone else gets the 503, to try again.
            if not self._same_captor(meta, headers):
                raise
            return
        except UpstreamError as exc:
            log.info("upstream cannot check access to %s (%s); comparing with who captured it", meta.key, exc.detail)
            self._captor_only(meta, headers)
            return
        if classify(resp.status) == "refused" and not (resp.status == 404 and meta.kind == "session"):
            raise Refused(resp)
        # A thread the upstream does not know any more (it restarted empty): its session events the
        # gateway holds are its captor's still, and nobody else's.
        resp.release()
        if not 200 <= resp.status < 300:  # no clear yes: only the captor, and nothing cached
            self._captor_only(meta, headers)
            return
        self._ok[cache_key] = time.monotonic() + self.ttl
        self._ok.move_to_end(cache_key)
        while len(self._ok) > _CACHE_ENTRIES:
            self._ok.popitem(last=False)

    def _captor_only(self, meta: StreamMeta, headers: Mapping[str, str]) -> None:
        """The upstream cannot say: only the client that started the capture may read it."""
        if not self._same_captor(meta, headers):
            raise StreamHidden()


class Refused(Exception):
    """The upstream refused this client the stream (401, 403, 404): its answer is relayed as is."""

    def __init__(self, resp: Answer) -> None:
        super().__init__(resp.status)
        self.resp = resp


class StreamHidden(GatewayError):
    """Not this client's stream. 404, as for a stream that does not exist: nothing to probe."""

    status = 404

    def __init__(self) -> None:
        super().__init__("Run not found")
