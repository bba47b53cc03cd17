"""Opening a new upstream leg of a stream: which Last-Event-ID to ask with, what of the answer to
drop, and whether the gateway can prove that nothing was lost at the seam.

The one rule for the upstream ``Last-Event-ID`` lives in ``leg_last_event_id``. What
comes back goes through a ``Seam``:

- **Re-sends are dropped.** The in-memory Agent Server runtime gives every event of one
  millisecond the same id, replays strictly after the id it is given, and overlaps its
  replay with its live queue, re-sending events (often the last replayed one) with the
  same id. A held event the replay re-sends is dropped as often as it is held; the
  overlap, once per leg, is dropped while it repeats the leg's order (``Seam``). (So on
  such an upstream, two byte-identical events in one millisecond where the overlap may
  begin count as one: the wire cannot tell them from a re-send. Later ones are all kept.)
- **Continuity is proved or said.** A re-joined leg continues the stream exactly when its
  first event is one the gateway already holds (the replay overlaps what it has), or, for
  a run of which nothing is held yet, when it starts with the run's first event
  (``metadata``). Otherwise (no upstream ids, a replay buffer that expired, an upstream
  that ignores ``Last-Event-ID``, a re-join that brings nothing) events may be missing: a
  ``gap`` event goes into the log at the seam, in-band, then the live tail follows.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Literal


from gateway.eventlog import StreamKind, StreamMeta
from gateway.marks import GAP_EVENT, gap_event
from gateway.metrics import GapReason
from gateway.sse import Event, event_name, without_retry
from gateway.agentapi import RUN_START_EVENT, Cursor

# Upstream replays overlap by a few dozen events at most (measured 3-27); this is ample.
DEDUPE_WINDOW = 4096

# What a new leg must show: a held event first ("held"), the run's first event ("start"), or nothing.
Expect = Literal["held", "start"] | None


def leg_last_event_id(kind: StreamKind, held: StreamMeta | None, cursor: Cursor | None = None) -> str | None:
    """The upstream Last-Event-ID for a new leg of a stream: the one rule for it.

    A stream the gateway holds (or is capturing) continues just before its last upstream
    id; a run with no upstream id yet asks for everything, and so does a thread stream held
    from the thread's start with nothing in it yet (everything the upstream replays is what the
    log lacks); one begun at its live tail asks for the live tail again. A stream it does not hold
    asks for what the client asked: a client's gateway ids mean nothing upstream, so
    "from the start" then; an upstream id is passed through.
    """
    if kind == "session":
        return None  # its upstream replays the whole thread on every connection (SessionSeam)
    if held is not None:
        point = resume_point(held.last_upstream_id)
        if point is not None:
            return point
        if kind == "run":
            return "-1"
        return "-" if not held.head and not held.begun_partway else None
    if cursor is None or cursor.kind == "none":
        return None
    if cursor.kind == "upstream":
        return cursor.raw
    return "-1" if kind == "run" else "-"  # the thread stream answers "-1" with 422


def begins_partway(kind: StreamKind, held: StreamMeta | None, last: str | None) -> bool:
    """Whether a stream's first leg, opened for a client's join with upstream Last-Event-ID ``last``,
    may leave out the stream's start. A thread stream's does (its earlier resumable runs) unless it
    asked from the start; a run's may even then (an upstream that cannot replay it gives the live
    tail): what is held shows it, whether it begins with the run's first event. A session's upstream
    replays the whole thread on every leg."""
    if held is not None or kind == "session":
        return False
    return kind == "run" or last != "-"


def held_from_start(meta: StreamMeta, first: bytes | None) -> bool:
    """Whether the log holds ``meta``'s stream from its start (``begins_partway``'s counterpart, for a
    client that asks for all of it): its capture did not begin partway, or, for a run, what is held
    (``first``: its first event, None when none is) begins with the run's first event anyway (the
    run had not started) or with a gap marker (which says in-band what is missing)."""
    if not meta.begun_partway:
        return True
    if meta.kind != "run":
        return False
    return first is None or event_name(first) in (RUN_START_EVENT, GAP_EVENT)


def expectation(kind: StreamKind, held: StreamMeta | None) -> Expect:
    """What a re-joined leg of ``held`` must start with for the gateway to call it exact."""
    if held is None:
        return None
    if held.head:
        return "held"
    return "start" if kind == "run" else None


class Seam:
    """Where a new upstream leg meets what the log holds: drops re-sends, marks what it cannot prove.

    What a re-joined leg re-sends comes two ways, and each is matched by how it comes:

    - **The replay of what is held**: each held event is re-sent once, in order; one held once is
      dropped once (``held`` counts them), so a new event identical to it (same id, same body: the
      same millisecond on the in-memory runtime) is kept.
    - **The live queue's overlap**: the events published while the replay was read come again after
      it, the replay's tail in its order, ids going back (or, within one millisecond, staying). That
      happens once per leg: the first event of the leg seen before with an id not above the highest
      starts it, and what follows is dropped while it repeats the leg in order. Later, an event seen
      before is a re-send only if its id went back; one with the highest id is a new event
      identical to an earlier one (a token streamed twice in one millisecond), and kept.
    """

    __slots__ = ("window", "held", "at", "leg", "base", "top", "overlap", "overlapped", "expect", "after",
                 "any_ids", "gap")

    def __init__(self, recent: Iterable[tuple[str | None, bytes]], *, after: int = 0, expect: Expect = None,
                 window: int = DEDUPE_WINDOW) -> None:
        self.window = window
        self.held: dict[int, int] = {}  # held events not yet re-sent on this leg, by identity: how many
        self.at: dict[int, int] = {}  # where in the leg an event was last taken (a position in ``leg``)
        self.leg: deque[int] = deque()  # the leg's events with ids, in order (the last ``window``)
        self.base = 0  # the position of leg[0]
        self.top: tuple[int, int] | tuple[int, str] | None = None
        self.overlap: tuple[int, int] | None = None  # the overlap under way: next position, last one
        self.overlapped = False  # the leg's one overlap began
        self.any_ids = False
        for uid, body in recent:
            if uid is not None:
                self.any_ids = True
                h = _same(uid, body)
                self.held[h] = self.held.get(h, 0) + 1
                self._raise_top(_uid_key(uid))
        self.expect = expect
        self.after = after
        # The reason of the one marker this seam makes (at its first event, or at close), once made.
        # The capture counts it when the batch carrying it commits: a marker in a batch the log
        # refused is made again by the next leg's seam, and counted once, there.
        self.gap: GapReason | None = None

    def _taken(self, h: int) -> None:
        """An event of the upstream's sequence, at the leg's next position (a re-send of it may follow)."""
        self.at[h] = self.base + len(self.leg)
        self.leg.append(h)
        if len(self.leg) > self.window:
            old = self.leg.popleft()
            if self.at.get(old) == self.base:
                del self.at[old]
            self.base += 1

    def _leg_at(self, pos: int) -> int | None:
        i = pos - self.base
        return self.leg[i] if 0 <= i < len(self.leg) else None

    def _raise_top(self, k: tuple[int, int] | tuple[int, str]) -> None:
        if self.top is None or _before(self.top, k):
            self.top = k

    def filter(self, events: list[Event]) -> list[Event]:
        """The events of this leg that are new, with a gap marker first if continuity is unproven."""
        out: list[Event] = []
        if self.expect is not None and events:
            self._check(events[0], out)
        for ev in events:
            body, uid = ev
            if uid is None:
                out.append(ev)
                continue
            h = _same(uid, body)
            if self._resent(h, _uid_key(uid)):
                continue
            self._raise_top(_uid_key(uid))
            self._taken(h)
            out.append(ev)
        return out

    def _resent(self, h: int, k: tuple[int, int] | tuple[int, str]) -> bool:
        if self.overlap is not None:
            nxt, last = self.overlap
            self.overlap = (nxt + 1, last) if nxt < last else None
            if self._leg_at(nxt) == h:
                return True
            self.overlap = None  # not the replay's order after all: this event is judged on its own
        if self.held.get(h, 0) > 0:
            self.held[h] -= 1
            self._taken(h)  # the replay's own: the live queue's overlap may send it again
            return True
        pos = self.at.get(h)
        if pos is None or self.top is None or _before(self.top, k):
            return False
        if not self.overlapped:
            self.overlapped = True
            last = self.base + len(self.leg) - 1
            if pos < last:
                self.overlap = (pos + 1, last)
            return True
        return _before(k, self.top)  # after the overlap only an id going back says re-send

    def _check(self, first: Event, out: list[Event]) -> None:
        body, uid = first
        if self.expect == "held":
            proven = uid is not None and self.held.get(_same(uid, body), 0) > 0
            reason: GapReason = "no_upstream_ids" if uid is None or not self.any_ids else "replay_mismatch"
        else:
            proven = event_name(body) == RUN_START_EVENT
            reason = "replay_mismatch"
        self.expect = None
        if not proven:
            self._mark(reason, out)

    def close(self) -> list[Event]:
        """At a clean end of the leg: a marker if the leg never showed where it continues."""
        out: list[Event] = []
        if self.expect is not None:
            self.expect = None
            self._mark("empty_rejoin", out)
        return out

    def _mark(self, reason: GapReason, out: list[Event]) -> None:
        self.gap = reason
        out.append(gap_event(self.after, reason))


def _same(uid: str, body: bytes) -> int:
    """What identifies an event across legs: its upstream id and body, less a ``retry:`` the replay
    need not repeat."""
    return hash((uid, without_retry(body)))


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
    events we hold, which the seam drops (and which prove the replay continues).
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
