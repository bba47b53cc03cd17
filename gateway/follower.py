"""One client's view of a stream: replay after a position from the log, then the live tail.

Follows mercure's register-then-replay handoff: subscribe to the stream's live
feed first, then read the committed head S, replay (after, S] from the log,
then drain the feed, dropping anything at or below the position. The feed
carries batches committed by whichever writer captures the stream (this
process, or another replica of a shared log), each with the head before it,
so a missed batch shows as a gap and is read from the log. A follower that
falls behind is never waited for: its feed overflows and it catches up from
the log the same way.

A follower sees the stream only through ``Source``, a narrow view of what the
hub offers, so it depends on nothing else of the hub.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Literal, Protocol

from gateway.eventlog import Entry, StreamMeta
from gateway.eventlog.base import Batch, Feed
from gateway.replay import EMPTY, Page

REPLAY_PAGE = 2000


class StreamGone(Exception):
    """The stream left the log (retention) while a client was replaying it."""


class StreamCut(Exception):
    """The client must be cut, not ended: its stream is incomplete here (shutdown, a failed capture)."""


class Source(Protocol):
    """What a follower needs from the hub: the log's committed events and live feed, and a place
    to say it came and went (who follows a stream decides when its capture may stop)."""

    heartbeat: float  # idle seconds before the client gets a heartbeat comment

    @property
    def closing(self) -> bool: ...  # the gateway is shutting down: do not start

    async def ready(self, feed: Feed) -> None: ...
    async def lookup(self, key: str) -> StreamMeta | None: ...
    async def page(self, key: str, after: int, upto: int, limit: int) -> Page: ...
    def subscribe(self, key: str) -> Feed: ...
    def joined(self, follower: Follower) -> None: ...
    def left(self, follower: Follower) -> None: ...


# What a follower does once a replay is done: go live (the first catch-up), owe a heartbeat (an idle
# look at the head), go on with the live tail (after an overflow), end, or send the batch that came
# after a gap.
Then = Literal["caught_up", "beat", "live", "end", "batch"]

# Writes committed events to the client at once, without waiting; False when it cannot (the
# client's buffer is not nearly empty, the connection is closing): the events then go the usual way.
ExpressWriter = Callable[[list[Entry]], bool]


class Follower:
    """One client's view of a stream: replay after a position, then the live tail.

    With an ``ExpressWriter`` (``express``), a follower caught up with the live tail has each new
    batch written from the commit's own callback instead of queued for its task: on token streams
    that was a task wake-up, a future and a step of the follower per event. Whatever
    the writer refuses, or whatever does not follow on from the follower's position (a batch lost
    on the way, a capture begun again), is queued and handled by the task exactly as before.
    """

    # One per client of a stream, idle ones for hours: no instance dict.
    __slots__ = ("source", "key", "pos", "_stopped", "_finished", "_express", "feed", "_begun", "_upto", "_then",
                 "_prev", "_entries", "_trims", "_floor", "_skip")

    def __init__(self, source: Source, key: str, after: int | None) -> None:
        self.source = source
        self.key = key
        self.pos = after  # None: the live tail only (no Last-Event-ID)
        self._stopped = source.closing  # a request that slipped in during shutdown
        self._finished = False  # the last look at the durable head found the stream ended
        self._express: ExpressWriter | None = None
        self.feed: Feed | None = source.subscribe(key)  # register before anything is read
        self._begun = False
        # A replay under way: up to ``_upto``, and then what (see _after). A batch that came after a
        # gap waits in ``_prev``/``_entries`` for the replay of the gap.
        self._upto: int | None = None
        self._then: Then = "end"
        self._prev = 0
        self._entries: list[Entry] | None = None
        # Retention trims the start of an endless stream while it is followed: what was trimmed
        # when this follower began (``_floor``, its client told so) is not a loss it has to say.
        self._trims = False
        self._floor = 0
        # The client's id when it is beyond the stream's head (an id another stream was sent: ids
        # come from one counter): the follower goes on from the stream's own head, and sends only
        # what comes after this id.
        self._skip = 0
        source.joined(self)

    def express(self, write: ExpressWriter) -> None:
        """Write live batches with ``write`` from the commit, when caught up (see the class)."""
        self._express = write

    def _take(self, batch: Batch) -> bool:
        entries = batch.entries
        if self._stopped or not entries or batch.prev != self.pos or self._express is None or self._skip > self.pos:
            return False
        if not self._express(entries):
            return False
        self.pos = entries[-1][0]
        return True

    def shutdown(self) -> None:
        """The gateway stops: end this client's stream with a cut at the next event boundary."""
        self._stopped = True
        if self.feed is not None:
            self.feed.wake()

    def stopping(self) -> bool:
        """Whether the gateway is shutting down: what is being written to this client stops at the
        next event boundary (``send_body``)."""
        return self._stopped

    def close(self) -> None:
        if self.feed is not None:
            self.feed.express = None
            self.feed.close()
            self.feed = None
            self.source.left(self)

    # --- pages ------------------------------------------------------------------------------
    #
    # The follower is its own async iterator, a step at a time, rather than an async generator:
    # an idle client waits in it for hours, and a pair of async generators (with their place in
    # the loop's registry of them) cost it ~1 KiB more than one coroutine per step.

    def pages(self) -> AsyncIterator[Page]:
        """Pages of committed events; an empty page means "send a heartbeat".

        Ends when the stream ends; raises StreamCut when the client must see a cut
        connection instead, StreamGone when the stream left the log meanwhile.
        """
        return self

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> Page:
        # The waits of the live tail are here, not in a helper: each coroutine on the stack of an
        # idle client is one more it keeps for hours. The rest (a replay's page, a look at the head)
        # are helpers that return at once.
        try:
            if not self._begun:
                await self._begin()
            while True:
                if self._upto is not None:
                    page, more = await self._replayed()
                else:
                    feed = self.feed
                    assert feed is not None
                    if self._stopped:
                        raise StreamCut("the gateway is shutting down")
                    waiter = feed.waiting(self.source.heartbeat)  # a future, not feed.wait's coroutine
                    if waiter is not None:
                        await waiter
                        if not feed.woke():
                            # Idle: look at the durable head too, so an end or a batch whose notice
                            # got lost on the way (a shared log's channel dropped it) shows within a
                            # heartbeat.
                            await self._to_head("beat")
                            continue
                    if self._stopped:
                        raise StreamCut("the gateway is shutting down")
                    if feed.overflowed:  # too far behind: catch up from the log, then queue again
                        feed.restart()
                        await self._to_head("live")
                        continue
                    page, more = self._taken(feed.take())
                if page is not None:
                    return page
                if not more:
                    break
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopAsyncIteration

    async def _begin(self) -> None:
        self._begun = True
        assert self.feed is not None
        await self.source.ready(self.feed)  # subscribed before the head is read
        meta = await self.source.lookup(self.key)
        if meta is None:
            raise StreamGone(f"stream {self.key} is not in the log")
        self._check_held(meta)
        self._trims, self._floor = meta.endless, meta.first_seq
        if self.pos is None:
            self.pos = meta.head
        elif self.pos > meta.head:
            # Batches follow on from the stream's own positions: a position between them would
            # look like a capture begun anew under the client (a cut). What the client's id says
            # is kept as the point to send from.
            self._skip, self.pos = self.pos, meta.head
        self._finished = meta.finished or (not meta.open and meta.endless)
        self._replay_to(meta.head, "caught_up")

    def _replay_to(self, upto: int, then: Then) -> None:
        self._upto, self._then = upto, then

    async def _replayed(self) -> tuple[Page | None, bool]:
        """A step of the replay under way: (a page or None, whether the stream goes on)."""
        assert self.pos is not None and self._upto is not None
        if self.pos < self._upto:
            if self._then == "caught_up" and self._fed():
                self._upto = None  # what the replay would read comes from the feed, in order
                return self._after("caught_up")
            if self._stopped:
                raise StreamCut("the gateway is shutting down")
            page = await self.source.page(self.key, self.pos, self._upto, REPLAY_PAGE)
            if not page:
                # Evicted underneath us: a clean end would look complete.
                raise StreamGone(f"stream {self.key} was removed from the log during replay")
            if self._trims:
                await self._check_untrimmed(page)
            self.pos = page.last
            if self._skip and page.entries[0][0] <= self._skip:
                if page.entries[-1][0] > self._skip:
                    await self._vouch_skip()
                kept = [e for e in page.entries if e[0] > self._skip]
                return (Page(kept) if kept else None), True
            return page, True
        self.pos = max(self.pos, self._upto)
        self._upto = None
        if self._then == "batch" and self._skip > self.pos and self._entries and self._entries[-1][0] > self._skip:
            await self._vouch_skip()
        return self._after(self._then)

    async def _vouch_skip(self) -> None:
        """Events past the client's id beyond the head (``_skip``) are about to be sent: that id must
        be one of another stream, not one of this stream's events that Redis lost (back from an
        older snapshot), which a capture begun again appends anew above it: the client is cut then,
        and its reconnect told its id is not held (``StreamMeta.lost``)."""
        meta = await self.source.lookup(self.key)
        if meta is not None and meta.lost(self._skip):
            raise StreamCut(self._restarted)

    def _fed(self) -> bool:
        """Whether the feed already holds the batch that follows this follower's position: it
        subscribed before that batch was committed (the client of a new run does, before the
        run's capture begins), so everything after the position comes from the feed and the log
        need not be read. Not for a stream that ended: its end is read with the replay."""
        feed = self.feed
        queue = feed.queue if feed is not None and not feed.overflowed else None
        return (not self._finished and queue is not None and queue[0].kind == "events"
                and self.pos is not None and queue[0].prev <= self.pos)

    def _after(self, then: Then) -> tuple[Page | None, bool]:
        """What follows a replay: the end, a heartbeat, the batch that came after the gap, or the
        live tail."""
        if then == "end" or (then != "batch" and self._finished):
            return None, False
        if then == "caught_up" and self._express is not None:
            assert self.feed is not None
            self.feed.express = self._take  # the feed offers a batch only while this task waits on it
        if then == "beat":
            return EMPTY, True
        if then == "batch":
            entries, self._entries = self._entries, None
            return self._own(self._prev, entries or []), True
        return None, True

    def _taken(self, batch: Batch | None) -> tuple[Page | None, bool]:
        """What a batch taken from the live feed gives: (a page or None, whether the stream goes on)."""
        assert self.pos is not None
        if batch is None:
            return None, True
        if batch.kind == "beat":
            return EMPTY, True
        if batch.kind == "cut":
            raise StreamCut(f"the capture of {self.key} stopped here before the stream's end")
        if batch.kind == "end":
            if batch.prev < self.pos:
                raise StreamCut(self._restarted)
            self._replay_to(batch.prev, "end")  # the end may come with events this follower has not seen
            return None, True
        if batch.prev > self.pos or (self._skip > self.pos and batch.entries and batch.entries[-1][0] > self._skip):
            # A batch went missing on the way: read it from the log first. Or the batch goes past the
            # client's id beyond the head: it is looked at first (``_vouch_skip``).
            self._prev, self._entries = batch.prev, batch.entries
            self._replay_to(batch.prev, "batch")
            return None, True
        return self._own(batch.prev, batch.entries), True

    def _own(self, prev: int, entries: list[Entry]) -> Page | None:
        """The entries of a batch this follower has not sent yet, as a page (None: none)."""
        assert self.pos is not None
        if entries and prev < self.pos < entries[-1][0]:
            # Batches start where the one before ended, and this client's position is
            # always at a batch's end: a batch across it belongs to another capture.
            raise StreamCut(self._restarted)
        if not entries:
            return None
        after = max(self.pos, self._skip)
        if entries[0][0] <= after:
            self.pos = max(self.pos, entries[-1][0])
            entries = [e for e in entries if e[0] > after]
            if not entries:
                return None
        self.pos = entries[-1][0]
        return Page(entries)

    async def _check_untrimmed(self, page: Page) -> None:
        """The page follows on from this follower's position, or the client is cut: retention
        trimmed the events after it (past where it began) before they were read, and the page
        starts after them. A cut says the stream is not whole here; the client's reconnect gets
        what is left with ``X-Gateway-Resume: truncated``."""
        assert self.pos is not None
        meta = await self.source.lookup(self.key)
        if meta is not None and page.entries[0][0] >= meta.first_seq > max(self.pos + 1, self._floor):
            raise StreamCut(f"retention trimmed {self.key} past this client's position before it was sent")

    async def _to_head(self, then: Then) -> None:
        """Replay up to the durable head as it is now, then ``then``; ``_finished`` says whether the
        stream ended."""
        meta = await self.source.lookup(self.key)
        if meta is None:
            raise StreamGone(f"stream {self.key} was removed from the log")
        self._check_held(meta)
        self._finished = meta.finished
        self._replay_to(meta.head, then)

    @property
    def _restarted(self) -> str:
        return (f"the log lost what this client was sent of {self.key} and captures it anew: it must "
                "reconnect (its ids no longer apply)")

    def _check_held(self, meta: StreamMeta) -> None:
        """The stream as held still contains this client's position, or the client is cut.

        When the log lost a stream (Redis flushed) and the capture began it again, the new events
        have new ids above the client's: following on would feed it the run a second time. So too
        when it lost the events from the client's position on (Redis back from an older snapshot).
        """
        if self.pos and meta.lost(self.pos):
            raise StreamCut(self._restarted)
