"""The stream hub: one ingest task per upstream stream, fanned out to any number of clients.

Ingest reads the upstream in whole chunks and appends each chunk's events to the
log in one call; the log hands them to followers (``gateway.follower``) through
its live feed only after the commit. The task belongs to the hub, not to a
request: it keeps capturing after every client has left, until the upstream
stream ends. The hub also knows who follows each stream, which decides when a
capture may stop (a thread stream nobody watches, a run whose last client asked
to cancel on disconnect), and it is the ``Source`` followers read through.

When a leg breaks the hub opens another (``gateway.legs``, with the Last-Event-ID
``gateway.rejoin`` decides) and passes it through a ``Seam``: re-sent events are
dropped, and a gap marker goes into the log where the gateway cannot prove that
nothing was lost. When storage fails, the stream's clients are cut (they
reconnect and replay what is committed), and the capture re-joins the upstream
once commits succeed again.
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
from multidict import CIMultiDict

from gateway.config import Streams
from gateway.errors import GatewayError
from gateway.eventlog import EndReason, Entry, EventLog, StorageError, StreamMeta
from gateway.eventlog.base import ClaimLost, Feed
from gateway.follower import Follower
from gateway.legs import Legs
from gateway.metrics import Metrics, NoMetrics
from gateway.rejoin import DEDUPE_WINDOW, Seam, expectation, leg_last_event_id
from gateway.replay import Page, ReplayPages
from gateway.sse import Event, Parser, SSEProtocolError, make_body
from gateway.stream_params import Cursor

log = logging.getLogger("gateway.hub")

# Commits one stream may have queued before its reader waits: parsing the next chunk
# overlaps the commit of the last one, and memory per stream stays bounded.
MAX_INFLIGHT_COMMITS = 8

# Cancels a run upstream: (meta, the captor's credentials).
UpstreamCanceller = Callable[[StreamMeta, dict[str, str]], Awaitable[None]]


class UpstreamBroke(Exception):
    """The upstream leg ended without a clean end of stream (worth trying again)."""


class UpstreamRefused(UpstreamBroke):
    """The upstream answered in a way trying again will not change (a 404 re-join, a malformed stream)."""


class CapturedElsewhere(Exception):
    """Another gateway process captures this stream: follow it instead."""


def interrupted_event(reason: str) -> Event:
    payload = {"error": "CaptureInterrupted",
               "message": f"the gateway lost this stream's upstream and could not re-join it: {reason}"}
    return (make_body("error", orjson.dumps(payload)), None)


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    # Not resp.content_type: it parses every header into a dict kept for the response's life
    # (1.6 KiB per idle stream).
    media = resp.headers.get("Content-Type", "").partition(";")[0]
    return resp.status == 200 and media.strip().lower() == "text/event-stream"


@dataclass(eq=False)
class Ingest:
    """The live capture of one upstream stream."""

    meta: StreamMeta  # what the stream is (key, kind, upstream path), as begun
    task: asyncio.Task[None] | None = None
    cancel_on_orphan: bool = False
    orphan_timer: asyncio.TimerHandle | None = None
    # Credentials of the client that started the capture, for re-joins and cancels.
    # Kept in memory only: secrets never go to disk.
    auth: dict[str, str] = field(default_factory=dict)
    inflight: int = 0  # commits submitted, not yet published
    failed: BaseException | None = None  # a commit that failed: the pump stops
    recovering: bool = False  # storage failed: clients were cut on purpose, not orphaned
    cancelling: bool = False  # its last follower left and asked for a cancel: done once

    @property
    def key(self) -> str:
        return self.meta.key


class Hub:
    """Captures upstream streams into the log, and is the ``Source`` its followers read through."""

    def __init__(self, log_: EventLog, cfg: Streams, legs: Legs, cancel_upstream: UpstreamCanceller,
                 metrics: Metrics | None = None) -> None:
        self.log = log_
        self.cfg = cfg
        self.legs = legs
        self.cancel_upstream = cancel_upstream
        self.metrics: Metrics = metrics or NoMetrics()
        self._live: dict[str, Ingest] = {}
        self.closing = False
        self.heartbeat = cfg.heartbeat
        self.followers: set[Follower] = set()
        self._following: dict[str, int] = {}  # followers in this process, by stream
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._capture_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._takeover_task: asyncio.Task[None] | None = None
        self.seam_delay: Callable[[], float] | None = None  # a test hook (see ready)
        self.replay = ReplayPages(log_.read, cfg.replay_cache_bytes, self.metrics.replayed)
        self._opening: set[str] = set()  # claimed, being opened: not released by an earlier capture's end
        # Runs another process captures that a client here asked to cancel on disconnect: its credentials.
        self._cancel_auth: dict[str, dict[str, str]] = {}
        log_.on_lost(self._claim_lost)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Take over every open stream nobody captures (a previous process left them open), then
        keep doing so when the log is shared (another replica may stop or die)."""
        await self._take_over()
        if self.log.takeover_interval is not None:
            self._takeover_task = asyncio.create_task(self._takeover_loop(self.log.takeover_interval),
                                                      name="takeover")

    async def _takeover_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._take_over()
                await self._check_orphans()
            except Exception:
                log.exception("taking over unowned streams failed; will retry")

    async def _take_over(self) -> None:
        for meta in await self.log.unowned():
            if self.closing or meta.key in self._live:
                continue
            if meta.kind == "thread":
                if await self.log.followers(meta.key, self._following.get(meta.key, 0)) == 0:
                    if await self.log.claim(meta.key):  # nobody watches it: released, re-opened when asked
                        await self.log.finish(meta.key, None)
                        await self.log.release(meta.key)
                    continue
            if not await self.log.claim(meta.key):
                continue  # another replica was faster
            if meta.kind == "run" and meta.thread_id is None:
                await self._interrupt(meta, "the gateway that captured this stateless run stopped while it was "
                                            "live, and the upstream has no way to re-join a stateless run")
                await self.log.release(meta.key)
                continue
            log.info("taking over %s from upstream id %s", meta.key, meta.last_upstream_id)
            self._start(meta, None, None)

    async def _check_orphans(self) -> None:
        """Followers on other replicas come and go unseen: what nobody follows any more is released,
        or cancelled if a client asked for that on any replica."""
        for ing in list(self._live.values()):
            if self._following.get(ing.key):
                continue
            if ing.meta.kind == "run" and not ing.cancel_on_orphan:
                held = await self.log.lookup(ing.key)
                ing.cancel_on_orphan = held is not None and held.cancel_on_orphan
            if ing.meta.kind == "thread" or ing.cancel_on_orphan:
                self._orphaned(ing)

    def _claim_lost(self, key: str) -> None:
        ing = self._live.get(key)
        if ing is not None and ing.task is not None:
            log.warning("stream %s is captured by another gateway process now; this one stops writing it", key)
            del self._live[key]
            ing.task.cancel()

    def end_clients(self) -> None:
        """Cut every client stream at an event boundary (shutdown: clients resume elsewhere)."""
        self.closing = True
        for f in list(self.followers):
            f.shutdown()

    async def stop(self) -> None:
        """Stop ingest; open streams stay open in the log and are taken over (by another replica
        now, or by this gateway at its next start): their claims are released at once."""
        self.end_clients()
        for ing in self._live.values():
            if ing.orphan_timer is not None:
                ing.orphan_timer.cancel()
        tasks = [i.task for i in self._live.values() if i.task is not None] + list(self._side_tasks)
        if self._takeover_task is not None:
            tasks.append(self._takeover_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in list(self._live):
            try:
                await self.log.release(key)
            except Exception as exc:  # the lease runs out by itself
                log.warning("could not release %s at shutdown: %s", key, exc)
        self._live.clear()

    # --- capture -----------------------------------------------------------------------------

    def live(self, key: str) -> Ingest | None:
        return self._live.get(key)

    def live_count(self) -> int:
        return len(self._live)

    def following(self, key: str) -> int:
        """Followers of ``key`` in this process."""
        return self._following.get(key, 0)

    def capture_lock(self, key: str) -> asyncio.Lock:
        """Held while a handler opens an upstream leg for ``key``, so two clients arriving
        together share one capture instead of starting two."""
        lock = self._capture_locks.get(key)
        if lock is None:
            lock = self._capture_locks[key] = asyncio.Lock()
        return lock

    async def capture(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, *,
                      auth: dict[str, str], cancel_on_orphan: bool = False) -> Ingest:
        """Capture a stream whose first leg ``resp`` a client's own request opened (a new run);
        with ``resp`` None the hub opens it (a background run it was not asked to stream).

        Raises StorageFull/StorageError when the log refuses; ``resp`` is closed then.
        """
        if meta.key in self._live:
            raise RuntimeError(f"stream {meta.key} is already being captured")
        self._opening.add(meta.key)
        try:
            if not await self.log.claim(meta.key):
                raise CapturedElsewhere(meta.key)
            meta = await self.log.begin(meta)
        except ClaimLost:
            if resp is not None:
                resp.close()
            raise CapturedElsewhere(meta.key) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        finally:
            self._opening.discard(meta.key)
        return self._start(meta, resp, None, auth=auth, cancel_on_orphan=cancel_on_orphan)

    async def open_capture(self, meta: StreamMeta, cursor: Cursor, client_headers: CIMultiDict[str], query: str, *,
                           auth: dict[str, str],
                           cancel_on_orphan: bool = False) -> tuple[Ingest, aiohttp.ClientResponse] | aiohttp.ClientResponse:
        """Open a leg for a client and capture it: a run or thread not captured right now.

        Returns the capture and the leg (for its headers), or the upstream's answer
        alone when it is not an event stream (the caller relays it as is). Raises
        CapturedElsewhere when another gateway process captures it already.
        """
        key = meta.key
        self._opening.add(key)
        try:
            if not await self.log.claim(key):
                raise CapturedElsewhere(key)
            try:
                held = await self.log.lookup(key)
                last = leg_last_event_id(meta.kind, held, cursor)
                resp = await self.legs.open(meta, last, client_headers=client_headers, query=query)
            except BaseException:
                await self.log.release(key)
                raise
            if not is_event_stream(resp):
                await self.log.release(key)
                return resp
            try:
                seam = await self._seam(meta, held, last)
                meta = await self.log.begin(meta)
            except ClaimLost:
                resp.close()
                raise CapturedElsewhere(key) from None
            except BaseException:
                resp.close()
                await self.log.release(key)
                raise
            return self._start(meta, resp, seam, auth=auth, cancel_on_orphan=cancel_on_orphan), resp
        finally:
            self._opening.discard(key)

    def _start(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, seam: Seam | None, *,
               auth: dict[str, str] | None = None, cancel_on_orphan: bool = False) -> Ingest:
        ing = Ingest(meta=meta, auth=auth or {}, cancel_on_orphan=cancel_on_orphan)
        self._live[meta.key] = ing
        ing.task = asyncio.create_task(self._run(ing, resp, seam), name=f"ingest:{meta.key}")
        return ing

    async def _seam(self, meta: StreamMeta, held: StreamMeta | None, last: str | None) -> Seam | None:
        """How a new leg opened with ``last`` meets what is held: None when there is nothing to check."""
        expect = expectation(meta.kind, held)
        if last is None and expect is None:
            return None  # a first leg, live tail only: nothing to match, nothing re-sent
        recent = await self.log.tail(meta.key, DEDUPE_WINDOW) if held is not None and held.head else []
        return Seam(recent, after=held.head if held is not None else 0, expect=expect, on_gap=self.metrics.gap)

    async def _run(self, ing: Ingest, resp: aiohttp.ClientResponse | None, seam: Seam | None) -> None:
        kind = ing.meta.kind
        failures = 0
        try:
            while True:
                try:
                    if resp is None:
                        if await self._ended(ing.key):
                            await self._finish(ing, "done")
                            return
                        resp, seam = await self._rejoin(ing)
                    await self._pump(ing, resp, seam)
                    resp = None
                    if kind == "run":
                        await self._finish(ing, "done", seam.close() if seam is not None else [])
                        return
                    raise UpstreamBroke("the upstream closed the thread stream")
                except (UpstreamBroke, aiohttp.ClientError, asyncio.TimeoutError, SSEProtocolError) as exc:
                    resp = None
                    reason = _describe(exc)
                    # A leg that delivered events before breaking starts the retry budget over.
                    failures = 1 if isinstance(exc, _Progress) else failures + 1
                    permanent = isinstance(exc, (UpstreamRefused, SSEProtocolError))
                    if permanent or not self._can_rejoin(ing) or failures > self.cfg.reattach_attempts:
                        log.warning("stream %s interrupted: %s", ing.key, reason)
                        await self._interrupt(ing.meta, reason, ing)
                        return
                    log.info("stream %s upstream leg lost (%s); re-joining (try %d)", ing.key, reason, failures)
                    await asyncio.sleep(self.cfg.reattach_backoff * (2 ** (failures - 1)))
                except StorageError as exc:
                    resp = None
                    await self._recover_storage(ing, exc)
                    failures = 0
        except asyncio.CancelledError:
            raise
        except ClaimLost:
            log.warning("stream %s is captured by another gateway process now; this one stops writing it", ing.key)
            return
        except Exception as exc:
            # A bug, not a fault of the upstream or storage: end the stream with an error event
            # rather than leave it open, or every join would re-attach it and crash again.
            log.exception("ingest of %s crashed", ing.key)
            await self._interrupt(ing.meta, f"the gateway failed capturing it ({exc.__class__.__name__})", ing)
        finally:
            if resp is not None:
                resp.close()
            if self._live.get(ing.key) is ing:
                del self._live[ing.key]
            if ing.orphan_timer is not None:
                ing.orphan_timer.cancel()
        await self._release(ing.key)

    async def _release(self, key: str) -> None:
        if key in self._live or key in self._opening:
            return  # a new capture of the stream holds the claim now
        try:
            await self.log.release(key)
        except Exception as exc:  # the lease runs out by itself
            log.warning("could not release %s: %s", key, exc)

    async def _ended(self, key: str) -> bool:
        """A run whose last event is its error event is over: there is nothing to re-join for."""
        held = await self.log.lookup(key)
        return held is not None and held.kind == "run" and held.last_event == "error"

    def _can_rejoin(self, ing: Ingest) -> bool:
        # A stateless run has no join path upstream.
        return ing.meta.kind == "thread" or ing.meta.thread_id is not None

    async def _rejoin(self, ing: Ingest) -> tuple[aiohttp.ClientResponse, Seam | None]:
        held = await self.log.lookup(ing.key)
        last = leg_last_event_id(ing.meta.kind, held)
        try:
            resp = await self.legs.open(ing.meta, last, auth=ing.auth)
        except GatewayError as exc:  # to the hub this is just a leg that did not open
            self.metrics.rejoined(False)
            raise UpstreamBroke(exc.detail) from exc
        ok = is_event_stream(resp)
        self.metrics.rejoined(ok)
        if not ok:
            body = (await resp.content.read(512)).decode("utf-8", "replace")
            resp.release()
            detail = f"re-join answered HTTP {resp.status}: {body.strip()[:200]}"
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                raise UpstreamRefused(detail)
            raise UpstreamBroke(detail)
        try:
            return resp, await self._seam(ing.meta, held, last)
        except BaseException:
            resp.close()
            raise

    async def _recover_storage(self, ing: Ingest, exc: StorageError) -> None:
        """Storage failed under a live capture: cut its clients, wait, then capture again."""
        log.error("stream %s: the event log failed (%s); clients cut, capture resumes when storage does",
                  ing.key, exc)
        ing.recovering = True
        self.log.cut(ing.key)
        try:
            while True:
                await self.log.wait_healthy()
                try:
                    await self.log.begin(ing.meta)
                    break
                except StorageError as again:  # failing again already, or over budget: wait and retry
                    log.warning("stream %s: storage not ready to resume (%s)", ing.key, again)
                    await asyncio.sleep(1.0)
        finally:
            ing.recovering = False
        ing.failed = None
        log.info("stream %s: storage is back; re-joining the upstream", ing.key)
        if not self._following.get(ing.key) and ing.cancel_on_orphan:
            self.run_owned(self._cancel_run(ing))

    async def _pump(self, ing: Ingest, resp: aiohttp.ClientResponse, seam: Seam | None) -> None:
        """Copy one upstream leg into the log until it ends cleanly; raises on a broken leg.

        Commits are pipelined: each chunk's events are submitted and published by
        the commit callback (in order), while the next chunk is already parsed.
        Every commit of the leg is settled before this returns or raises.
        """
        parser = Parser(self.cfg.max_event_bytes)
        key = ing.key
        last: asyncio.Future[list[Entry]] | None = None
        committed = partial(self._committed, ing)
        try:
            async for chunk in resp.content.iter_any():
                events = parser.feed(chunk)
                if parser.comments:
                    parser.comments = 0
                    if not events:
                        self.log.beat(key)
                if seam is not None and events:
                    events = seam.filter(events)
                if events:
                    if ing.failed is not None:
                        raise StorageError(str(ing.failed))
                    last = self.log.submit(key, events)
                    ing.inflight += 1
                    last.add_done_callback(committed)
                    if ing.inflight >= MAX_INFLIGHT_COMMITS:
                        await last
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Whatever broke the leg, what it delivered is settled first, so the next leg
            # starts from what is really committed.
            await _settle(last)
            if ing.failed is not None:
                raise StorageError(str(ing.failed)) from exc
            if last is not None and isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)):
                raise _Progress(exc) from exc
            raise
        finally:
            resp.release()
        await _settle(last)  # everything of this leg is committed before the stream may end
        if ing.failed is not None:
            raise StorageError(str(ing.failed))
        if parser.pending():
            raise _Progress("upstream stream ended mid-event") if last is not None else UpstreamBroke(
                "upstream stream ended mid-event")

    def _committed(self, ing: Ingest, fut: asyncio.Future[list[Entry]]) -> None:
        ing.inflight -= 1
        if fut.cancelled() or ing.failed is not None:
            return  # after a failed commit the pump stops: the stream never has a hole
        if fut.exception() is not None:
            ing.failed = fut.exception()
            return
        entries = fut.result()
        if entries:
            self.metrics.appended(len(entries))

    async def _finish(self, ing: Ingest, end: EndReason, events: list[Event] | None = None) -> None:
        await self.log.finish(ing.key, end, events or [])  # its followers get the end from the log

    async def _interrupt(self, meta: StreamMeta, reason: str, ing: Ingest | None = None) -> None:
        self.metrics.interrupted()
        try:
            await self.log.finish(meta.key, "interrupted", [interrupted_event(reason)])
        except StorageError as exc:
            log.error("stream %s: could not record its interruption (%s); it stays open for the next start",
                      meta.key, exc)
            self.log.cut(meta.key)
        except ClaimLost:
            log.warning("stream %s is captured by another gateway process now; it ends it, not this one", meta.key)

    # --- followers: the Source they read through ------------------------------------------------

    def follow(self, key: str, after: int | None) -> Follower:
        """A follower of ``key`` from ``after`` (None: the live tail), registered at once."""
        return Follower(self, key, after)

    async def join(self, key: str, after: int | None, *, cancel_on_disconnect: bool = False,
                   auth: dict[str, str] | None = None) -> Follower:
        """Follow a stream the log holds. One that is open but captured by nobody (its ingest
        crashed) is captured again first: a follower never waits on a stream nobody writes.

        ``cancel_on_disconnect``: the run is cancelled upstream once nobody follows it on any
        replica; ``auth`` are the client's credentials, for a cancel sent from here.
        """
        meta = await self.log.lookup(key)
        if (key not in self._live and meta is not None and meta.open and meta.kind == "run" and not self.closing
                and await self.log.claim(key) and key not in self._live):
            log.info("stream %s is open but nobody captures it; re-attaching", key)
            self._start(meta, None, None)
        elsewhere = False
        if cancel_on_disconnect and meta is not None and meta.kind == "run" and meta.open:
            ing = self._live.get(key)
            if ing is not None:
                ing.cancel_on_orphan = True
            else:  # captured by another process: it learns the wish from the log
                elsewhere = True
                try:
                    await self.log.request_cancel(key)
                except StorageError as exc:  # this process still cancels when its last follower leaves
                    log.warning("could not note the cancel request on %s for its captor: %s", key, exc)
        follower = Follower(self, key, after)
        if elsewhere:
            self._cancel_auth[key] = auth or {}  # for a cancel from here when the last follower leaves (left)
        return follower

    async def wait_for(self, key: str, wait: float) -> None:
        """Until a stream another gateway process has just claimed is in the log (CapturedElsewhere
        if that takes longer than ``wait``)."""
        deadline = asyncio.get_running_loop().time() + wait
        while await self.log.lookup(key) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise CapturedElsewhere(key)
            await asyncio.sleep(0.05)

    async def ready(self, feed: Feed) -> None:
        await self.log.ready(feed)
        if self.seam_delay is not None:  # tests only: widen the window between subscribing and the head
            await asyncio.sleep(self.seam_delay())

    async def lookup(self, key: str) -> StreamMeta | None:
        return await self.log.lookup(key)

    async def page(self, key: str, after: int, upto: int, limit: int) -> Page:
        return await self.replay.page(key, after, upto, limit)

    def subscribe(self, key: str) -> Feed:
        return self.log.subscribe(key, self.cfg.subscriber_buffer, self.cfg.subscriber_buffer_bytes,
                                  lambda: self.metrics.overflowed(1))

    def joined(self, follower: Follower) -> None:
        self.followers.add(follower)
        n = self._following[follower.key] = self._following.get(follower.key, 0) + 1
        ing = self._live.get(follower.key)
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
        ing = self._live.get(key)
        if ing is not None:
            self._orphaned(ing)
        elif cancel_auth is not None:
            self.run_owned(self._cancel_elsewhere(key, cancel_auth))

    def _orphaned(self, ing: Ingest) -> None:
        """Nobody here follows ``ing`` any more: a thread stream lingers, then is released; a run
        whose client asked for it is cancelled (if nobody follows it on another replica either)."""
        if self.closing or ing.recovering or self._live.get(ing.key) is not ing or ing.orphan_timer is not None:
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
        ing.orphan_timer = None
        if await self._followed(ing) or not await self._stop_ingest(ing):
            return
        if ing.key not in self._live:  # not if a new capture began meanwhile: it owns the stream now
            await self.log.finish(ing.key, None)
        log.debug("thread stream %s released after linger", ing.key)

    async def _followed(self, ing: Ingest) -> bool:
        return await self.log.followers(ing.key, self._following.get(ing.key, 0)) > 0

    async def _cancel_run(self, ing: Ingest) -> None:
        if ing.cancelling or await self._followed(ing):
            return
        ing.cancelling = True
        log.info("last client of %s left and asked for cancel on disconnect", ing.key)
        if ing.meta.thread_id is not None:
            await self.cancel_upstream(ing.meta, ing.auth)
            return
        # A stateless run has no cancel endpoint upstream: closing its leg is the cancel
        # (it was created with on_disconnect=cancel).
        if await self._stop_ingest(ing):
            await self._finish(ing, "done")

    async def _cancel_elsewhere(self, key: str, auth: dict[str, str]) -> None:
        """The last follower here of a run another process captures left, and asked for a cancel:
        cancel it now if nobody follows it anywhere (else the captor does, when the last one leaves)."""
        meta = await self.log.lookup(key)
        if (meta is None or not meta.open or self._following.get(key) or key in self._live
                or await self.log.followers(key, 0) > 0):
            return
        log.info("last client of %s left and asked for cancel on disconnect (captured elsewhere)", key)
        await self.cancel_upstream(meta, auth)

    async def _stop_ingest(self, ing: Ingest) -> bool:
        """Take a live ingest out of the live set, then cancel it; False if it was not live."""
        if ing.task is None or self._live.get(ing.key) is not ing:
            return False
        del self._live[ing.key]  # from now on a new client starts a new capture
        ing.task.cancel()
        await asyncio.gather(ing.task, return_exceptions=True)
        return True


async def _settle(fut: asyncio.Future[Any] | None) -> None:
    """Wait for a commit without raising: its outcome reaches the ingest through its callback."""
    if fut is not None and not fut.done():
        await asyncio.wait([fut])


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

