"""Captures: one ingest per upstream stream, copying it into the log until it ends.

Ingest reads the upstream in whole chunks and appends each chunk's events to the
log in one call; the log hands them to followers through its live feed only after
the commit. The ingest belongs to the process, not to a request: it keeps capturing
after every client has left, until the upstream stream ends. Its task runs between
legs (opening one, re-joining, finishing); while a leg is open the reads are copied
as they arrive and the capture is parked, with no task (``Parked``).

When a leg breaks the capture opens another (``gateway.legs``, with the Last-Event-ID
``gateway.rejoin`` decides) and passes it through a ``Seam``: re-sent events are
dropped, and a gap marker goes into the log where the gateway cannot prove that
nothing was lost. Whether to try again is ``rejoin_delay``'s decision, on
``gateway.upstream.classify``'s verdict. When storage fails, the stream's clients
are cut (they reconnect and replay what is committed), and the capture re-joins
the upstream once commits succeed again.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import aiohttp
from multidict import CIMultiDict

from gateway.agentapi import Cursor
from gateway.config import Streams
from gateway.errors import GatewayError, describe
from gateway.eventlog import EndReason, Entry, EventLog, StorageError, StreamMeta
from gateway.eventlog.base import ClaimLost, Settled, stop_tasks
from gateway.legs import Legs
from gateway.metrics import GapReason, LeaseLoss, Metrics
from gateway.marks import ERROR_EVENT, interrupted_event
from gateway.rejoin import DEDUPE_WINDOW, Seam, begins_partway, expectation, leg_last_event_id
from gateway.sessions import SessionSeam, latest_run
from gateway.sessions import interrupted_event as session_interrupted_event
from gateway.sessions import event_id as session_event_id
from gateway.sse import Event, Parser, SSEProtocolError
from gateway.streamclient import LegResponse
from gateway.upstream import Answer, PoolFull, UpstreamRefused, classify

logger = logging.getLogger("gateway.capture")

# Commits one stream may have queued before its reader waits: parsing the next chunk
# overlaps the commit of the last one, and memory per stream stays bounded.
MAX_INFLIGHT_COMMITS = 8


class UpstreamBroke(Exception):
    """The upstream leg ended without a clean end of stream (worth trying again)."""


class _Progress(UpstreamBroke):
    """A broken leg that had delivered events first: the retry budget starts over."""

    def __init__(self, cause: object) -> None:
        super().__init__(_leg_failure(cause) if isinstance(cause, BaseException) else str(cause))


class CapturedElsewhere(Exception):
    """Another capture holds this stream (another process's, or one here the log lost track of):
    follow it instead."""


def is_event_stream(resp: Answer) -> bool:
    media = resp.headers.get("Content-Type", "").partition(";")[0]
    return resp.status == 200 and media.strip().lower() == "text/event-stream"


# Bytes a leg's gzip is inflated by at a time: a small read that inflates to gigabytes is parsed
# (and refused past max_event_bytes) piece by piece, never held whole.
_INFLATE_STEP = 256 << 10


def decoded(coding: str, sink: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """``sink`` fed a leg's payload as events: decoded from gzip (or zlib deflate) first when the leg
    came encoded. A leg asks for ``Accept-Encoding: identity``, but a proxy in front of the upstream
    may compress event streams all the same; read as they came, they were captured as garbage.
    An encoding the gateway cannot read fails the leg as a broken event stream (never retried)."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return sink
    if coding not in ("gzip", "x-gzip", "deflate"):
        def refuse(_data: bytes) -> None:
            raise SSEProtocolError(f"the upstream sent its event stream with Content-Encoding {coding!r}, "
                                   "which the gateway cannot read (it asks for identity)")
        return refuse
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib, told by the header

    def feed(data: bytes) -> None:
        while data:
            try:
                out = inflate.decompress(data, _INFLATE_STEP)
            except zlib.error as exc:
                raise SSEProtocolError(f"the upstream's {coding}-encoded event stream is corrupt ({exc})") from None
            data = inflate.unconsumed_tail
            if out:
                sink(out)
    return feed


def rejoin_delay(exc: BaseException, failures: int, cfg: Streams, can_rejoin: bool) -> float | None:
    """Seconds to wait before re-joining a leg that broke with ``exc``, the ``failures``-th time in a
    row; None: give up (the stream ends with CaptureInterrupted)."""
    if not can_rejoin or classify(exc) != "retry" or failures > cfg.reattach_attempts:
        return None
    return float(cfg.reattach_backoff * 2 ** (failures - 1))


@dataclass(eq=False, slots=True)  # one per live stream: no instance dict
class Ingest:
    """The live capture of one upstream stream."""

    meta: StreamMeta  # what the stream is (key, kind, upstream path), as begun
    task: asyncio.Task[None] | None = None  # the ingest task; None while parked
    parked: Parked | None = None  # a leg being copied with no task waiting on it (Captures._park)
    cancel_on_orphan: bool = False
    orphan_timer: asyncio.TimerHandle | None = None
    # Credentials of the client that started the capture, for re-joins and cancels.
    # Kept in memory only: secrets never go to disk.
    auth: dict[str, str] = field(default_factory=dict)
    inflight: int = 0  # commits submitted, not yet published
    idle: asyncio.Future[None] | None = None  # someone waits for inflight to reach 0 (settle)
    resume: Callable[[], None] | None = None  # the leg is paused until the log catches up
    failed: BaseException | None = None  # a commit that failed: the copy stops
    recovering: bool = False  # storage failed: clients were cut on purpose, not orphaned
    cancelling: bool = False  # its last follower left and asked for a cancel: done once
    # Taken over from a process that stopped: its clients were cut, not gone, and a cancel on
    # disconnect one of them asked for waits until a client came back (``gateway.presence``), or
    # until ``away_timer`` (streams.reconnect_window) says none will.
    away: bool = False
    away_timer: asyncio.TimerHandle | None = None

    @property
    def key(self) -> str:
        return self.meta.key

    def __call__(self, outcome: list[Entry] | BaseException) -> None:
        """A chunk's commit settled (called from the log's commit, in submission order). The ingest
        is its commits' callback itself: a partial or bound method held per live stream is ~200
        bytes of an idle stream's budget."""
        self.inflight -= 1
        resume = self.resume
        if resume is not None and self.inflight < MAX_INFLIGHT_COMMITS:
            self.resume = None
            resume()
        if self.inflight == 0 and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)
        if self.failed is not None:
            return  # after a failed commit the copy stops: the stream never has a hole
        if isinstance(outcome, BaseException):
            self.failed = outcome
            if self.parked is not None:
                # A parked capture hears of it at its leg's next events or end: on an idle thread or
                # session, hours away, its clients waiting on an open stream for what the log refused.
                # The leg ends now, and the capture recovers (its clients cut) as from a broken leg.
                self.parked.copy.resp.abort(outcome)

    def drop_timers(self) -> None:
        """The capture ends here: what was to happen to it later will not."""
        for timer in (self.orphan_timer, self.away_timer):
            if timer is not None:
                timer.cancel()


