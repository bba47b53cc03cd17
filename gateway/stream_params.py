"""Parameters of the streaming endpoints: the Last-Event-ID cursor, stream-mode filters,
and the run-creating request body as the gateway forwards it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import orjson
from aiohttp import web

from gateway.agentapi import THREAD_MODES, Cursor
from gateway.errors import InvalidEventId, Unprocessable
from gateway.marks import ALWAYS_SENT
from gateway.sse import event_name

_GATEWAY_ID = re.compile(r"^[0-9]{1,19}$")
_UPSTREAM_ID = re.compile(r"^[0-9]{1,19}-(?:[0-9]{1,19}|\*)$")


def parse_cursor(request: web.Request) -> Cursor:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        raw = request.query.get("last_event_id")
    if raw is None or raw.strip() == "":
        return Cursor("none")
    raw = raw.strip()
    if raw in ("-1", "-", "0"):
        return Cursor("start", 0, raw)
    if _GATEWAY_ID.match(raw):
        seq = int(raw)
        # A number however spelled: "00" is the start as "0" is (no id is 0), never an id of an
        # earlier capture (at or below a stream's base), which is told differently.
        return Cursor("seq", seq, raw) if seq else Cursor("start", 0, raw)
    if _UPSTREAM_ID.match(raw):
        return Cursor("upstream", 0, raw)
    shown = raw if len(raw) <= 64 else raw[:64] + "..."
    raise InvalidEventId(
        f"Invalid Last-Event-ID {shown!r}: expected an event id this gateway sent (a decimal integer), "
        "or -1, - or 0 to start from the beginning")


def _run_mode_matches(name: str, modes: set[str]) -> bool:
    """The Agent Server's own rule (``_run_stream_mode_matches``): the event's name, or its mode before
    a subgraph's ``|``; either messages mode selects every ``messages`` event (the tuple's ``messages``
    and the ``messages/...`` ones alike)."""
    if name in modes or name.split("|", 1)[0] in modes:
        return True
    return not modes.isdisjoint(("messages", "messages-tuple")) and name.startswith("messages")


def run_mode_filter(request: web.Request) -> Callable[[bytes], bool] | None:
    """Join Run Stream's ``stream_mode``: one value or a JSON array; the last one given counts, and
    an empty one (the Python SDK sends `stream_mode=` when none is given) or ``[]`` is no filter."""
    values = request.query.getall("stream_mode", [])
    if not values or not values[-1]:
        return None
    raw = values[-1]
    modes = {raw}  # as the Agent Server: a value that is no mode matches nothing (an empty stream)
    if raw.startswith("["):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            if not parsed:
                return None
            modes = {m for m in parsed if isinstance(m, str)}

    def keep(body: bytes) -> bool:
        name = event_name(body)
        return name in ALWAYS_SENT or _run_mode_matches(name.decode("utf-8", "replace"), modes)

    return keep


def thread_mode_filter(request: web.Request) -> Callable[[bytes], bool] | None:
    """Join Thread Stream's ``stream_modes``: comma-separated; the last parameter given counts, and
    none (or an empty one) is ``run_modes``, as the Agent Server reads it: no ``state_update``."""
    values = request.query.getall("stream_modes", [])
    raw = values[-1] if values and values[-1] else "run_modes"
    # As the Agent Server reads them: a list's entries stripped, a single value as it is; the first
    # entry that is no mode (a blank one too) is refused.
    listed = [m.strip() for m in raw.split(",")] if "," in raw else [raw]
    for m in listed:
        if m not in THREAD_MODES:
            raise Unprocessable(f"Invalid stream mode: {m}")
    modes = set(listed)
    if modes >= {"run_modes", "state_update"}:
        return None

    def keep(body: bytes) -> bool:
        name = event_name(body)
        if name == b"state_update":
            return "state_update" in modes
        if name == b"metadata":
            return "run_modes" in modes or "lifecycle" in modes
        return "run_modes" in modes or name in ALWAYS_SENT

    return keep


def last_param(request: web.Request, name: str) -> str | None:
    """A query parameter as the Agent Server reads it (Starlette): given twice, the last value counts."""
    values = request.query.getall(name, [])
    return values[-1] if values else None


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1", "yes")


@dataclass(frozen=True, slots=True)
class RunRequest:
    body: bytes  # as forwarded
    resumable: bool
    cancel_on_disconnect: bool
    original: bytes  # as the client sent it
    changed: bool  # body differs from original

    def resend_as_sent(self, status: int) -> bool:
        """The upstream refused the body the gateway changed: ask again with the client's own, so
        its validation error quotes what the client sent (a refused run was not created)."""
        return self.changed and status == 422


def prepare_run_request(body: bytes, *, ask_resumable: bool, stateless: bool, streaming: bool = True) -> RunRequest:
    """Inspect a run-creating body and adjust it for capture.

    Asks the upstream for a replay buffer unless the client said no. For thread
    runs, ``on_disconnect: cancel`` becomes the gateway's job (it cancels when the
    last client leaves); the upstream gets ``continue``, or it would cancel the run
    whenever the gateway's own leg drops (a network blip, a gateway restart).
    Only a well-formed run request (a JSON object naming its assistant) is changed:
    anything else goes as sent, so the upstream's error is about the client's body.
    """
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None  # forwarded unchanged: the upstream answers with its own 422
    if not isinstance(doc, dict) or not isinstance(doc.get("assistant_id"), str) or not doc["assistant_id"]:
        return RunRequest(body, False, False, body, False)
    cancel = doc.get("on_disconnect") == "cancel"
    changed = False
    if ask_resumable and not stateless and "stream_resumable" not in doc:
        doc["stream_resumable"] = True
        changed = True
    if cancel and streaming and not stateless:
        doc["on_disconnect"] = "continue"
        changed = True
    return RunRequest(orjson.dumps(doc) if changed else body, doc.get("stream_resumable") is True, cancel,
                      body, changed)
