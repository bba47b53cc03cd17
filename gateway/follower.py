"""One client's view of a stream: replay after a position from the log, then the live tail.

Follows mercure's register-then-replay handoff: register a bounded queue and
note the committed head S under the (single-threaded) loop, replay (after, S]
from the log, then drain what was queued meanwhile. A subscriber whose queue
overflows (by events or by bytes) is not blocked on: it drops its queue and
catches up from the log the same way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator

from gateway.eventlog import Entry

if TYPE_CHECKING:
    from gateway.hub import Hub, Ingest

REPLAY_PAGE = 2000


class StreamGone(Exception):
    """The stream left the log (retention) while a client was replaying it."""


class StreamCut(Exception):
    """The client must be cut, not ended: its stream is incomplete (storage failed, shutdown, a crash)."""


class Subscriber:
    """One client's bounded queue of committed batches."""

    __slots__ = ("queue", "queued", "queued_bytes", "limit", "byte_limit", "wake", "overflowed", "ended", "cut",
                 "beats")

    def __init__(self, limit: int, byte_limit: int) -> None:
        self.queue: deque[tuple[list[Entry], int]] = deque()
        self.queued = 0
        self.queued_bytes = 0
        self.limit = limit
        self.byte_limit = byte_limit
        self.wake = asyncio.Event()
        self.overflowed = False
        self.ended = False
        self.cut = False
        self.beats = 0

    def push(self, entries: list[Entry], nbytes: int) -> bool:
        if self.overflowed:
            return False
        if self.queued + len(entries) > self.limit or self.queued_bytes + nbytes > self.byte_limit:
            # Never block ingest on a slow client: forget the queue, it re-reads the log.
            self.overflowed = True
            self.queue.clear()
            self.queued = self.queued_bytes = 0
            self.wake.set()
            return False
        self.queue.append((entries, nbytes))
        self.queued += len(entries)
        self.queued_bytes += nbytes
        self.wake.set()
        return True

    def end(self, *, cut: bool = False) -> None:
        self.ended = True
        self.cut = self.cut or cut
        self.wake.set()

    def beat(self) -> None:
        self.beats += 1
        self.wake.set()


class Follower:
    """One client's view of a stream: replay after a position, then the live tail."""

    def __init__(self, hub: Hub, key: str, after: int | None) -> None:
        self.hub = hub
        self.key = key
        self.pos = after
        self.sub: Subscriber | None = None
        self.ing: Ingest | None = None
        self.upto = 0
        self._stopped = hub.closing  # a request that slipped in during shutdown
        self._register()
        hub.followers.add(self)

    def _register(self) -> None:
        ing = self.hub.live(self.key)
        if ing is not None:
            self.sub = Subscriber(self.hub.cfg.subscriber_buffer, self.hub.cfg.subscriber_buffer_bytes)
            self.ing = ing
            self.hub.attach(ing, self.sub)
            self.upto = ing.head
        else:
            self.sub = self.ing = None
            meta = self.hub.log.get(self.key)
            self.upto = meta.head if meta else 0
        if self.pos is None:
            self.pos = self.upto

    def _unregister(self) -> None:
        if self.ing is not None and self.sub is not None:
            self.hub.detach(self.ing, self.sub)
        self.sub = self.ing = None

    def shutdown(self) -> None:
        self._stopped = True
        if self.sub is not None:
            self.sub.end(cut=True)

    def close(self) -> None:
        self._unregister()
        self.hub.followers.discard(self)

    async def entries(self) -> AsyncIterator[list[Entry]]:
        """Batches of committed events; an empty batch means "send a heartbeat".

        Ends when the stream ends; raises StreamCut when the client must see a cut
        connection instead (the gateway stops, or the capture failed mid-stream).
        """
        heartbeat = self.hub.cfg.heartbeat
        try:
            while True:
                assert self.pos is not None
                while self.pos < self.upto and not self._stopped:  # replay from the log
                    page = await self.hub.log.read(self.key, self.pos, self.upto, REPLAY_PAGE)
                    if not page:
                        # Evicted underneath us: a clean end would look complete.
                        raise StreamGone(f"stream {self.key} was removed from the log during replay")
                    self.pos = page[-1][0]
                    yield page
                self.pos = max(self.pos, self.upto)
                if self._stopped:
                    raise StreamCut("the gateway is shutting down")
                sub = self.sub
                if sub is None:
                    meta = self.hub.log.get(self.key)
                    if meta is not None and meta.open and meta.kind == "run":
                        # Open in the log but nobody captures it (a crashed ingest): not the end.
                        raise StreamCut(f"stream {self.key} is not being captured right now")
                    return
                while True:  # live tail
                    if not sub.queue and not sub.ended and not sub.overflowed and not sub.beats:
                        sub.wake.clear()
                        try:
                            async with asyncio.timeout(heartbeat):
                                await sub.wake.wait()
                        except TimeoutError:
                            yield []
                            continue
                    if sub.overflowed:
                        break
                    if sub.queue:
                        batch, nbytes = sub.queue.popleft()
                        sub.queued -= len(batch)
                        sub.queued_bytes -= nbytes
                        if batch[0][0] <= self.pos:
                            batch = [e for e in batch if e[0] > self.pos]
                            if not batch:
                                continue
                        self.pos = batch[-1][0]
                        yield batch
                        continue
                    if sub.ended:
                        if sub.cut:
                            raise StreamCut(f"stream {self.key} stopped before its end")
                        return
                    if sub.beats:
                        sub.beats = 0
                        yield []
                # Overflowed: re-register and catch up from the log.
                self._unregister()
                self._register()
        finally:
            self.close()
