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
from typing import Awaitable, Callable, Literal

from gateway.eventlog import Entry
from gateway.sse import frame

Reader = Callable[[str, int, int, int], Awaitable[list[Entry]]]
RangeKey = tuple[str, int, int, int]  # stream, after, upto, limit
PageSource = Literal["log", "shared"]


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


class ReplayPages:
    """Pages of committed ranges, least recently used first out, bounded by bytes held.

    ``budget`` 0 turns the sharing off (every read goes to the log).
    """

    def __init__(self, read: Reader, budget: int, on_page: Callable[[PageSource], None] = lambda _: None) -> None:
        self._read = read
        self.budget = budget
        self._on_page = on_page
        self.held = 0  # bytes of the cached pages (bodies and wire bytes)
        self._pages: OrderedDict[RangeKey, tuple[Page, int]] = OrderedDict()
        self._reading: dict[RangeKey, asyncio.Future[Page | None]] = {}

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
            shared = await asyncio.shield(reading)
            if shared is None:
                return await self._from_log(key, after, upto, limit)
            self._on_page("shared")
            return shared
        fut = self._reading[rk] = asyncio.get_running_loop().create_future()
        page: Page | None = None
        try:
            page = await self._from_log(key, after, upto, limit)
            if page:
                page.wire()  # framed now, once: every client of the range writes these bytes
                self._keep(rk, page)
            return page
        finally:
            del self._reading[rk]
            fut.set_result(page)  # None when the read failed: each waiter then reads for itself

    async def _from_log(self, key: str, after: int, upto: int, limit: int) -> Page:
        page = Page(await self._read(key, after, upto, limit))
        if page:
            self._on_page("log")
        return page

    def _keep(self, rk: RangeKey, page: Page) -> None:
        size = len(page.wire()) + sum(len(body) for _, body in page.entries)
        if size > self.budget // 4:
            return  # one huge page would push out everything else for one range
        self._pages[rk] = (page, size)
        self.held += size
        while self.held > self.budget:
            _, (_, old) = self._pages.popitem(last=False)
            self.held -= old
