"""The Agent Server API as the gateway knows it: the endpoints whose streams it captures, where a
captured stream is re-joined, checked and cancelled upstream, how a stream is keyed in the log,
and the ``StreamMeta`` a new capture begins with.

Adding a kind of captured stream starts here (its route, key and metadata) and in the hub; the
handlers and the log need nothing new.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal, Mapping
from urllib.parse import unquote

from multidict import CIMultiDict

from gateway.eventlog import StreamMeta

# What the gateway asks a thread stream for: everything, filtered per client.
THREAD_MODES = ("run_modes", "lifecycle", "state_update")
THREAD_CAPTURE_QUERY = "stream_modes=" + ",".join(THREAD_MODES)
# The event every run stream starts with (its run id and attempt): a run held from it is held whole.
RUN_START_EVENT = b"metadata"

# --- the captured endpoints ----------------------------------------------------------------------

Endpoint = Literal["create_run_stream", "create_stateless_run_stream", "create_background_run",
                   "join_run", "join_stateless_run", "join_thread", "session_events"]

# (method, upstream path, endpoint): the group(s) of a match are the path's thread and run ids.
ROUTES: tuple[tuple[str, re.Pattern[str], Endpoint], ...] = (
    ("POST", re.compile(r"^/threads/([^/]+)/runs/stream$"), "create_run_stream"),
    ("POST", re.compile(r"^/runs/stream$"), "create_stateless_run_stream"),
    ("POST", re.compile(r"^/threads/([^/]+)/runs$"), "create_background_run"),
    ("GET", re.compile(r"^/threads/([^/]+)/runs/([^/]+)/stream$"), "join_run"),
    ("GET", re.compile(r"^/runs/([^/]+)/stream$"), "join_stateless_run"),
    ("GET", re.compile(r"^/threads/([^/]+)/stream$"), "join_thread"),
    # The v3 thread session's events: SSE on POST, a WebSocket on GET (gateway.sessions).
    ("POST", re.compile(r"^/threads/([^/]+)/stream/events$"), "session_events"),
    ("GET", re.compile(r"^/threads/([^/]+)/stream/events$"), "session_events"),
)


def route(method: str, path: str) -> tuple[Endpoint, tuple[str, ...]] | None:
    """Which captured endpoint an upstream path is, and its ids; None: forwarded as is."""
    for m, pattern, endpoint in ROUTES:
        if method == m and (match := pattern.match(path)):
            return endpoint, match.groups()
    return None


# --- requests that may be sent again ------------------------------------------------------------

# POSTs of the API that only read (searches, counts, a thread's history, its state at a
# checkpoint): one whose kept-alive connection the server closed under it, unanswered, is sent
# again, as aiohttp sends the idempotent methods again by itself. Any other POST may have created
# something (a run, a thread) and is never sent twice.
_READ_ONLY_POSTS = re.compile(
    r"^/(?:(?:assistants|threads|runs/crons)/(?:search|count)|store/items/search|store/namespaces"
    r"|assistants/[^/]+/versions|threads/[^/]+/history|threads/[^/]+/state/checkpoint)$")


def may_send_again(method: str, path: str) -> bool:
    """Whether a request that reached the upstream but got no answer may be sent once more."""
    return method == "POST" and _READ_ONLY_POSTS.match(path) is not None


# --- ids and keys --------------------------------------------------------------------------------

_CAPTURABLE_ID = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")
_RUN_IN_PATH = re.compile(r"^(?:.*?)(?:/threads/(?P<tid>[^/]+))?/runs/(?P<rid>[^/?]+)")


def canonical_id(raw: str) -> str:
    """A run or thread id from a path as the upstream understands it: one spelling per id.

    The Agent Server parses these as UUIDs, so upper case, missing hyphens or
    percent-encoding name the same run; the gateway keys its log the same way,
    or one run would be captured (and stored) once per spelling.
    """
    text = unquote(raw) if "%" in raw else raw
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def is_uuid(ident: str) -> bool:
    """Whether an id from a path is one the Agent Server would accept (it answers others with 422)."""
    try:
        uuid.UUID(ident)
    except ValueError:
        return False
    return True


def capturable(ident: str) -> bool:
    """Run and thread ids the log will key a stream by (UUIDs in practice); others are just forwarded."""
    return bool(_CAPTURABLE_ID.match(ident))


def run_key(upstream: str, run_id: str) -> str:
    return f"{upstream}/run/{run_id}"


def thread_key(upstream: str, thread_id: str) -> str:
    return f"{upstream}/thread/{thread_id}"


def session_key(upstream: str, thread_id: str) -> str:
    return f"{upstream}/session/{thread_id}"


def keys_for(ident: str, upstreams: list[str]) -> list[str]:
    """The log keys a run or thread id may be held under (a key itself first): the one rule the
    admin listener and the command line resolve an id by (a thread id: its thread stream first)."""
    return [ident, *(run_key(u, ident) for u in upstreams), *(thread_key(u, ident) for u in upstreams),
            *(session_key(u, ident) for u in upstreams)]


def run_ids(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The thread and run ids a run-creating answer names (Content-Location, else Location)."""
    for h in ("Content-Location", "Location"):
        v = headers.get(h)
        if v and (m := _RUN_IN_PATH.match(v)):
            tid, rid = m.group("tid"), m.group("rid")
            return (canonical_id(tid) if tid else None), canonical_id(rid)
    return None, None


