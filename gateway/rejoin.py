"""Re-joining an upstream leg: where to ask the upstream to resume from, and what to drop.

The in-memory Agent Server runtime gives every event of one millisecond the
same id, replays strictly after the id it is given, and overlaps its replay
with its live queue. These two pieces make a re-joined leg exact anyway.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

from gateway.sse import Event

# Upstream replays overlap by a few dozen events at most (measured 3-27); this is ample.
DEDUPE_WINDOW = 4096


class Dedupe:
    """Drops what an upstream re-sends after a re-join: the same upstream id with the same body.

    Order-independent on purpose: the upstream's replay and live queue overlap
    and jump back, and a thread stream delivers state updates out of id order.
    Seeded from the log's tail, so it also works right after a restart.
    """

    __slots__ = ("window", "order", "seen")

    def __init__(self, recent: Iterable[tuple[str | None, bytes]], window: int = 4096) -> None:
        self.window = window
        self.order: deque[int] = deque()
        self.seen: set[int] = set()
        for uid, body in recent:
            if uid is not None:
                self._remember(hash((uid, body)))

    def _remember(self, h: int) -> None:
        self.seen.add(h)
        self.order.append(h)
        if len(self.order) > self.window:
            self.seen.discard(self.order.popleft())

    def filter(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            if ev.upstream_id is not None:
                h = hash((ev.upstream_id, ev.body))
                if h in self.seen:
                    continue
                self._remember(h)
            out.append(ev)
        return out


def resume_point(uid: str | None) -> str | None:
    """The upstream Last-Event-ID to re-join from: just before our last upstream id.

    The in-memory runtime gives every event of one millisecond the same id and
    replays strictly after the id given, so asking with the exact last id would
    lose the rest of that millisecond. One millisecond earlier re-sends a few
    events we hold, which the de-duplication drops.
    """
    if uid is None:
        return None
    ms, sep, _seq = uid.partition("-")
    if sep and ms.isascii() and ms.isdigit() and int(ms) > 0:
        return f"{int(ms) - 1}-0"
    return uid
