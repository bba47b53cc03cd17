"""The v3 thread session (the SDKs' ``client.threads.stream``): its events as the gateway stores,
filters and serves them, over SSE and WebSocket.

The upstream numbers a session's events per connection (``seq`` from 1, the thread's history
replayed from the start on every connection, and from 1 again after it restarts), so a client's
``since`` means nothing across connections or restarts. The gateway captures one connection per
thread with every channel, keeps each event's ``event_id``, and gives it the gateway's own id as
its ``seq``: one counter for the whole log, so seqs only grow for the life of the thread, on any
replica, across restarts of either side, and ``since`` is a position in the log.

A stored event is its SSE body without ``seq`` (``event: <method>\\ndata: {...}\\n``); the seq is
put back in front when it is sent (``wire``), so a page read once serves every client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import orjson

from gateway.eventlog import Entry, StreamMeta
from gateway.marks import interrupted_message
from gateway.metrics import GapReason
from gateway.sse import MAX_ID_BYTES, Event, SSEProtocolError

# Every channel the upstream serves; the capture asks for all of them and each client gets its own cut.
CHANNELS = ("values", "updates", "checkpoints", "messages", "tools", "custom", "lifecycle", "input", "tasks")
CAPTURE_BODY = orjson.dumps({"channels": list(CHANNELS)})

_DATA = b"\ndata: {"
ERROR_METHOD = b"error"


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes) -> Any:
    """An event's JSON. orjson refuses a lone surrogate escaped in a string (``"\\ud800"``), which is
    valid JSON and what an upstream writing with JSON.stringify sends: such an event is read by the
    standard parser instead (which takes NaN too, but not here: orjson refused it for a reason).
    Raises ValueError for what is no JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw, parse_constant=_not_json)
        except RecursionError:  # nested deeper than orjson allows: no event of the protocol
            raise ValueError("JSON nested too deep") from None


def dumps(doc: Any) -> bytes:
    """``doc`` as JSON; a string with a lone surrogate (read by ``loads``) escaped as it came."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, separators=(",", ":")).encode()


class BadFilter(ValueError):
    """A subscription the upstream would refuse: its detail, as the upstream words it."""


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events one subscription gets: the upstream's rule (channels, namespace prefixes, depth)."""

    channels: frozenset[str]
    namespaces: tuple[tuple[str, ...], ...] | None = None
    depth: int | None = None

    def keep(self, body: bytes) -> bool:
        """Whether a stored event is for this subscription; what the gateway writes itself always is."""
        if not body.startswith(b"event: ") or body.startswith(b"event: error\n"):
            return True
        try:
            event = loads(body[body.index(_DATA) + 7:])
        except ValueError:
            return True
        if not isinstance(event, dict):
            return False
        # An event that names no channel (an upstream's error without an event_id) is for every
        # subscription, as the gateway's own are: no filter may drop it unseen.
        return not isinstance(event.get("method"), str) or self.matches(event)

    def matches(self, event: dict[str, Any]) -> bool:
        method = event.get("method")
        params = event.get("params") if isinstance(event.get("params"), dict) else {}
        assert isinstance(params, dict)
        channel = "input" if method == "input.requested" else method
        if not isinstance(channel, str):
            return False
        if channel == "custom":
            data = params.get("data")
            name = data.get("name") if isinstance(data, dict) else None
            if "custom" not in self.channels and (not name or f"custom:{name}" not in self.channels):
                return False
        elif channel not in self.channels:
            return False
        if not self.namespaces:
            return True
        namespace = params.get("namespace")
        ns = [s for s in namespace if isinstance(s, str)] if isinstance(namespace, list) else []
        return any(_prefix(ns, p) and (self.depth is None or len(ns) - len(p) <= self.depth) for p in self.namespaces)


def _prefix(namespace: list[str], prefix: tuple[str, ...]) -> bool:
    """A namespace under ``prefix``: segments equal, or a segment without ``:`` naming a node whose
    task ids differ (``child`` matches ``child:<task id>``)."""
    if len(prefix) > len(namespace):
        return False
    for want, have in zip(prefix, namespace):
        if have != want and (":" in want or have.split(":")[0] != want):
            return False
    return True


