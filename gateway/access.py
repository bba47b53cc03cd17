"""Who may read a stream the log holds: the upstream decides, the log remembers who captured it.

Serving a replay from the log must not bypass the upstream's own auth. Before
a client reads a held stream, the gateway asks the upstream for the run (or
thread) with that client's credentials, and answers as the upstream does when
it says no. Positive answers are cached briefly, so a reconnect storm costs
one upstream request per client and stream, not one per reconnect.

When the upstream cannot answer (down, or a stateless run it has no route
for), the credentials must match those of the client that started the
capture; the log keeps a salted hash of them, never the secrets.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Mapping

import aiohttp

from gateway.errors import GatewayError
from gateway.eventlog import StreamMeta
from gateway.upstream import Pool, Upstreams

log = logging.getLogger("gateway.access")

# Enough for every client of a busy gateway within the cache TTL; oldest entries go first.
_CACHE_ENTRIES = 10_000
# A resume must not hang on a slow upstream for its full read timeout: past this, the
# captor comparison decides.
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=3.0)


def fingerprint(auth: dict[str, str], salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for name in sorted(auth, key=str.lower):
        h.update(b"\0" + name.lower().encode() + b"\0" + auth[name].encode())
    return h.hexdigest()


def with_captor(meta: StreamMeta, auth: dict[str, str]) -> StreamMeta:
    """``meta`` recording (hashed) who starts its capture, for the checks the upstream cannot answer."""
    if not auth:
        return meta
    salt = secrets.token_hex(8)
    return replace(meta, auth_salt=salt, auth_digest=fingerprint(auth, salt))


class AccessCheck:
    def __init__(self, upstreams: Upstreams, ttl: float) -> None:
        self.upstreams = upstreams
        self.ttl = ttl
        self._ok: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _same_captor(self, meta: StreamMeta, auth: dict[str, str]) -> bool:
        if meta.auth_digest is None or meta.auth_salt is None:
            return True  # captured without credentials: nothing to protect beyond the upstream
        return secrets.compare_digest(meta.auth_digest, fingerprint(auth, meta.auth_salt))

    async def denial(self, pool: Pool, meta: StreamMeta, headers: Mapping[str, str],
                     auth: dict[str, str]) -> aiohttp.ClientResponse | None:
        """None when the client may read ``meta``; else the upstream's refusal to relay as is.

        ``headers`` go to the upstream with the check (so any auth scheme it uses works; they
        ask for JSON);
        ``auth`` are the credential headers compared with the captor's.
        """
        cache_key = (meta.key, fingerprint(auth, "cache"))
        now = time.monotonic()
        expires = self._ok.get(cache_key)
        if expires is not None and expires > now:
            return None
        if meta.thread_id is None:
            if self._same_captor(meta, auth):
                return None
            raise StreamHidden()
        path = f"/threads/{meta.thread_id}" + (f"/runs/{meta.run_id}" if meta.kind == "run" else "")
        try:
            resp = await self.upstreams.send(pool, "GET", path, dict(headers), timeout=CHECK_TIMEOUT)
        except GatewayError as exc:
            log.info("upstream cannot check access to %s (%s); comparing credentials", meta.key, exc.detail)
            if self._same_captor(meta, auth):
                return None
            raise StreamHidden() from None
        if resp.status in (401, 403, 404):
            return resp
        resp.release()
        if not 200 <= resp.status < 300:  # no clear yes: only the captor, and nothing cached
            if self._same_captor(meta, auth):
                return None
            raise StreamHidden()
        self._ok[cache_key] = now + self.ttl
        self._ok.move_to_end(cache_key)
        while len(self._ok) > _CACHE_ENTRIES:
            self._ok.popitem(last=False)
        return None


class StreamHidden(GatewayError):
    """Not this client's stream. 404, as for a stream that does not exist: nothing to probe."""

    status = 404

    def __init__(self) -> None:
        super().__init__("Run not found")