@dataclass(eq=False, slots=True)
class Parked:
    """A capture between the start of a leg's copy and its end, with no task: an idle stream's
    capture waits like this for hours, and a task with its coroutines costs it ~1 KiB. The leg's
    end starts the task again (``Captures._unpark``)."""

    copy: _Copy  # the leg's copy into the log: it holds the leg (resp) and its seam
    end: asyncio.Future[None]
    failures: int  # the re-join budget spent so far
    # Captures._unpark, bound once for all: the parked capture is its leg's end callback itself (a
    # partial per idle stream was ~200 bytes).
    unpark: Callable[[Ingest, asyncio.Future[None]], None]

    def __call__(self, end: asyncio.Future[None]) -> None:
        self.unpark(self.copy.ing, end)


class _Copy:
    """What one leg's reads go to: each read's events, parsed, filtered by the seam, submitted to
    the log, without a task step per read. An object with slots, not a closure: a leg keeps it for
    hours on an idle stream, and a closure holds a cell per variable it uses."""

    __slots__ = ("log", "ing", "parser", "seam", "resp", "submitted", "on_gap")

    def __init__(self, log: EventLog, ing: Ingest, parser: Parser, seam: Seam | SessionSeam | None,
                 resp: LegResponse, on_gap: Callable[[GapReason], None]) -> None:
        self.log, self.ing, self.parser, self.seam, self.resp = log, ing, parser, seam, resp
        # The leg brought something new: some of its events went to the log (of a session's, one of
        # the thread's history: SessionSeam.progressed).
        self.submitted = False
        self.on_gap = on_gap  # a gap marker is counted once the batch carrying it is committed

    def __call__(self, data: bytes) -> None:
        parser, ing = self.parser, self.ing
        try:
            events = parser.feed(data)
        except SSEProtocolError as exc:
            # The events before the broken one came whole: they go to the log, then the leg ends
            # with the error (and the stream with its error event, after them).
            self.submit(exc.events)
            raise
        self.submit(events)

    def submit(self, events: list[Event]) -> None:
        parser, ing = self.parser, self.ing
        if parser.comments:
            parser.comments = 0
            if not events:
                self.log.beat(ing.key)
        marked: GapReason | None = None
        if (seam := self.seam) is not None and events:
            unmarked = seam.gap is None
            events = seam.filter(events)
            marked = seam.gap if unmarked else None
        if events:
            if ing.failed is not None:
                raise StorageError(str(ing.failed))
            self.log.submit_then(ing.key, events, ing if marked is None else
                                 partial(_count_marker, self.on_gap, marked, ing))
            self.submitted = self.submitted or not isinstance(seam, SessionSeam) or seam.progressed
            ing.inflight += 1
            if ing.inflight >= MAX_INFLIGHT_COMMITS and ing.resume is None:
                ing.resume = self.resp.pause()  # the log is behind: stop reading until it catches up


