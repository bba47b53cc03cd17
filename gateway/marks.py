"""The events the gateway writes into streams itself, named in one place: a gap marker where events
may be missing, and the error event that ends a stream whose upstream is lost for good.

Both pass every stream-mode filter (``ALWAYS_SENT``): a client that asked for some modes still
learns that events were lost or that the run failed.
"""

from __future__ import annotations

import orjson

from gateway.metrics import GapReason
from gateway.sse import Event, make_body

GAP_EVENT = b"gap"
ERROR_EVENT = b"error"  # also the upstream's own: a run ends with it when it fails
ALWAYS_SENT = (ERROR_EVENT, GAP_EVENT)

_GAP_MESSAGES: dict[GapReason, str] = {
    "no_upstream_ids": "the upstream sends no event ids, so the re-joined stream cannot be matched with "
                       "what the gateway holds; events produced while it was disconnected may be missing",
    "replay_mismatch": "the re-joined stream did not start where the gateway's copy ends (the upstream's "
                       "replay buffer expired, or it does not replay); events in between are missing",
    "empty_rejoin": "the re-joined stream ended without re-sending anything the gateway holds; events "
                    "produced while it was disconnected may be missing",
}


def gap_event(after: int, reason: GapReason) -> Event:
    """A gap marker: events after gateway id ``after`` (0: the start) may be missing, and why."""
    payload = {"after": str(after) if after else None, "reason": reason, "message": _GAP_MESSAGES[reason]}
    return (make_body(GAP_EVENT, orjson.dumps(payload)), None)


def interrupted_message(reason: str) -> str:
    return f"the gateway lost this stream's upstream and could not re-join it: {reason}"


def interrupted_event(reason: str) -> Event:
    """The end of a stream whose upstream the gateway lost and could not re-join."""
    payload = {"error": "CaptureInterrupted", "message": interrupted_message(reason)}
    return (make_body(ERROR_EVENT, orjson.dumps(payload)), None)
