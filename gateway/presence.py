"""Who follows each stream, and what happens to a capture nobody follows any more.

Followers of this process are counted here and published through the log, so the
policy counts every replica's: a thread stream nobody watches lingers for
``streams.thread_linger``, then its upstream leg is released; a run a client asked to
cancel on disconnect (on any replica) is cancelled upstream once its last follower
anywhere has left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from gateway.capture import Captures, Ingest, rejoin_delay
from gateway.config import Streams
from gateway.eventlog import EventLog, StorageError, StreamMeta
from gateway.follower import Follower
from gateway.upstream import UpstreamError

logger = logging.getLogger("gateway.presence")

# Cancels a run upstream: (meta, the credentials to cancel it with).
UpstreamCanceller = Callable[[StreamMeta, dict[str, str]], Awaitable[None]]
# Runs work that must finish even if the request that started it is cancelled (see Hub.run_owned).
Owner = Callable[[Awaitable[Any]], "asyncio.Future[Any]"]


class Presence:
    def __init__(self, log: EventLog, cfg: Streams, captures: Captures, cancel_upstream: UpstreamCanceller,
                 run_owned: Owner) -> None:
        self.log = log
        self.cfg = cfg
        self.captures = captures
        self.cancel_upstream = cancel_upstream
        self.run_owned = run_owned
        self.closing = False  # shutting down: clients leaving orphan nothing
        self.followers: set[Follower] = set()
        self._following: dict[str, int] = {}  # followers in this process, by stream
        # Runs another process captures that a client here asked to cancel on disconnect: its credentials.
        self._cancel_auth: dict[str, dict[str, str]] = {}
        # Of those, the ones whose last follower here left while others followed elsewhere: looked at
        # again (check_orphans) until nobody follows them anywhere, as the captor's note of the cancel
        # may be lost (it stalled or died before it wrote it) and whoever took the run over not know it.
        self._cancel_pending: dict[str, dict[str, str]] = {}
        captures.on_recovered = self._recovered

    def following(self, key: str) -> int:
        """Followers of ``key`` in this process."""
        return self._following.get(key, 0)

    async def everywhere(self, key: str) -> int:
        """Followers of ``key`` in every process."""
        return await self.log.followers(key, self.following(key))

    # --- a client asks for a cancel ---------------------------------------------------------------

    async def cancel_when_orphaned(self, meta: StreamMeta) -> bool:
        """A client of run ``meta`` asked for it to be cancelled once nobody follows it. True when
        another process captures it (the client's credentials are then noted with ``asked``)."""
        ing = self.captures.live.get(meta.key)
        if ing is not None:
            was, ing.cancel_on_orphan = ing.cancel_on_orphan, True
            if not was and not meta.cancel_on_orphan:
                try:  # in the log too: whoever captures it after a restart still honours it
                    await self.log.request_cancel(meta.key)
                except StorageError as exc:  # this process still cancels when its last follower leaves
                    logger.warning("could not note the cancel request on %s in the log: %s", meta.key, exc)
            return False
        try:  # its captor learns it from the log
            await self.log.request_cancel(meta.key)
        except StorageError as exc:  # this process still cancels when its last follower leaves
            logger.warning("could not note the cancel request on %s for its captor: %s", meta.key, exc)
        return True

    def asked(self, key: str, auth: dict[str, str]) -> None:
        """A follower here (registered) asked for a cancel of a run another process captures: this
        process sends it itself when its last follower leaves and nobody follows it anywhere."""
        self._cancel_auth[key] = auth

    # --- followers come and go -----------------------------------------------------------------------

    def joined(self, follower: Follower) -> None:
        self.followers.add(follower)
        n = self._following[follower.key] = self._following.get(follower.key, 0) + 1
        ing = self.captures.live.get(follower.key)
        if ing is not None:
            ing.away = False  # a client is back: it leaving is a disconnect
            if ing.away_timer is not None:
                ing.away_timer.cancel()
                ing.away_timer = None
        if ing is not None and ing.orphan_timer is not None:
            ing.orphan_timer.cancel()
            ing.orphan_timer = None
        if n == 1:
            self.log.set_followers(follower.key, 1)

    def left(self, follower: Follower) -> None:
        self.followers.discard(follower)
        key = follower.key
        n = self._following.get(key, 0) - 1
        if n > 0:
            self._following[key] = n
            return
        self._following.pop(key, None)
        cancel_auth = self._cancel_auth.pop(key, None)
        if self.closing:
            return
        self.log.set_followers(key, 0)
        ing = self.captures.live.get(key)
        if ing is not None:
            if cancel_auth is not None and not ing.cancel_on_orphan:
                # Asked while another process captured it, which this one took over since (that one
                # stalled or died, maybe before it noted the cancel in the log): this one cancels it,
                # with the client's credentials if the take-over had none.
                ing.cancel_on_orphan = True
                ing.auth = ing.auth or cancel_auth
            self._orphaned(ing)
        elif cancel_auth is not None:
            self.run_owned(self._cancel_elsewhere(key, cancel_auth))

    async def check_orphans(self) -> None:
        """Followers on other replicas come and go unseen: what nobody follows any more is released,
        or cancelled if a client asked for that on any replica."""
        for key in list(self._cancel_pending):
            auth = self._cancel_pending.pop(key)
            ing = self.captures.live.get(key)
            if ing is None:
                self.run_owned(self._cancel_elsewhere(key, auth))  # pending again while still followed
            elif not ing.cancel_on_orphan:  # taken over here since: its capture cancels it (below)
                ing.cancel_on_orphan = True
                ing.auth = ing.auth or auth
        for ing in list(self.captures.live.values()):
            if self._following.get(ing.key):
                continue
            if ing.meta.kind == "run" and not ing.cancel_on_orphan:
                held = await self.log.lookup(ing.key)
                ing.cancel_on_orphan = held is not None and held.cancel_on_orphan
            if ing.away and ing.cancel_on_orphan:
                # Taken over: its clients were cut, and nobody has come back yet, here or on another
                # replica. One that follows it anywhere now is back: its leaving will be a disconnect.
                ing.away = not await self.everywhere(ing.key)
                continue
            if ing.meta.endless or ing.cancel_on_orphan:
                self._orphaned(ing)

    def away(self, ing: Ingest) -> None:
        """``ing`` was taken over from a process that stopped: its clients were cut, not gone. One that
        comes back within ``streams.reconnect_window`` (here: ``joined``; on another replica:
        ``check_orphans``) ends the wait; else nobody following it is a disconnect from then on, so
        a run a client asked to cancel on disconnect is not left running upstream for good."""
        if self._following.get(ing.key):
            return  # a client here follows it already (it came back before the take-over): not away
        ing.away = True
        ing.away_timer = asyncio.get_running_loop().call_later(
            self.cfg.reconnect_window, lambda: self.run_owned(self._away_over(ing)))

    async def _away_over(self, ing: Ingest) -> None:
        ing.away_timer = None
        if not ing.away or self.closing or self.captures.live.get(ing.key) is not ing:
            return
        ing.away = False
        if self._following.get(ing.key) or await self.everywhere(ing.key):
            return  # back, on another replica: its leaving will be a disconnect
        if ing.meta.kind == "run" and not ing.cancel_on_orphan:  # asked on another replica meanwhile
            held = await self.log.lookup(ing.key)
            ing.cancel_on_orphan = held is not None and held.cancel_on_orphan
        logger.info("no client of %s came back within %.0fs of its take-over", ing.key, self.cfg.reconnect_window)
        self._orphaned(ing)

    def _recovered(self, ing: Ingest) -> None:
        """Storage is back under ``ing``, whose clients were cut on purpose: if none came back and
        one of them had asked for it, the run is cancelled now."""
        if not self._following.get(ing.key) and ing.cancel_on_orphan and not ing.away:
            self.run_owned(self._cancel_run(ing))

    def _orphaned(self, ing: Ingest) -> None:
        """Nobody here follows ``ing`` any more: a thread stream lingers, then is released; a run
        whose client asked for it is cancelled (if nobody follows it on another replica either)."""
        if (self.closing or ing.recovering or self.captures.live.get(ing.key) is not ing
                or ing.orphan_timer is not None):
            return
        if ing.meta.endless:
            ing.orphan_timer = asyncio.get_running_loop().call_later(
                self.cfg.thread_linger, lambda: self.run_owned(self._release_thread(ing)))
        elif ing.cancel_on_orphan:
            self.run_owned(self._cancel_run(ing))

    async def _release_thread(self, ing: Ingest) -> None:
        ing.orphan_timer = None
        if await self.everywhere(ing.key) or not await self.captures.stop(ing):
            return
        if ing.key not in self.captures.live:  # not if a new capture began meanwhile: it owns the stream now
            try:
                await self.log.finish(ing.key, None)
            finally:  # another process may capture the thread again now (or end it, if this could not)
                await self.captures.release(ing.key)
        logger.debug("thread stream %s released after linger", ing.key)

    async def _cancel_run(self, ing: Ingest) -> None:
        if ing.cancelling or await self.everywhere(ing.key):
            return
        ing.cancelling = True
        logger.info("last client of %s left and asked for cancel on disconnect", ing.key)
        if ing.meta.thread_id is not None:
            await self._cancel(ing.meta, ing.auth)
            return
        # A stateless run has no cancel endpoint upstream: closing its leg is the cancel
        # (it was created with on_disconnect=cancel).
        if await self.captures.stop(ing):
            try:
                await self.log.finish(ing.key, "done")
            finally:
                await self.captures.release(ing.key)

    async def _cancel_elsewhere(self, key: str, auth: dict[str, str]) -> None:
        """The last follower here of a run another process captures left, and asked for a cancel:
        cancel it now if nobody follows it anywhere (else the captor does, when the last one leaves,
        if the log notes the cancel; if not, it is looked at again: ``check_orphans``)."""
        meta = await self.log.lookup(key)
        if meta is None or not meta.open:
            return
        if self._following.get(key) or key in self.captures.live or await self.log.followers(key, 0) > 0:
            if not meta.cancel_on_orphan:  # the log does not say it: whoever captures it may not know
                self._cancel_pending[key] = auth
            return
        logger.info("last client of %s left and asked for cancel on disconnect (captured elsewhere)", key)
        await self._cancel(meta, auth)

    async def _cancel(self, meta: StreamMeta, auth: dict[str, str]) -> None:
        """Cancel a run upstream. Its client is gone and nobody else will ask: a failure that may pass
        (a 5xx, a full pool, a dropped connection) is asked again, as a lost leg is re-joined."""
        failures = 0
        while True:
            try:
                await self.cancel_upstream(meta, auth)
                return
            except UpstreamError as exc:
                failures += 1
                delay = rejoin_delay(exc, failures, self.cfg, can_rejoin=True)
                if delay is None:
                    raise
                logger.info("cancel of %s failed (%s); asking again (try %d)", meta.key, exc.detail, failures)
                await asyncio.sleep(delay)
