"""Open streams nobody captures: a previous process left them (a restart, a crash), or a replica
stopped renewing its lease. This process takes them over: at start, and on a shared log every
half lease, while it also looks for captures nobody follows any more (``gateway.presence``).
"""

from __future__ import annotations

import asyncio
import logging

from gateway.capture import Captures
from gateway.eventlog import EventLog, StorageError, StorageFull, StreamMeta
from gateway.eventlog.base import ClaimLost
from gateway.metrics import Metrics
from gateway.presence import Presence

logger = logging.getLogger("gateway.takeover")

STATELESS_LOST = ("the gateway that captured this stateless run stopped while it was live, and the upstream "
                  "has no way to re-join a stateless run")


class TakeOver:
    def __init__(self, log: EventLog, captures: Captures, presence: Presence, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics
        self.captures = captures
        self.presence = presence
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take over every open stream nobody captures, then keep doing so when the log is shared."""
        await self.sweep()
        if self.log.takeover_interval is not None:
            self._task = asyncio.create_task(self._loop(self.log.takeover_interval), name="takeover")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
                await self.presence.check_orphans()
            except Exception:
                logger.exception("taking over unowned streams failed; will retry")

    async def sweep(self) -> None:
        for meta in await self.log.unowned():
            if self.presence.closing or meta.key in self.captures.live:
                continue
            try:  # one stream that cannot be taken now never stops the others (nor the start-up)
                await self._take(meta)
            except (StorageError, ClaimLost) as exc:  # storage fails, or another process was faster
                logger.warning("could not take %s over (%s); will retry", meta.key, exc)

    async def _take(self, meta: StreamMeta) -> None:
        if meta.endless:
            if await self.presence.everywhere(meta.key) == 0:
                if await self.log.claim(meta.key) and meta.key not in self.captures.live:  # (see below)
                    try:  # nobody watches it: ended, re-opened when asked
                        await self.log.finish(meta.key, None)
                    finally:  # its claim goes either way, as when a thread stream is released
                        await self.captures.release(meta.key)
                return
        # Claimed, and still nobody's capture here: a client's join (Hub._join) may have taken it
        # over in this process while the claim was being written, and on a shared log a claim
        # this process already holds is granted again. Two captures of one stream would each
        # re-join the upstream and append every event twice.
        if await self.log.claim(meta.key) and meta.key not in self.captures.live:  # else another was faster
            await self.adopt(meta)

    async def adopt(self, meta: StreamMeta) -> None:
        """Capture an open stream this process has just claimed, from where the log holds it."""
        if meta.kind == "run" and meta.thread_id is None:
            # Begun again first, as a capture does after a storage failure: a stream whose last
            # commit failed (its end, when its upstream was lost while storage failed) takes writes
            # again; and while storage still fails this raises, so a client re-attaching it is
            # answered 503 rather than left waiting on a stream nobody will end. The budget bounds
            # what captures add, not the end of one: over it, the end is written all the same.
            try:
                await self.log.begin(meta)
            except StorageFull:
                pass
            except BaseException:
                await self.log.release(meta.key)  # free for the next try (a sweep, a client's join)
                raise
            ended = await self.captures.interrupt(meta, STATELESS_LOST)
            await self.log.release(meta.key)
            # Counted once done, when the end is in the log (a try storage refused is tried again,
            # and counted then; one another process ended is its to count): whoever captured the
            # stream stopped, and an operator wants to know how often.
            if ended:
                self.metrics.took_over()
            return
        logger.info("taking over %s from upstream id %s", meta.key, meta.last_upstream_id)
        self.presence.away(self.captures.start(meta, None, None))
        self.metrics.took_over()