def supported(channel: object) -> bool:
    return isinstance(channel, str) and (channel in CHANNELS or (channel.startswith("custom:") and len(channel) > 7))


def parse_filter(doc: object, *, strict_namespaces: bool = False) -> Filter:
    """A subscription's channels, namespaces and depth, validated as the upstream validates them
    (BadFilter with its words). ``strict_namespaces``: one malformed namespace drops them all (the
    WebSocket's rule) instead of only itself (the SSE endpoint's)."""
    channels = doc.get("channels") if isinstance(doc, dict) else None
    if not isinstance(channels, list) or not channels:
        raise BadFilter("channels is required and must be a non-empty array")
    bad = [c if isinstance(c, str) else repr(c) for c in channels if not supported(c)]
    if bad:
        raise BadFilter("channels contains unsupported entries: " + ", ".join(bad[:5]) + ". Allowed: values, "
                        "updates, messages, tools, custom, lifecycle, input, tasks, or any `custom:<name>`.")
    assert isinstance(doc, dict)
    raw = doc.get("namespaces")
    namespaces: tuple[tuple[str, ...], ...] | None = None
    if isinstance(raw, list):
        good = [tuple(ns) for ns in raw if isinstance(ns, list) and all(isinstance(s, str) for s in ns)]
        if strict_namespaces and len(good) != len(raw):
            good = []
        namespaces = tuple(good) or None
    depth = doc.get("depth")
    return Filter(frozenset(channels), namespaces,
                  depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else None)


def parse_since(doc: object) -> int | None:
    """``since`` when it is a non-negative integer (a bool is not); anything else means the start."""
    since = doc.get("since") if isinstance(doc, dict) else None
    return since if isinstance(since, int) and not isinstance(since, bool) and since >= 0 else None


def resumed_since(since: int | None, last_event_id: str | None) -> int | None:
    """Where an SSE subscription starts: its ``since``, or the ``Last-Event-ID`` of a plain SSE client
    reconnecting (its original body, the header the seq of the last ``id:`` line it read) when that
    is a later gateway id. Anything else in the header is ignored, as the upstream ignores it."""
    raw = (last_event_id or "").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
        return since
    seq = int(raw)
    return seq if since is None or seq > since else since


# --- the stored form -------------------------------------------------------------------------------

def stored(body: bytes) -> tuple[bytes, str | None]:
    """An upstream event (the body the SSE parser gives) as stored: without its ``seq``, with its
    ``event_id`` apart. An event without one is no part of the thread's history (langgraph-api's
    SSE layer ends a stream whose producer raised with ``event: error`` and the exception): it is
    kept, its id None. Data that is no JSON object, which neither SDK can read (the WebSocket
    transport fails on it), is stored as an unsolicited error that says so and holds it as text."""
    name, raw = _name_and_data(body)
    try:
        event = loads(raw)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return malformed(name, raw), None
    eid = event.get("event_id")
    if not isinstance(eid, str):
        eid = None
    elif len(eid) > MAX_ID_BYTES:  # stored as a record's upstream id: bounded as the parser bounds ids
        raise SSEProtocolError(f"event_id of {len(eid)} characters (more than {MAX_ID_BYTES})")
    event.pop("seq", None)
    method = event.get("method")
    if isinstance(method, str) and "\n" not in method:
        name = method.encode()
    return b"event: " + (name or b"event") + b"\ndata: " + dumps(event) + b"\n", eid


def _name_and_data(body: bytes) -> tuple[bytes, bytes]:
    """A parsed body's ``event:`` name (empty if none) and its data: its data lines joined with a
    line feed (an upstream may split its JSON over several; the parser keeps each as a line)."""
    lines = body.split(b"\n")
    name = lines[0][7:] if lines[0].startswith(b"event: ") else b""
    return name, b"\n".join(line[6:] for line in lines if line.startswith(b"data: "))


def malformed(name: bytes, raw: bytes) -> bytes:
    """The stored notice of an upstream event whose data is no JSON object: what came, as text."""
    doc = {"type": "error", "id": None, "error": "malformed_event",
           "message": "the upstream sent an event whose data is not a JSON object, which the protocol's "
                      "clients cannot read: it is not relayed as an event, its data is here as text",
           "event": name.decode("utf-8", "replace") or None, "data": raw.decode("utf-8", "replace")}
    return b"event: error\ndata: " + orjson.dumps(doc) + b"\n"