# --- what the gateway holds of a stream ------------------------------------------------------------

def run_meta(upstream: str, thread_id: str | None, run_id: str, *, resumable: bool) -> StreamMeta:
    """A run as a capture begins it; ``thread_id`` None: a stateless run (it has no join path upstream,
    the gateway serves ``/runs/{id}/stream`` from its log)."""
    path = f"/threads/{thread_id}/runs/{run_id}/stream" if thread_id is not None else f"/runs/{run_id}/stream"
    return StreamMeta(key=run_key(upstream, run_id), kind="run", upstream=upstream, path=path,
                      thread_id=thread_id, run_id=run_id, resumable=resumable and thread_id is not None)


def thread_meta(upstream: str, thread_id: str) -> StreamMeta:
    return StreamMeta(key=thread_key(upstream, thread_id), kind="thread", upstream=upstream,
                      path=f"/threads/{thread_id}/stream", thread_id=thread_id, resumable=True)


def session_meta(upstream: str, thread_id: str) -> StreamMeta:
    """A thread's v3 session events (``client.threads.stream``): captured once per thread, every channel."""
    return StreamMeta(key=session_key(upstream, thread_id), kind="session", upstream=upstream,
                      path=f"/threads/{thread_id}/stream/events", thread_id=thread_id, resumable=True)


def resource_path(meta: StreamMeta) -> str:
    """The run (or thread) a stream belongs to: its Content-Location, and what the upstream is asked
    about it (does it exist, may this client read it)."""
    if meta.kind == "run" and meta.thread_id is not None:
        return f"/threads/{meta.thread_id}/runs/{meta.run_id}"
    if meta.kind == "run":
        return f"/runs/{meta.run_id}"
    return f"/threads/{meta.thread_id}"


def cancel_path(meta: StreamMeta) -> str | None:
    """Where a run is cancelled upstream (None: a stateless run has no cancel endpoint)."""
    if meta.kind != "run" or meta.thread_id is None or meta.run_id is None:
        return None
    return f"/threads/{meta.thread_id}/runs/{meta.run_id}/cancel"


def stream_headers() -> CIMultiDict[str]:
    """The headers of an event stream the gateway answers from its log."""
    return CIMultiDict({"Content-Type": "text/event-stream; charset=utf-8"})


# --- a client's position ---------------------------------------------------------------------------

CursorKind = Literal["none", "start", "seq", "upstream"]


@dataclass(frozen=True, slots=True)
class Cursor:
    """A client's Last-Event-ID: none (live tail), start, a gateway seq, or an upstream id."""

    kind: CursorKind
    seq: int = 0
    raw: str = ""

    def after(self) -> int | None:
        return None if self.kind == "none" else self.seq
