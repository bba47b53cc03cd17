"""Upstream legs of captured streams: the one place their GET request is built and sent.

A leg is one upstream connection of a stream the gateway captures. The hub
opens them all through ``Legs.open``, with the Last-Event-ID that
``gateway.rejoin.leg_last_event_id`` decided, either on a client's behalf (its
forwarded headers) or on its own (the upstream's service headers plus the
credentials of the client that started the capture). Legs go through the gateway's own streaming
client (``gateway.streamclient``), which hands a capture each read's payload as it arrives.
"""

from __future__ import annotations

from typing import Mapping

from multidict import CIMultiDict

from gateway.agentapi import THREAD_CAPTURE_QUERY
from gateway.sessions import CAPTURE_BODY as SESSION_CAPTURE_BODY
from gateway.eventlog import StreamMeta
from gateway.streamclient import LegResponse
from gateway.upstream import Upstreams


class Legs:
    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    async def open(self, meta: StreamMeta, last_event_id: str | None, *,
                   client_headers: CIMultiDict[str] | None = None, auth: Mapping[str, str] | None = None,
                   query: str = "") -> LegResponse:
        """Open the stream's upstream path (GET; a session's events: POST asking for every channel); the
        response has its headers read (GatewayError if none).

        ``client_headers``: the forwarded headers of the client this leg is opened for;
        without them the gateway goes on its own, with the pool's service headers and
        ``auth`` (the captor's credentials win over the service headers).
        """
        pool = self.upstreams.pools[meta.upstream]
        headers: CIMultiDict[str]
        if client_headers is not None:
            headers = CIMultiDict(client_headers)
        else:
            headers = CIMultiDict(pool.cfg.headers)
            headers.update(auth or {})
        headers["Accept"] = "text/event-stream"
        headers.popall("Last-Event-ID", None)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        if meta.kind == "thread":
            query = THREAD_CAPTURE_QUERY
        path = meta.path + (f"?{query}" if query else "")
        if meta.kind == "session":
            headers.popall("Content-Length", None)
            headers["Content-Type"] = "application/json"
            return await self.upstreams.send_stream(pool, "POST", path, headers, SESSION_CAPTURE_BODY)
        return await self.upstreams.send_stream(pool, "GET", path, headers)