def event_id(body: bytes) -> str | None:
    """The ``event_id`` of a stored event (None for the gateway's own)."""
    try:
        doc = loads(body[body.index(b"data: ") + 6:])
    except ValueError:
        return None
    eid = doc.get("event_id") if isinstance(doc, dict) else None
    return eid if isinstance(eid, str) else None


def wire(seq: int, body: bytes) -> bytes:
    """A stored event as the client gets it: its JSON with the gateway id as ``seq``, first."""
    at = body.find(_DATA)
    if at < 0:
        return orjson.dumps({"type": "event", "seq": seq})
    rest = body[at + 8:].rstrip(b"\n")
    # An object that held nothing but its seq is ``{}``: no comma before the end.
    return (b'{"seq":%d' if rest == b"}" else b'{"seq":%d,') % seq + rest


def frame(entries: Iterable[Entry]) -> bytes:
    """SSE frames as the upstream writes them (``event``, ``data``, ``id``), the seq in data and id."""
    return b"".join([b"%s\ndata: %s\nid: %d\n\n" % (body[:max(body.find(b"\n"), 0)], wire(seq, body), seq)
                     for seq, body in entries])


def gap_event(after: int, reason: GapReason, message: str) -> Event:
    """Events may be missing after gateway id ``after``: said in the protocol's own shape, an
    unsolicited error (``"id": null``), which the SDKs log and go on past."""
    doc = {"type": "error", "id": None, "error": "resume_gap", "message": message, "reason": reason,
           "since": after or None}
    return (b"event: error\ndata: " + orjson.dumps(doc) + b"\n", None)


def resume_gap(since: int | None, held: StreamMeta | None) -> dict[str, Any] | None:
    """Events after ``since`` gone from the log (retention trimmed it up to ``held.first_seq``), in the
    protocol's words, unsolicited (``"id": null``), as the upstream refuses a reconnect; None when
    nothing is."""
    if since is None or held is None or not held.first_seq or since + 1 >= held.first_seq:
        return None
    return {"type": "error", "id": None, "error": "resume_gap",
            "message": f"resume gap: since={since} is older than min_available_seq={held.first_seq}",
            "since": since, "min_available_seq": held.first_seq}


def unsolicited(doc: dict[str, Any]) -> bytes:
    """A message of the gateway's own that is no event of the log, as an SSE frame: no seq, no id."""
    return b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"


def interrupted_event(reason: str) -> Event:
    """The capture's end when its upstream is lost for good, in the protocol's shape (an unsolicited
    error); the stream stays open to clients, who are cut so that they reconnect."""
    doc = {"type": "error", "id": None, "error": "capture_interrupted", "message": interrupted_message(reason)}
    return (b"event: error\ndata: " + orjson.dumps(doc) + b"\n", None)