class Captures:
    """The streams this process captures, and how each is copied into the log."""

    def __init__(self, log: EventLog, cfg: Streams, legs: Legs, metrics: Metrics) -> None:
        self.log = log
        self.cfg = cfg
        self.legs = legs
        self.metrics = metrics
        self._count_gap = metrics.gap  # bound once: each live stream's copy holds it (a bound method is 64 B)
        self._unpark_bound = self._unpark  # likewise, for each parked capture (a cycle of this one object)
        self.live: dict[str, Ingest] = {}
        self._opening: set[str] = set()  # claimed, being opened: not released by an earlier capture's end
        # Storage is back under a capture whose clients were cut: the policy for who follows it
        # (a run nobody follows any more may be cancelled) hears of it here.
        self.on_recovered: Callable[[Ingest], None] = lambda ing: None
        log.on_lost(self._claim_lost)

    # --- starting ---------------------------------------------------------------------------

    async def begin(self, meta: StreamMeta, resp: LegResponse | None, *,
                    auth: dict[str, str], cancel_on_orphan: bool = False) -> Ingest:
        """Capture a stream whose first leg ``resp`` a client's own request opened (a new run);
        with ``resp`` None the capture opens it (a background run nobody streams yet).

        Raises CapturedElsewhere, or StorageFull/StorageError when the log refuses; ``resp`` is
        closed then.
        """
        if meta.key in self.live:
            if resp is not None:
                resp.close()
            raise RuntimeError(f"stream {meta.key} is already being captured")
        self._opening.add(meta.key)
        try:
            if not await self.log.claim(meta.key):
                raise CapturedElsewhere(meta.key)
            return await self._begin_and_start(_asking(meta, cancel_on_orphan), resp, None, auth=auth,
                                               cancel_on_orphan=cancel_on_orphan)
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

    async def open(self, meta: StreamMeta, cursor: Cursor, client_headers: CIMultiDict[str], query: str, *,
                   auth: dict[str, str],
                   cancel_on_orphan: bool = False) -> tuple[Ingest, LegResponse] | LegResponse:
        """Open a leg for a client and capture it: a run or thread not captured right now.

        Returns the capture and the leg (for its headers), or the upstream's answer
        alone when it is not an event stream (the caller relays it as is). Raises
        CapturedElsewhere when another gateway process captures it already.
        """
        key = meta.key
        if key in self.live:
            # Captured here, though the log no longer holds it (Redis lost it and the capture has not
            # begun it again yet). The log grants a claim this process holds to every caller: a
            # second capture would append every event again. The client follows once it is begun.
            raise CapturedElsewhere(key)
        self._opening.add(key)
        try:
            if not await self.log.claim(key):
                raise CapturedElsewhere(key)
            try:
                held = await self.log.lookup(key)
                last = leg_last_event_id(meta.kind, held, cursor)
                if begins_partway(meta.kind, held, last):
                    meta = replace(meta, begun_partway=True)
                resp = await self.legs.open(meta, last, client_headers=client_headers, query=query)
            except BaseException:
                await self.log.release(key)
                raise
            if not is_event_stream(resp):
                try:
                    await self.log.release(key)
                except BaseException:
                    resp.close()
                    raise
                return resp
            try:
                seam = await self._seam(meta, held, last)
                ing = await self._begin_and_start(_asking(meta, cancel_on_orphan), resp, seam, auth=auth,
                                                  cancel_on_orphan=cancel_on_orphan)
            except ClaimLost:
                resp.close()
                raise CapturedElsewhere(key) from None
            except BaseException:
                resp.close()
                await self.log.release(key)
                raise
            return ing, resp
        finally:
            self._opening.discard(key)

    async def _begin_and_start(self, meta: StreamMeta, resp: LegResponse | None, seam: Seam | SessionSeam | None, *,
                               auth: dict[str, str], cancel_on_orphan: bool) -> Ingest:
        """Begin a claimed stream in the log and start its capture. Where the log stages a begin,
        the leg is copied before the begin commits, so its first events commit with it: a commit,
        and the loop turns around it, sooner to every new stream's first event. A begin that fails
        stops the capture it started (its leg closed) and raises, as an awaited begin does."""
        # Without a leg in hand, the task opens one from what the log holds: after the begin.
        staged = self.log.begin_staged(meta) if resp is not None else None
        if staged is None:
            # No leg in hand: a background run, whose first leg the task opens (no re-join).
            return self.start(await self.log.begin(meta), resp, seam, auth=auth, cancel_on_orphan=cancel_on_orphan,
                              opening=resp is None)
        begun, committed = staged
        ing = self.start(begun, resp, seam, auth=auth, cancel_on_orphan=cancel_on_orphan)
        try:
            await committed
        except BaseException:
            self._halt(ing)
            raise
        return ing

    def start(self, meta: StreamMeta, resp: LegResponse | None, seam: Seam | SessionSeam | None, *,
              auth: dict[str, str] | None = None, cancel_on_orphan: bool = False, opening: bool = False) -> Ingest:
        """Run the ingest task of a stream this process has claimed (and begun). A cancel on
        disconnect asked of an earlier capture of it (``meta`` as the log holds it) still holds.
        ``opening``: no leg was ever open (a background run): the first one the task opens is no re-join."""
        ing = Ingest(meta=meta, auth=auth or {}, cancel_on_orphan=cancel_on_orphan or meta.cancel_on_orphan)
        self.live[meta.key] = ing
        landing: Parked | None = None
        if resp is not None:
            # A leg in hand is copied from this turn on, as ``_run`` would copy it in its first step:
            # its first events, often read with its head, go to the log a loop turn sooner (at
            # saturation a turn is tens of ms of every new stream's first event), and a stream
            # that stays open needs no task until its leg ends.
            copy = self._attach(ing, resp, seam)
            end = resp.end()
            landing = Parked(copy, end, 0, self._unpark_bound)
            if not end.done():
                self._park(ing, landing)
                return ing
            ing.parked = landing  # ended already: as _unpark, parked until the task takes it up
        ing.task = asyncio.create_task(self._run(ing, resp, seam, landing, opening), name=f"ingest:{meta.key}")
        return ing

    async def _seam(self, meta: StreamMeta, held: StreamMeta | None, last: str | None) -> Seam | SessionSeam | None:
        """How a new leg opened with ``last`` meets what is held: None when there is nothing to check."""
        if meta.kind == "session":  # the upstream replays the whole thread: everything held is known by event_id
            bodies = await self._held_bodies(meta.key, held)
            required, ended = latest_run(bodies)
            first, last = (held.trimmed_from, held.trimmed_to) if held is not None else (None, None)
            return SessionSeam({eid for body in bodies if (eid := session_event_id(body)) is not None},
                               required, after=held.head if held is not None else 0, ended=ended,
                               trimmed=(first, last) if first and last else None,
                               # no more than were trimmed: every event appended but those held
                               bound=held.count - len(bodies) if held is not None else 0,
                               newest=held.last_upstream_id if held is not None else None)
        expect = expectation(meta.kind, held)
        if last is None and expect is None:
            return None  # a first leg, live tail only: nothing to match, nothing re-sent
        recent = await self.log.tail(meta.key, DEDUPE_WINDOW) if held is not None and held.head else []
        return Seam(recent, after=held.head if held is not None else 0, expect=expect)

    async def _held_bodies(self, key: str, held: StreamMeta | None) -> list[bytes]:
        """Every event held of a stream, oldest first (a session's re-join matches the upstream's replay
        of the whole thread against them)."""
        bodies: list[bytes] = []
        pos, head = (held.first_seq - 1 if held.first_seq else 0, held.head) if held is not None else (0, 0)
        while pos < head:
            entries = await self.log.read(key, pos, head, 5000)
            if not entries:
                break
            bodies += [body for _seq, body in entries]
            pos = entries[-1][0]
        return bodies

    # --- stopping ---------------------------------------------------------------------------

    async def stop(self, ing: Ingest) -> bool:
        """Take a live ingest out of the live set, then cancel it; False if it was not live."""
        if (ing.task is None and ing.parked is None) or self.live.get(ing.key) is not ing:
            return False
        del self.live[ing.key]  # from now on a new client starts a new capture
        task = self._halt(ing)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
            self._let_go(ing)  # a cancel swallowed underneath the task may have let it park
        return True

    async def stop_all(self) -> None:
        """Stop ingest; open streams stay open in the log and are taken over (by another replica
        now, or by this gateway at its next start): their claims are released at once."""
        live = list(self.live.values())
        for ing in live:
            ing.drop_timers()
            self._let_go(ing)  # a parked one; the others have a task
        await stop_tasks([i.task for i in live if i.task is not None], "captures")
        for ing in live:
            self._let_go(ing)  # a cancel swallowed underneath a task may have let it park
        for key in [ing.key for ing in live]:  # (self.live is empty by now: _let_go took them out)
            try:
                await self.log.release(key)
            except Exception as exc:  # the lease runs out by itself
                logger.warning("could not release %s at shutdown: %s", key, exc)
        self.live.clear()

    def _claim_lost(self, key: str, how: LeaseLoss) -> None:
        self.metrics.lease_lost(how)
        ing = self.live.get(key)
        if ing is not None and (ing.task is not None or ing.parked is not None):
            logger.warning("stream %s is captured by another gateway process now; this one stops writing it", key)
            del self.live[key]
            self._halt(ing)

    async def release(self, key: str) -> None:
        """Give up the claim on a stream whose capture here ended (unless a new one began)."""
        if key in self.live or key in self._opening:
            return  # a new capture of the stream holds the claim now
        try:
            await self.log.release(key)
        except Exception as exc:  # the lease runs out by itself
            logger.warning("could not release %s: %s", key, exc)

    # --- the ingest task ----------------------------------------------------------------------

    async def _run(self, ing: Ingest, resp: LegResponse | None, seam: Seam | SessionSeam | None,
                   landing: Parked | None = None, opening: bool = False) -> None:
        """Copy legs into the log, re-joining a lost one, until the stream ends. While a leg is
        copied the task ends and the capture is parked; the leg's end runs this again with
        ``landing``, the parked state (``start`` copies a first leg in hand the same way)."""
        kind = ing.meta.kind
        failures = landing.failures if landing is not None else 0
        parked = False
        ended = False  # the stream ended here (finished, interrupted, crashed): its claim is given up
        try:
            if landing is not None:
                ing.parked = None  # taken up: from here a cancel of this task cleans up, as below
            while True:
                try:
                    if landing is not None:
                        copy, end, resp, landing = landing.copy, landing.end, landing.copy.resp, None
                    else:
                        if resp is None:
                            if await self._ended(ing.key):
                                await self._finish(ing, "done")
                                ended = True
                                return
                            # gateway_upstream_rejoins counts legs that broke (or whose process went),
                            # not a background run's first leg, opened here for want of a client's.
                            resp, seam = await self._rejoin(ing, counted=not opening)
                            opening = False
                        copy = self._attach(ing, resp, seam)
                        end = resp.end()
                        if not end.done():
                            self._park(ing, Parked(copy, end, failures, self._unpark_bound))
                            parked, resp = True, None
                            return
                    await self._landed(ing, resp, copy, end)
                    resp = None
                    if kind == "run":
                        tail = seam.close() if seam is not None else []
                        await self._finish(ing, "done", tail)
                        if tail and seam is not None and seam.gap is not None:
                            self.metrics.gap(seam.gap)  # the marker closing the stream is in the log
                        ended = True
                        return
                    # A leg that brought something new before it ended starts the re-join budget
                    # over, as one that broke after its events does: closes spread over a thread's
                    # life (deploys, proxies recycling connections) never add up to giving it up.
                    raise (_Progress if copy.submitted else UpstreamBroke)("the upstream closed the thread stream")
                except (UpstreamBroke, UpstreamRefused, aiohttp.ClientError, asyncio.TimeoutError,
                        SSEProtocolError) as exc:
                    resp = None
                    reason = _leg_failure(exc)
                    # A leg that delivered events before breaking starts the retry budget over.
                    failures = 1 if isinstance(exc, _Progress) else failures + 1
                    delay = rejoin_delay(exc, failures, self.cfg, _can_rejoin(ing.meta))
                    if delay is None:
                        logger.warning("stream %s interrupted: %s", ing.key, reason)
                        await self.interrupt(ing.meta, reason)
                        ended = True
                        return
                    logger.info("stream %s upstream leg lost (%s); re-joining (try %d)", ing.key, reason, failures)
                    await asyncio.sleep(delay)
                except StorageError as exc:
                    resp = None
                    await self._recover_storage(ing, exc)
                    failures = 0
        except asyncio.CancelledError:
            raise
        except ClaimLost:
            logger.warning("stream %s is captured by another gateway process now; this one stops writing it",
                           ing.key)
            return
        except Exception as exc:
            # A bug, not a fault of the upstream or storage: end the stream with an error event
            # rather than leave it open, or every join would re-attach it and crash again.
            logger.exception("ingest of %s crashed", ing.key)
            await self.interrupt(ing.meta, f"the gateway failed capturing it ({exc.__class__.__name__})")
            ended = True
        finally:
            if not parked:  # a parked capture goes on: its leg is open and it is live
                if resp is not None:
                    resp.close()
                if self.live.get(ing.key) is ing:
                    del self.live[ing.key]
                ing.drop_timers()
            # The claim goes with the end, on every way the stream ended here (the returns above
            # included), so another process may capture it again (a thread stream's next client
            # there), and this one renews no lease on it for the rest of its life. A capture
            # stopped from outside (a thread released, a stateless run cancelled) is released by
            # whoever stopped it, after it wrote the stream's end; one cancelled at shutdown, by
            # ``stop_all``.
            if ended:
                await self.release(ing.key)

    def _park(self, ing: Ingest, parked: Parked) -> None:
        ing.parked = parked
        ing.task = None  # ending now: a finished task would keep its coroutine as long as it is held
        parked.end.add_done_callback(parked)

    def _unpark(self, ing: Ingest, end: asyncio.Future[None]) -> None:
        """A parked capture's leg ended: its task takes over again. The capture stays parked until
        the task has begun (``_run`` takes it): a stop before that lets go of the leg itself."""
        parked = ing.parked
        if parked is None or parked.end is not end:
            return  # stopped meanwhile (_let_go)
        ing.task = asyncio.create_task(self._run(ing, parked.copy.resp, parked.copy.seam, parked), name=f"ingest:{ing.key}")

    def _halt(self, ing: Ingest) -> asyncio.Task[None] | None:
        """Stop a capture, whatever it is doing: lets go of a parked leg, cancels the task (whose
        own clean-up runs as it ends); returns the task to wait for."""
        self._let_go(ing)
        task = ing.task
        if task is not None:
            task.cancel()
        return task

    def _let_go(self, ing: Ingest) -> None:
        """Let go of a parked capture: what its task did when cancelled in the wait for the leg's
        end (the leg released and closed, the ingest no longer live)."""
        parked, ing.parked = ing.parked, None
        if parked is None:
            return
        resp = parked.copy.resp
        resp.detach()
        ing.resume = None
        resp.release()
        resp.close()
        if self.live.get(ing.key) is ing:
            del self.live[ing.key]
        ing.drop_timers()

    async def _ended(self, key: str) -> bool:
        """A run whose last event is its error event is over: there is nothing to re-join for."""
        held = await self.log.lookup(key)
        return held is not None and held.kind == "run" and held.last_event == ERROR_EVENT.decode()

    async def _rejoin(self, ing: Ingest, counted: bool = True) -> tuple[LegResponse, Seam | SessionSeam | None]:
        held = await self.log.lookup(ing.key)
        last = leg_last_event_id(ing.meta.kind, held)
        told = False
        while True:
            try:
                resp = await self.legs.open(ing.meta, last, auth=ing.auth)
                break
            except PoolFull as exc:
                # Every connection the gateway may open for streams is in use (the broken leg's own
                # went to whoever waited for one): the gateway's saturation, not a failure of the
                # upstream, so it spends none of the re-join attempts and never ends the stream.
                # The capture waits its turn in the pool, as long as it takes.
                if not told:
                    logger.warning("stream %s waits for a free upstream connection to re-join: %s", ing.key, exc)
                    told = True
            except GatewayError as exc:  # to the capture this is just a leg that did not open
                if counted:
                    self.metrics.rejoined(False)
                raise UpstreamBroke(exc.detail) from exc
        ok = is_event_stream(resp)
        if counted:
            self.metrics.rejoined(ok)
        if not ok:
            try:
                body = (await resp.content.read(512)).decode("utf-8", "replace")
            finally:
                resp.release()
            detail = f"re-join answered HTTP {resp.status}: {body.strip()[:200]}"
            if classify(resp.status) != "retry":
                raise UpstreamRefused(detail)
            raise UpstreamBroke(detail)
        try:
            return resp, await self._seam(ing.meta, held, last)
        except BaseException:
            resp.close()
            raise

    async def _recover_storage(self, ing: Ingest, exc: StorageError) -> None:
        """Storage failed under a live capture: cut its clients, wait, then capture again."""
        logger.error("stream %s: the event log failed (%s); clients cut, capture resumes when storage does",
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
                    logger.warning("stream %s: storage not ready to resume (%s)", ing.key, again)
                    await asyncio.sleep(1.0)
        finally:
            ing.recovering = False
        ing.failed = None
        logger.info("stream %s: storage is back; re-joining the upstream", ing.key)
        self.on_recovered(ing)

    def _attach(self, ing: Ingest, resp: LegResponse, seam: Seam | SessionSeam | None) -> _Copy:
        """Start copying one upstream leg into the log: from here each read is parsed and submitted
        as it arrives (``_Copy``), and commits are pipelined, each chunk's events published by the
        commit callback (in order) while the next chunk is already parsed."""
        copy = _Copy(self.log, ing, Parser(self.cfg.max_event_bytes), seam, resp, self._count_gap)
        resp.attach(decoded(resp.headers.get("Content-Encoding", ""), copy))
        return copy

    async def _landed(self, ing: Ingest, resp: LegResponse, copy: _Copy, end: asyncio.Future[None]) -> None:
        """The end of a leg being copied (``end``): returns once it ended cleanly and every commit
        of it settled; raises what broke it otherwise, after settling what it delivered."""
        try:
            try:
                await end
            finally:
                resp.detach()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Whatever broke the leg, what it delivered is settled first, so the next leg
            # starts from what is really committed.
            await _settle(ing)
            if ing.failed is not None:
                raise StorageError(str(ing.failed)) from exc
            if copy.submitted and isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)):
                raise _Progress(exc) from exc
            raise
        finally:
            ing.resume = None  # the leg is released: nothing to resume
            resp.release()
        await _settle(ing)  # everything of this leg is committed before the stream may end
        if ing.failed is not None:
            raise StorageError(str(ing.failed))
        if copy.parser.pending():
            raise _Progress("upstream stream ended mid-event") if copy.submitted else UpstreamBroke(
                "upstream stream ended mid-event")

    # --- ending -------------------------------------------------------------------------------

    async def _finish(self, ing: Ingest, end: EndReason, events: list[Event] | None = None) -> None:
        await self.log.finish(ing.key, end, events or [])  # its followers get the end from the log

    async def interrupt(self, meta: StreamMeta, reason: str) -> bool:
        """End a stream with CaptureInterrupted: its upstream is lost for good. True when the end
        is in the log (False: it stays open for the next try, or another process ends it)."""
        try:
            end = session_interrupted_event(reason) if meta.kind == "session" else interrupted_event(reason)
            await self.log.finish(meta.key, "interrupted", [end])
            # Counted once the end is in the log: an end storage refused is tried again (by the next
            # capture of the stream), and a stream another process ends is its to count.
            self.metrics.interrupted()
            return True
        except StorageError as exc:
            logger.error("stream %s: could not record its interruption (%s); it stays open for the next start",
                         meta.key, exc)
            self.log.cut(meta.key)
        except ClaimLost:
            logger.warning("stream %s is captured by another gateway process now; it ends it, not this one",
                           meta.key)
        return False


