"""A plain TCP relay on 127.0.0.1 that can drop every connection through it, on demand or at random.

Put between the gateway and Redis it plays a flaky network or a proxy that restarts: the
gateway's connections break at arbitrary points of the commit path (mid-pipeline, between a
script and its reply), and new connections go through again at once.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any


class TcpRelay:
    def __init__(self, host: str, port: int, *, rng: random.Random | None = None,
                 lose_replies_to: bytes | None = None, lose_share: float = 0.0) -> None:
        """``lose_replies_to``: when a client sends a command containing these bytes (``EVALSHA``:
        the log's appends and claims), ``lose_share`` of the time the command goes through and runs,
        and its reply is swallowed as the connection is reset: the client cannot know it ran."""
        self.target = (host, port)
        self._rng = rng or random.Random(0)
        self._marker = lose_replies_to
        self._lose_share = lose_share
        self._drop_marked = False
        self.lost_replies = 0
        self.cuts = 0  # connections dropped so far
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._chaos: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        await self.calm()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.drop_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def refuse_marked(self, on: bool) -> None:
        """While on, a marked command never reaches the server: its connection is reset instead."""
        self._drop_marked = on

    def lose_replies(self, share: float) -> None:
        """From now on, lose the replies of ``share`` of the marked commands (1.0: every one)."""
        self._lose_share = share

    def drop_all(self) -> int:
        """Reset every connection through the relay now; returns how many."""
        pairs, self._pairs = self._pairs, set()
        for a, b in pairs:
            a.transport.abort()
            b.transport.abort()
        self.cuts += len(pairs)
        return len(pairs)

    def chaos(self, rng: random.Random, every: tuple[float, float]) -> None:
        """Drop every connection again and again, at random intervals within ``every`` seconds."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(rng.uniform(*every))
                self.drop_all()
        self._chaos = asyncio.create_task(loop())

    async def calm(self) -> None:
        if self._chaos is not None:
            self._chaos.cancel()
            await asyncio.gather(self._chaos, return_exceptions=True)
            self._chaos = None

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            self._tasks.discard(me)
            return
        pair = (c_writer, u_writer)
        self._pairs.add(pair)
        swallow = asyncio.Event()
        try:
            await asyncio.gather(self._requests(c_reader, u_writer, swallow), _replies(u_reader, c_writer, swallow))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cut, or the relay stops: the connection just goes
        finally:
            self._pairs.discard(pair)
            c_writer.transport.abort()
            u_writer.transport.abort()
            self._tasks.discard(me)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        swallow: asyncio.Event) -> None:
        try:
            while chunk := await reader.read(65536):
                if self._drop_marked and self._marker is not None and self._marker in chunk:
                    return  # not run: the finally resets the connection
                if self._marker is not None and self._marker in chunk and self._rng.random() < self._lose_share:
                    swallow.set()
                    self.lost_replies += 1
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.transport.abort()


async def _replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, swallow: asyncio.Event) -> None:
    try:
        while chunk := await reader.read(65536):
            if swallow.is_set():
                return  # the commands ran; their replies never arrive
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.transport.abort()