class SessionSeam:
    """Where a capture leg meets what the log holds. The upstream replays the thread's history from
    the start on every connection: what is held (by ``event_id``) is dropped, and the rest appended.

    The leg continues the stream exactly when, before anything new, it re-sends every event held of
    the thread's latest run (``required``), and that run had ended (``ended``): the upstream's replay
    then covers what happened while the gateway was not connected. Otherwise a gap marker goes in
    first: the upstream restarted and lost the thread, trimmed it, or a run went on meanwhile and may
    have published events the upstream does not keep for replay (``custom`` writes, a graph's own
    stream channels): those produced meanwhile are gone, held one of them already or not.

    Retention trims a session's oldest events, which the upstream replays all the same: they are
    known by the first and last of them (``trimmed``: ``StreamMeta.trimmed_from``, ``trimmed_to``).
    A replay that begins with the first is dropped up to the last (no more events than were
    trimmed, ``bound``); one that begins otherwise is no replay of what the log held (a gap, unless
    the held events prove it), and one that begins so and then goes elsewhere is said as a gap.

    An event without an event_id is kept with the upstream id of the newest upstream event the log
    holds before it (``newest``) as its own: retention's marks then pass over it, where no id (as a
    gap marker has) begins the trimmed run anew, and the upstream's replay, which never holds such an
    event, would no longer begin with the first trimmed one.
    """

    __slots__ = ("held", "pending", "after", "proven", "unproven", "gap", "trimmed", "skipped", "bound", "newest",
                 "progressed")

    def __init__(self, held: set[str], required: Iterable[str], *, after: int, ended: bool = True,
                 trimmed: tuple[str, str] | None = None, bound: int = 0, newest: str | None = None) -> None:
        self.held = held
        self.pending = set(required)
        self.after = after
        self.unproven = not ended  # a run was going on when the last leg broke
        self.proven = not self.pending and not self.unproven
        self.gap: GapReason | None = None  # as Seam.gap: the one marker's reason, once made
        # Until the replay of what retention trimmed is behind: a trim that failed to commit may
        # leave marks of events still held, which the held set then knows.
        self.trimmed = trimmed if trimmed is not None and trimmed[1] not in held else None
        self.skipped = 0
        self.bound = bound
        self.newest = newest
        # An event of the thread's history appended: the leg made progress. One without an event_id
        # (an upstream's error, which one failing on its history sends on every leg) is none.
        self.progressed = False

    def _trimmed(self, eid: str, out: list[Event]) -> bool:
        """Whether the upstream's event ``eid`` is its replay of one retention trimmed (dropped)."""
        assert self.trimmed is not None
        first, last = self.trimmed
        if not self.skipped and eid != first:
            # The upstream's history does not begin as the log's did: it started over, or lost the
            # thread's start; what it sends is new, and only the held events may prove nothing is missing.
            self.trimmed = None
            if self.proven:
                self.proven, self.unproven = False, True
            return False
        if eid == last:
            self.trimmed = None
            return True
        if eid not in self.held and self.skipped < self.bound:
            self.skipped += 1
            return True
        # Begun as the replay of what was trimmed, gone elsewhere: what was dropped may have been new.
        self.trimmed = None
        if self.gap is None:
            self.proven, self.gap, self.newest = True, "replay_mismatch", None
            out.append(gap_event(self.after, self.gap, _LOST))
        return False

    def filter(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for body, _upstream_seq in events:
            kept, eid = stored(body)
            if eid is None:
                # No part of the thread's history (the upstream replays none such, nor could one be
                # known again if it did): kept, and no proof of continuity either way.
                out.append((kept, self.newest))
                continue
            if self.trimmed is not None and self._trimmed(eid, out):
                continue
            if eid in self.held:
                self.pending.discard(eid)
                continue
            if not self.proven:
                self.proven = True
                if self.pending or self.unproven:
                    self.gap, self.newest = "replay_mismatch", None
                    out.append(gap_event(self.after, self.gap, _LOST))
            self.held.add(eid)
            self.newest, self.progressed = eid, True
            out.append((kept, eid))
        return out

    def close(self) -> list[Event]:
        return []


def latest_run(bodies: Iterable[bytes]) -> tuple[list[str], bool]:
    """The event ids of the thread's latest run as held, oldest first (from its root ``running``
    lifecycle on; everything, if none is held), and whether it had ended (a root ``completed``,
    ``failed`` or ``interrupted`` lifecycle after it; True when no run is held)."""
    out: list[str] = []
    ended = True
    for body in bodies:
        try:
            doc = loads(body[body.index(b"data: ") + 6:])
        except ValueError:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("event_id"), str):
            continue
        params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
        data = params.get("data") if isinstance(params, dict) else None
        if doc.get("method") == "lifecycle" and isinstance(params, dict) and params.get("namespace") == [] \
                and isinstance(data, dict):
            if data.get("event") == "running":
                out, ended = [], False
            elif data.get("event") in _RUN_ENDS:
                ended = True
        out.append(doc["event_id"])
    return out, ended


_RUN_ENDS = ("completed", "failed", "interrupted")
_LOST = ("the upstream's replay of this thread does not hold every event the gateway captured of its latest run "
         "(the upstream restarted, trimmed it, or the run published events it does not keep for replay); events "
         "produced while the gateway was not connected may be missing")