def _asking(meta: StreamMeta, cancel_on_orphan: bool) -> StreamMeta:
    """The stream as begun in the log: a cancel on disconnect its client asked for is written with it,
    so that whoever captures it next (this process after a restart, another replica) still honours it."""
    return replace(meta, cancel_on_orphan=True) if cancel_on_orphan else meta


def _can_rejoin(meta: StreamMeta) -> bool:
    # A stateless run has no join path upstream.
    return meta.endless or meta.thread_id is not None


def _count_marker(on_gap: Callable[[GapReason], None], reason: GapReason, committed: Settled,
                  outcome: list[Entry] | BaseException) -> None:
    """A batch that carries a gap marker settled: the marker is counted if the log holds it now."""
    if not isinstance(outcome, BaseException):
        on_gap(reason)
    committed(outcome)


async def _settle(ing: Ingest) -> None:
    """Wait until every commit the capture submitted has settled, without raising: their outcomes
    reach the ingest (``Ingest.__call__``)."""
    if ing.inflight > 0:
        if ing.idle is None or ing.idle.done():
            ing.idle = asyncio.get_running_loop().create_future()
        await asyncio.wait([ing.idle])


def _leg_failure(exc: object) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "upstream read timed out"
    return describe(exc) if isinstance(exc, BaseException) else str(exc)
