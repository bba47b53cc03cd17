"""A TCP relay in front of an upstream that resets one response at an exact point of its body.

The first response to a request carrying ``request_marker`` is cut just before ``before``
first appears in what the upstream sends (mid-stream, at a place a test names: "before the
first custom event"), by a reset; everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CutRelay:
    def __init__(self, url: str, request_marker: bytes, before: bytes) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.request_marker = request_marker
        self.before: bytes | None = before
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return "http://127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]

    async def start(self) -> CutRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        marked = False
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            self._tasks.discard(me)
            return

        async def requests() -> None:
            nonlocal marked
            while chunk := await c_reader.read(65536):
                marked = marked or self.request_marker in chunk
                u_writer.write(chunk)
                await u_writer.drain()

        async def replies() -> None:
            seen = b""
            while chunk := await u_reader.read(65536):
                if marked and self.before is not None:
                    at = (seen + chunk).find(self.before)  # the marker may straddle two reads
                    if at >= 0:
                        self.before = None
                        c_writer.write(chunk[:max(at - len(seen), 0)])
                        await c_writer.drain()
                        self.cuts += 1
                        raise ConnectionResetError("cut on purpose")
                    seen = chunk[-len(self.before):]
                c_writer.write(chunk)
                await c_writer.drain()

        try:
            await asyncio.gather(requests(), replies())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            c_writer.transport.abort()
            u_writer.transport.abort()
            self._tasks.discard(me)
