"""The stream hub: one ingest task per upstream stream, fanned out to any number of clients.

Ingest reads the upstream in whole chunks, appends each chunk's events to the
log in one call, and publishes them to subscribers only after the commit. The
task belongs to the hub, not to a request: it keeps capturing after every
client has left, until the upstream stream ends.

When a leg breaks the hub opens another (``gateway.legs``, with the Last-Event-ID
``gateway.rejoin`` decides) and passes it through a ``Seam``: re-sent events are
dropped, and a gap marker goes into the log where the gateway cannot prove that
nothing was lost. When storage fails, the stream's clients are cut (they
reconnect and replay what is committed), and the capture re-joins the upstream
once commits succeed again. Clients read through ``gateway.follower``.
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
from gateway.follower import Follower, Subscriber
from gateway.legs import Legs
from gateway.metrics import Metrics, NoMetrics
from gateway.rejoin import DEDUPE_WINDOW, Seam, expectation, leg_last_event_id
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


def interrupted_event(reason: str) -> Event:
    payload = {"error": "CaptureInterrupted",
               "message": f"the gateway lost this stream's upstream and could not re-join it: {reason}"}
    return (make_body("error", orjson.dumps(payload)), None)


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.status == 200 and resp.content_type == "text/event-stream"


@dataclass(eq=False)
class Ingest:
    """The live capture of one upstream stream."""

    meta: StreamMeta  # what the stream is (key, kind, upstream path), as begun
    subscribers: set[Subscriber]
    head: int  # last seq published to subscribers (all committed)
    task: asyncio.Task[None] | None = None
    cancel_on_orphan: bool = False
    orphan_timer: asyncio.TimerHandle | None = None
    # Credentials of the client that started the capture, for re-joins and cancels.
    # Kept in memory only: secrets never go to disk.
    auth: dict[str, str] = field(default_factory=dict)
    inflight: int = 0  # commits submitted, not yet published
    failed: BaseException | None = None  # a commit that failed: the pump stops
    recovering: bool = False  # storage failed: clients were cut on purpose, not orphaned

    @property
    def key(self) -> str:
        return self.meta.key

    def publish(self, entries: list[Entry]) -> int:
        self.head = entries[-1][0]
        nbytes = sum([len(body) for _, body in entries])
        dropped = 0
        for sub in self.subscribers:
            if not sub.push(entries, nbytes):
                dropped += 1
        return dropped

    def beat(self) -> None:
        for sub in self.subscribers:
            sub.beat()

    def end(self, *, cut: bool = False) -> None:
        for sub in self.subscribers:
            sub.end(cut=cut)


class Hub:
    def __init__(self, log_: EventLog, cfg: Streams, legs: Legs, cancel_upstream: UpstreamCanceller,
                 metrics: Metrics | None = None) -> None:
        self.log = log_
        self.cfg = cfg
        self.legs = legs
        self.cancel_upstream = cancel_upstream
        self.metrics: Metrics = metrics or NoMetrics()
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
            elif meta.thread_id is not None:
                log.info("re-attaching %s from upstream id %s", meta.key, meta.last_upstream_id)
                self._start(meta, None, None)
            else:
                await self._interrupt(meta, "the gateway restarted while the stateless run was live, and the "
                                            "upstream has no way to re-join a stateless run")

    def end_clients(self) -> None:
        """Cut every client stream at an event boundary (shutdown: clients resume elsewhere)."""
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

    async def capture(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, *,
                      auth: dict[str, str], cancel_on_orphan: bool = False) -> Ingest:
        """Capture a stream whose first leg ``resp`` a client's own request opened (a new run);
        with ``resp`` None the hub opens it (a background run it was not asked to stream).

        Raises StorageFull/StorageError when the log refuses; ``resp`` is closed then.
        """
        if meta.key in self._live:
            raise RuntimeError(f"stream {meta.key} is already being captured")
        try:
            meta = await self.log.begin(meta)
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        return self._start(meta, resp, None, auth=auth, cancel_on_orphan=cancel_on_orphan)

    async def open_capture(self, meta: StreamMeta, cursor: Cursor, client_headers: CIMultiDict[str], query: str, *,
                           auth: dict[str, str],
                           cancel_on_orphan: bool = False) -> tuple[Ingest, aiohttp.ClientResponse] | aiohttp.ClientResponse:
        """Open a leg for a client and capture it: a run or thread not captured right now.

        Returns the capture and the leg (for its headers), or the upstream's answer
        alone when it is not an event stream (the caller relays it as is).
        """
        held = self.log.get(meta.key)
        last = leg_last_event_id(meta.kind, held, cursor)
        resp = await self.legs.open(meta, last, client_headers=client_headers, query=query)
        if not is_event_stream(resp):
            return resp
        try:
            seam = await self._seam(meta, held, last)
            meta = await self.log.begin(meta)
        except BaseException:
            resp.close()
            raise
        return self._start(meta, resp, seam, auth=auth, cancel_on_orphan=cancel_on_orphan), resp

    def _start(self, meta: StreamMeta, resp: aiohttp.ClientResponse | None, seam: Seam | None, *,
               auth: dict[str, str] | None = None, cancel_on_orphan: bool = False) -> Ingest:
        ing = Ingest(meta=meta, subscribers=set(), head=meta.head, auth=auth or {}, cancel_on_orphan=cancel_on_orphan)
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
                        if self._ended(ing.key):
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
        except Exception:
            log.exception("ingest of %s crashed", ing.key)
            ing.end(cut=True)
        finally:
            if resp is not None:
                resp.close()
            if self._live.get(ing.key) is ing:
                del self._live[ing.key]
            if ing.orphan_timer is not None:
                ing.orphan_timer.cancel()

    def _ended(self, key: str) -> bool:
        """A run whose last event is its error event is over: there is nothing to re-join for."""
        held = self.log.get(key)
        return held is not None and held.kind == "run" and held.last_event == "error"

    def _can_rejoin(self, ing: Ingest) -> bool:
        # A stateless run has no join path upstream.
        return ing.meta.kind == "thread" or ing.meta.thread_id is not None

    async def _rejoin(self, ing: Ingest) -> tuple[aiohttp.ClientResponse, Seam | None]:
        held = self.log.get(ing.key)
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
        ing.end(cut=True)
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
        if not ing.subscribers and ing.cancel_on_orphan:
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
                        ing.beat()
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
            return  # after a failed commit nothing more is published: clients never skip a seq
        if fut.exception() is not None:
            ing.failed = fut.exception()
            return
        entries = fut.result()
        if entries:
            self.metrics.appended(len(entries))
            dropped = ing.publish(entries)
            if dropped:
                self.metrics.overflowed(dropped)

    async def _finish(self, ing: Ingest, end: EndReason, events: list[Event] | None = None) -> None:
        entries = await self.log.finish(ing.key, end, events or [])
        if entries:
            ing.publish(entries)
        ing.end()

    async def _interrupt(self, meta: StreamMeta, reason: str, ing: Ingest | None = None) -> None:
        self.metrics.interrupted()
        try:
            entries = await self.log.finish(meta.key, "interrupted", [interrupted_event(reason)])
        except StorageError as exc:
            log.error("stream %s: could not record its interruption (%s); it stays open for the next start",
                      meta.key, exc)
            if ing is not None:
                ing.end(cut=True)
            return
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
        if ing.subscribers or self.closing or ing.recovering or self._live.get(ing.key) is not ing:
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
            await self.cancel_upstream(ing.meta, ing.auth)
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

