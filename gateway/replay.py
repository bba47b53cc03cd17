"""Replayed pages, read from the log and framed once, for every client replaying the same range.

A reconnect storm is many clients asking for the same committed range of the
same stream (every client of a run resuming from the start reads the same
pages). Reading and framing each page per client cost more than writing it, so
a page is read and framed once and the same bytes go to every client.

Sharing is safe because a committed range never changes: seqs are never reused
(not even when a stream is evicted and captured again), and a range ends at a
committed head. Retention removing a stream does not make its cached pages
wrong, only old; the follower looks the stream up before it replays, so a
stream that is gone is still said to be gone.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable

from gateway.eventlog import Entry
from gateway.metrics import PageSource
from gateway.sse import frame

Reader = Callable[[str, int, int, int, int], Awaitable[list[Entry]]]  # EventLog.read
RangeKey = tuple[str, int, int, int]  # stream, after, upto, limit
# A page is read up to about this many bytes of events (one event, however big, at least). A client
# that stops reading holds the page it was being written until the write timeout cuts it; pages of the
# log's own size (megabytes) made a thousand stalled replays gigabytes, where README promises about
# 256 KiB each. Smaller pages cost more reads, each cheap next to writing the page.
PAGE_BYTES = 64 << 10
_ASKED_RANGES = 10_000  # ranges remembered as read once: about 3 MB when full (measured)
# What an entry costs beyond its body: its tuple, its seq, the bytes object, a list slot (measured
# with token-sized events, where counting bodies alone undercounted memory by 1.7x).
_ENTRY_OVERHEAD = 120


class Page:
    """Committed events, oldest first, and their wire bytes (framed on first use, then kept)."""

    __slots__ = ("entries", "_wire")

    def __init__(self, entries: list[Entry], wire: bytes | None = None) -> None:
        self.entries = entries
        self._wire = wire

    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = frame(self.entries)
        return self._wire

    @property
    def last(self) -> int:
        return self.entries[-1][0]

    def __bool__(self) -> bool:
        return bool(self.entries)


EMPTY = Page([], b"")


class _Reading:
    """A read of a range under way, and how many other clients wait for it."""

    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.done: asyncio.Future[Page | None] = asyncio.get_running_loop().create_future()
        self.waiters = 0


class ReplayPages:
    """Pages of committed ranges, least recently used first out, bounded by bytes held.

    A page is kept once its range is asked for a second time (at once, or later): a client
    catching up alone on a live stream would only push the pages of a storm out. ``budget``
    0 turns the sharing off (every read goes to the log).
    """

    def __init__(self, read: Reader, budget: int, on_page: Callable[[PageSource], None] = lambda _: None) -> None:
        self._read = read
        self.budget = budget
        self._on_page = on_page
        self.held = 0  # bytes of the cached pages (bodies and wire bytes)
        self._pages: OrderedDict[RangeKey, tuple[Page, int]] = OrderedDict()
        self._reading: dict[RangeKey, _Reading] = {}
        self._asked: OrderedDict[RangeKey, None] = OrderedDict()  # ranges read once, not kept (yet)

    async def page(self, key: str, after: int, upto: int, limit: int) -> Page:
        """Events with ``after < seq <= upto`` (at most ``limit``), framed; empty when none is held."""
        if self.budget <= 0:
            return await self._from_log(key, after, upto, limit)
        rk = (key, after, upto, limit)
        hit = self._pages.get(rk)
        if hit is not None:
            self._pages.move_to_end(rk)
            self._on_page("shared")
            return hit[0]
        reading = self._reading.get(rk)
        if reading is not None:  # the same range is being read for another client right now
            reading.waiters += 1
            shared = await asyncio.shield(reading.done)
            if shared is None:
                return await self._from_log(key, after, upto, limit)
            if shared:  # as a page from the log: counted when it holds events
                self._on_page("shared")
            return shared
        reading = self._reading[rk] = _Reading()
        page: Page | None = None
        try:
            page = await self._from_log(key, after, upto, limit)
            if page and (reading.waiters or self._asked_before(rk)):
                page.wire()  # framed now, once: every client of the range writes these bytes
                self._keep(rk, page)
            return page
        finally:
            del self._reading[rk]
            reading.done.set_result(page)  # None when the read failed: each waiter then reads for itself

    def _asked_before(self, rk: RangeKey) -> bool:
        if rk in self._asked:
            del self._asked[rk]
            return True
        self._asked[rk] = None
        if len(self._asked) > _ASKED_RANGES:
            self._asked.popitem(last=False)
        return False

    async def _from_log(self, key: str, after: int, upto: int, limit: int) -> Page:
        page = Page(await self._read(key, after, upto, limit, PAGE_BYTES))
        if page:
            self._on_page("log")
        return page

    def _keep(self, rk: RangeKey, page: Page) -> None:
        size = len(page.wire()) + sum(len(body) for _, body in page.entries) + _ENTRY_OVERHEAD * len(page.entries)
        if size > self.budget // 4:
            return  # one huge page would push out everything else for one range
        self._pages[rk] = (page, size)
        self.held += size
        while self.held > self.budget:
            _, (_, old) = self._pages.popitem(last=False)
            self.held -= old
