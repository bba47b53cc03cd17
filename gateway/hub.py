"""The stream hub: one ingest task per upstream stream, fanned out to any number of clients.

Ingest reads the upstream in whole chunks, appends each chunk's events to the
log in one call, and publishes them to subscribers only after the commit. The
task belongs to the hub, not to a request: it keeps capturing after every
client has left, until the upstream stream ends.

Clients read through ``gateway.follower`` (register-then-replay); re-joining a
lost upstream leg uses ``gateway.rejoin``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from gateway.config import Streams
from gateway.eventlog import Entry, EventLog, StorageError, StreamMeta
from gateway.follower import Follower, Subscriber
from gateway.rejoin import DEDUPE_WINDOW, Dedupe, resume_point
from gateway.sse import Event, Parser, SSEProtocolError, make_body

log = logging.getLogger("gateway.hub")

# Commits one stream may have queued before its reader waits: parsing the next chunk
# overlaps the commit of the last one, and memory per stream stays bounded.
MAX_INFLIGHT_COMMITS = 8

# Opens the upstream leg of a stream again:
# (meta, upstream Last-Event-ID or None, the client's auth headers) -> response.
Rejoiner = Callable[[StreamMeta, "str | None", dict[str, str]], Awaitable[aiohttp.ClientResponse]]
UpstreamCanceller = Callable[[StreamMeta, dict[str, str]], Awaitable[None]]


class UpstreamBroke(Exception):
    """The upstream leg ended without a clean end of stream."""


def interrupted_event(reason: str) -> Event:
    payload = {"error": "CaptureInterrupted",
               "message": f"the gateway lost this stream's upstream and could not re-join it: {reason}"}
    return (make_body("error", orjson.dumps(payload)), None)


@dataclass(eq=False)
class Ingest:
    """The live capture of one upstream stream."""

    meta: StreamMeta
    subscribers: set[Subscriber]
    head: int  # last seq published to subscribers (all committed)
    task: asyncio.Task[None] | None = None
    cancel_on_orphan: bool = False
    orphan_timer: asyncio.TimerHandle | None = None
    dedupe: Dedupe | None = None
    # Credentials of the client that started the capture, for re-joins and cancels.
    # Kept in memory only: secrets never go to disk.
    auth: dict[str, str] = field(default_factory=dict)
    inflight: int = 0  # commits submitted, not yet published
    failed: BaseException | None = None  # a commit that failed: the pump stops

    @property
    def key(self) -> str:
        return self.meta.key

    def publish(self, entries: list[Entry]) -> int:
        self.head = entries[-1][0]
        dropped = 0
        for sub in self.subscribers:
            if not sub.push(entries):
                dropped += 1
        return dropped

    def beat(self) -> None:
        for sub in self.subscribers:
            sub.beat()

    def end(self) -> None:
        for sub in self.subscribers:
            sub.end()


class HubObserver:
    """Metrics hooks; the default does nothing."""

    def appended(self, events: int) -> None: ...
    def overflowed(self, n: int) -> None: ...
    def rejoined(self, ok: bool) -> None: ...
    def interrupted(self) -> None: ...


class Hub:
    def __init__(self, log_: EventLog, cfg: Streams, rejoin: Rejoiner,
                 cancel_upstream: UpstreamCanceller,
                 observer: HubObserver | None = None) -> None:
        self.log = log_
        self.cfg = cfg
        self._rejoin = rejoin
        self._cancel_upstream = cancel_upstream
        self.observer = observer or HubObserver()
        self._live: dict[str, Ingest] = {}
        self.closing = False
        self.followers: set[Follower] = set()
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._capture_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attach every stream a previous process left open."""
        for meta in self.log.streams():
            if not meta.open:
                continue
            if meta.kind == "thread":
                await self.log.finish(meta.key, None)  # re-opened when a client asks
            elif meta.resumable or meta.last_upstream_id is not None:
                log.info("re-attaching %s from upstream id %s", meta.key, meta.last_upstream_id)
                self._start(meta, None)
            else:
                await self._interrupt(meta, "the gateway restarted while the run was live and "
                                            "the upstream keeps no replay buffer for it")

    def end_clients(self) -> None:
        """End every client stream at an event boundary (shutdown: clients resume elsewhere)."""
        self.closing = True
        for f in list(self.followers):
            f.shutdown()

    async def stop(self) -> None:
        """Stop ingest; open streams stay open in the log and are re-attached on the next start."""
        self.end_clients()
        tasks = [i.task for i in self._live.values() if i.task is not None] + list(self._side_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._live.clear()

    # --- capture -----------------------------------------------------------------------------

    def live(self, key: str) -> Ingest | None:
        return self._live.get(key)

    def live_count(self) -> int:
        return len(self._live)

    def capture_lock(self, key: str) -> asyncio.Lock:
        """Held while a handler opens an upstream leg for ``key``, so two clients arriving
        together share one capture instead of starting two."""
        lock = self._capture_locks.get(key)
        if lock is None:
            lock = self._capture_locks[key] = asyncio.Lock()
        return lock

    def capture(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, *, resumed: bool = False) -> Ingest:
        """Start capturing; ``resp`` is an upstream response already open, else the hub joins.

        ``resumed``: the leg was opened with an upstream Last-Event-ID, so what it
        re-sends is de-duplicated against the log. Raises StorageFull when over budget.
        """
        if meta.key in self._live:
            raise RuntimeError(f"stream {meta.key} is already being captured")
        meta = self.log.begin(meta)
        return self._start(meta, resp, resumed=resumed)

    def _start(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, *, resumed: bool = False) -> Ingest:
        ing = Ingest(meta=meta, subscribers=set(), head=meta.head)
        self._live[meta.key] = ing
        ing.task = asyncio.create_task(self._run(ing, resp, resumed), name=f"ingest:{meta.key}")
        return ing

    async def _run(self, ing: Ingest, resp: aiohttp.ClientResponse | None, resumed: bool) -> None:
        meta = ing.meta
        failures = 0
        reason = "upstream stream ended"
        try:
            if resumed:
                ing.dedupe = Dedupe(await self.log.tail(meta.key, DEDUPE_WINDOW), DEDUPE_WINDOW)
            while True:
                try:
                    if resp is None:
                        resp = await self._open_leg(ing)
                    await self._pump(ing, resp)
                    resp = None
                    if meta.kind == "run":
                        await self._finish(ing, "done")
                        return
                    raise UpstreamBroke("the upstream closed the thread stream")
                except (UpstreamBroke, aiohttp.ClientError, asyncio.TimeoutError, SSEProtocolError) as exc:
                    resp = None
                    reason = _describe(exc)
                    # A leg that delivered events before breaking starts the retry budget over.
                    failures = 1 if isinstance(exc, _Progress) else failures + 1
                    can_rejoin = meta.kind == "thread" or meta.resumable or meta.last_upstream_id is not None
                    if not can_rejoin or failures > self.cfg.reattach_attempts:
                        log.warning("stream %s interrupted: %s", meta.key, reason)
                        await self._interrupt(meta, reason, ing)
                        return
                    log.info("stream %s upstream leg lost (%s); re-joining (try %d)", meta.key, reason, failures)
                    await asyncio.sleep(self.cfg.reattach_backoff * (2 ** (failures - 1)))
        except asyncio.CancelledError:
            raise
        except StorageError as exc:
            log.error("stream %s: event log failed, ending clients (the stream stays open for restart): %s",
                      meta.key, exc)
            ing.end()
        except Exception:
            log.exception("ingest of %s crashed", meta.key)
            ing.end()
        finally:
            if self._live.get(meta.key) is ing:
                del self._live[meta.key]
            if ing.orphan_timer is not None:
                ing.orphan_timer.cancel()

    async def _open_leg(self, ing: Ingest) -> aiohttp.ClientResponse:
        meta = ing.meta
        last = resume_point(meta.last_upstream_id)
        if meta.kind == "run":
            last = last or "-1"
        resp = await self._rejoin(meta, last, ing.auth)
        ok = resp.status == 200 and resp.content_type == "text/event-stream"
        self.observer.rejoined(ok)
        if not ok:
            body = (await resp.content.read(512)).decode("utf-8", "replace")
            resp.release()
            raise UpstreamBroke(f"re-join answered HTTP {resp.status}: {body.strip()[:200]}")
        if last is not None:  # whatever the upstream sends twice is dropped
            ing.dedupe = Dedupe(await self.log.tail(meta.key, DEDUPE_WINDOW), DEDUPE_WINDOW)
        return resp

    async def _pump(self, ing: Ingest, resp: aiohttp.ClientResponse) -> None:
        """Copy one upstream leg into the log until it ends cleanly; raises on a broken leg.

        Commits are pipelined: each chunk's events are submitted and published by
        the commit callback (in order), while the next chunk is already parsed.
        """
        parser = Parser()
        key = ing.key
        last: asyncio.Future[list[Entry]] | None = None
        committed = partial(self._committed, ing)
        try:
            async for chunk in resp.content.iter_any():
                events = parser.feed(chunk)
                if parser.comments:
                    parser.comments = 0
                    if not events:
                        ing.beat()
                if ing.dedupe is not None and events:
                    events = ing.dedupe.filter(events)
                if events:
                    if ing.failed is not None:
                        raise StorageError(f"commit failed: {ing.failed}")
                    last = self.log.submit(key, events)
                    ing.inflight += 1
                    last.add_done_callback(committed)
                    if ing.inflight >= MAX_INFLIGHT_COMMITS:
                        await last
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if last is not None:
                raise _Progress(exc) from exc
            raise
        finally:
            resp.release()
        if last is not None:
            await last  # everything of this leg is committed before the stream may end
        if parser.pending():
            raise _Progress("upstream stream ended mid-event") if last is not None else UpstreamBroke(
                "upstream stream ended mid-event")

    def _committed(self, ing: Ingest, fut: asyncio.Future[list[Entry]]) -> None:
        ing.inflight -= 1
        if fut.cancelled() or ing.failed is not None:
            return  # after a failed commit nothing more is published: clients never skip a seq
        if fut.exception() is not None:
            ing.failed = fut.exception()
            return
        entries = fut.result()
        if entries:
            self.observer.appended(len(entries))
            dropped = ing.publish(entries)
            if dropped:
                self.observer.overflowed(dropped)

    async def _finish(self, ing: Ingest, end: str | None, events: list[Event] | None = None) -> None:
        entries = await self.log.finish(ing.key, end, events or [])
        if entries:
            ing.publish(entries)
        ing.end()

    async def _interrupt(self, meta: StreamMeta, reason: str, ing: Ingest | None = None) -> None:
        self.observer.interrupted()
        entries = await self.log.finish(meta.key, "interrupted", [interrupted_event(reason)])
        if ing is not None:
            if entries:
                ing.publish(entries)
            ing.end()

    # --- subscribers -------------------------------------------------------------------------

    def subscribe(self, key: str, after: int | None) -> Follower:
        """Register now (before any await) and return the follower to iterate."""
        return Follower(self, key, after)

    def attach(self, ing: Ingest, sub: Subscriber) -> None:
        ing.subscribers.add(sub)
        if ing.orphan_timer is not None:
            ing.orphan_timer.cancel()
            ing.orphan_timer = None

    def detach(self, ing: Ingest, sub: Subscriber) -> None:
        ing.subscribers.discard(sub)
        if ing.subscribers or self.closing or self._live.get(ing.key) is not ing:
            return
        if ing.meta.kind == "thread":
            ing.orphan_timer = asyncio.get_running_loop().call_later(
                self.cfg.thread_linger, lambda: self.run_owned(self._release_thread(ing)))
        elif ing.cancel_on_orphan:
            self.run_owned(self._cancel_run(ing))

    def run_owned(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run work that must finish even if the request that started it is cancelled.

        The hub owns the task: it is cancelled at shutdown and its failure is logged.
        """
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)
        return task

    def _side_done(self, task: asyncio.Future[Any]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub background task failed", exc_info=task.exception())

    async def _release_thread(self, ing: Ingest) -> None:
        if ing.subscribers or not await self._stop_ingest(ing):
            return
        ing.end()
        if ing.key not in self._live:  # not if a new capture began meanwhile: it owns the stream now
            await self.log.finish(ing.key, None)
        log.debug("thread stream %s released after linger", ing.key)

    async def _cancel_run(self, ing: Ingest) -> None:
        if ing.subscribers:
            return
        log.info("last client of %s left and asked for cancel on disconnect", ing.key)
        if ing.meta.thread_id is not None:
            await self._cancel_upstream(ing.meta, ing.auth)
            return
        # A stateless run has no cancel endpoint upstream: closing its leg is the cancel
        # (it was created with on_disconnect=cancel).
        if await self._stop_ingest(ing):
            await self._finish(ing, "done")

    async def _stop_ingest(self, ing: Ingest) -> bool:
        """Take a live ingest out of the live set, then cancel it; False if it was not live."""
        if ing.task is None or self._live.get(ing.key) is not ing:
            return False
        del self._live[ing.key]  # from now on a new client starts a new capture
        ing.task.cancel()
        await asyncio.gather(ing.task, return_exceptions=True)
        return True


class _Progress(UpstreamBroke):
    """A broken leg that had delivered events first: the retry budget starts over."""

    def __init__(self, cause: object) -> None:
        super().__init__(_describe(cause) if isinstance(cause, BaseException) else str(cause))


def _describe(exc: object) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "upstream read timed out"
    if isinstance(exc, BaseException):
        return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    return str(exc)


