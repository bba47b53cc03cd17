"""CORS on the answers the gateway makes itself, as the upstream would have made them.

A browser on another origin reads a response only if it carries the upstream's
``Access-Control-*`` headers. Forwarded responses have them already; the ones
the gateway makes (a stream replayed from its log, a 503) would not. So the
gateway learns them: every upstream answer to a request with an ``Origin``
teaches what the upstream says to that origin (Agent Server deployments
configure CORS upstream, and the gateway has nothing to decide), and answers the
gateway makes for that origin carry the same. ``Location`` and
``X-Gateway-Resume`` are added to the exposed headers wherever the upstream
exposes ``Content-Location``: the SDKs re-join with ``Location`` after a cut.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

from multidict import CIMultiDict

# Origins are chosen by clients: remember this many (upstream, origin) answers, newest kept.
_MEMORY = 1000
_LEARNED = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers")
_ALSO_EXPOSED = ("location", "x-gateway-resume")


class CorsMemory:
    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()

    def learn(self, upstream: str, request: Mapping[str, str], status: int, headers: Mapping[str, str]) -> None:
        """Remember what the upstream answered the origin of a request (``request``: its headers);
        nothing when the request was a preflight: that answer says what may be sent, not what a
        response exposes (it has no Expose-Headers), and learnt it hid Location and Content-Location
        on the answers the gateway makes for that origin. An answer without CORS headers is learnt
        too, as forgetting: the upstream no longer allows that origin (its allow-list changed). But
        for a 5xx: a server's error pages often carry none (Starlette's come from outside its CORS
        middleware), and say nothing of what it allows."""
        origin = request.get("Origin")
        if not origin or "Access-Control-Request-Method" in request:
            return
        key = (upstream, origin)
        if "Access-Control-Allow-Origin" not in headers:
            if status < 500:
                self._seen.pop(key, None)
            return
        self._seen[key] = {h: headers[h] for h in _LEARNED if h in headers}
        self._seen.move_to_end(key)
        while len(self._seen) > _MEMORY:
            self._seen.popitem(last=False)

    def headers_for(self, upstream: str, origin: str | None) -> dict[str, str]:
        """The CORS headers for an answer the gateway makes to ``origin`` ({} when never learned)."""
        if not origin:
            return {}
        learned = self._seen.get((upstream, origin))
        if learned is None:
            return {}
        out = dict(learned)
        if "Access-Control-Expose-Headers" in out:
            out["Access-Control-Expose-Headers"] = exposing_location(out["Access-Control-Expose-Headers"])
        return out


def vary_on_origin(headers: CIMultiDict[str]) -> None:
    """``Origin`` added to ``Vary`` (the names already there kept; none twice): the answer depends
    on the request's Origin, as every answer of the upstream says (Starlette's CORS middleware adds it
    with or without an Origin), so a cache in front keys it by Origin."""
    names = [n.strip() for line in headers.getall("Vary", []) for n in line.split(",") if n.strip()]
    if "*" in names or any(n.lower() == "origin" for n in names):
        return
    headers["Vary"] = ", ".join([*names, "Origin"])


def exposing_location(expose: str) -> str:
    """An Expose-Headers value that also exposes Location (and X-Gateway-Resume) where it exposes
    Content-Location: adding names a browser may read breaks nothing."""
    exposed = [h.strip() for h in expose.split(",") if h.strip()]
    have = {h.lower() for h in exposed}
    if "content-location" not in have:
        return expose
    return ", ".join(exposed + [h for h in _ALSO_EXPOSED if h not in have])
