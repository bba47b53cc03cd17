"""Re-joining an upstream leg: where to ask the upstream to resume from, and what to drop.

The in-memory Agent Server runtime gives every event of one millisecond the
same id, replays strictly after the id it is given, and overlaps its replay
with its live queue. These two pieces make a re-joined leg exact anyway.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterable

from gateway.sse import Event

# Upstream replays overlap by a few dozen events at most (measured 3-27); this is ample.
DEDUPE_WINDOW = 4096


class Dedupe:
    """Drops what an upstream re-sends after a re-join, and nothing else.

    Two kinds of repeat, told apart without dropping real events that merely
    look alike (two identical tokens in one millisecond share id and body):
    - events we already hold: each (id, body) in the log's tail is dropped as
      many times as the tail holds it, no more;
    - the replay/live overlap inside the new leg, which arrives *behind* the
      highest id already seen ("jump back"): a repeat is dropped only then.
    Seeded from the log's tail, so it also works right after a restart.
    """

    __slots__ = ("window", "held", "order", "seen", "top")

    def __init__(self, recent: Iterable[tuple[str | None, bytes]], window: int = DEDUPE_WINDOW) -> None:
        self.window = window
        self.held: Counter[int] = Counter(hash((uid, body)) for uid, body in recent if uid is not None)
        self.order: deque[int] = deque()
        self.seen: set[int] = set()
        self.top: tuple[int, int] | tuple[int, str] | None = None

    def _remember(self, h: int) -> None:
        if h not in self.seen:
            self.seen.add(h)
            self.order.append(h)
            if len(self.order) > self.window:
                self.seen.discard(self.order.popleft())

    def filter(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            body, uid = ev
            if uid is None:
                out.append(ev)
                continue
            h = hash((uid, body))
            if self.held[h] > 0:
                self.held[h] -= 1
                continue
            k = _uid_key(uid)
            if h in self.seen and self.top is not None and _before(k, self.top):
                continue
            if self.top is None or _before(self.top, k):
                self.top = k
            self._remember(h)
            out.append(ev)
        return out


def _uid_key(uid: str) -> tuple[int, int] | tuple[int, str]:
    ms, sep, seq = uid.partition("-")
    if sep and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit():
        return (int(ms), int(seq))
    return (-1, uid)


def _before(a: tuple[int, int] | tuple[int, str], b: tuple[int, int] | tuple[int, str]) -> bool:
    if type(a[1]) is not type(b[1]):
        return a[0] < b[0]
    return a < b


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
    if not (sep and ms.isascii() and ms.isdigit()):
        return uid
    if int(ms) == 0:
        return "0"  # before every id, for run and thread streams alike
    # Same digit count: the upstream compares ids as strings, so "999-0" would sort after "1000-0".
    return f"{int(ms) - 1:0{len(ms)}d}-0"
