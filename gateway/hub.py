"""The stream hub: the one place that decides, for a client and a stream, whether the stream is
held (follow it from the log), to be captured (open an upstream leg), captured by another process
(follow what it commits), or left open by nobody (take it over), for every kind of stream.

The parts it puts together: ``gateway.capture`` (the ingest task of each stream this process
captures), ``gateway.presence`` (who follows what, and what a stream nobody follows becomes),
``gateway.takeover`` (open streams nobody captures). It is also the ``Source`` followers read
through (``gateway.follower``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, TypeVar

from multidict import CIMultiDict

from gateway.agentapi import Cursor
from gateway.capture import CapturedElsewhere, Captures, Ingest
from gateway.config import Streams
from gateway.errors import GatewayError, StreamBusy
from gateway.eventlog import EventLog, StreamMeta
from gateway.eventlog.base import Feed
from gateway.follower import Follower
from gateway.legs import Legs
from gateway.metrics import Metrics, NoMetrics
from gateway.presence import Presence, UpstreamCanceller
from gateway.rejoin import held_from_start
from gateway.replay import Page, ReplayPages
from gateway.streamclient import LegResponse
from gateway.takeover import TakeOver
from gateway.upstream import Answer, UpstreamError

logger = logging.getLogger("gateway.hub")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Leg:
    """What a leg opened on a client's behalf carries: its forwarded headers and query string."""

    headers: CIMultiDict[str]
    query: str = ""


@dataclass(frozen=True, slots=True)
class Join:
    """A client asking to follow a stream."""

    meta: StreamMeta  # the stream as a capture would begin it (keys, path, the captor's identity)
    cursor: Cursor
    auth: dict[str, str]  # the client's credentials, for the capture's re-joins and cancels
    leg: Leg | None  # how to open a leg for this client; None: never from here (a stateless run)
    cancel_on_orphan: bool = False
    wait: float = 5.0  # how long another process that claimed the stream may take to begin it


# Where the client starts in a held stream (None: the live tail); raises to refuse it (422, or
# the upstream's own refusal).
Resume = Callable[[StreamMeta], Awaitable[int | None]]
# Before a leg is opened for a client: the upstream's answer to give it instead (a run it does
# not know), or None; raises when the log cannot take a new capture.
Prepare = Callable[[], Awaitable[Answer | None]]


class _OpenLock(asyncio.Lock):
    """The lock under which a stream's leg is opened for its first clients, with how its opens failed:
    the clients that waited for an open that failed get its failure, not one more try each in turn
    (the k-th would wait k pool timeouts, or k read timeouts of an upstream that does not answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0  # opens that failed so far
        # The last one's failure: its type and words, not the exception (its traceback holds the frame
        # that holds this lock, a cycle that would keep both until a collection).
        self._failure: tuple[type[UpstreamError], str, dict[str, str]] | None = None

    def fail(self, exc: UpstreamError) -> None:
        self.failed += 1
        self._failure = (type(exc), exc.detail, exc.headers)

    def failed_since(self, seen: int) -> UpstreamError | None:
        """The failure of an open that failed after ``seen`` failures, anew (None: none did)."""
        if self._failure is None or self.failed <= seen:
            return None
        kind, detail, headers = self._failure
        return kind(detail, headers=headers)


@dataclass(slots=True)
class Attachment:
    """What ``Hub.attach`` decided."""

    follower: Follower | None = None  # follow this; None: see ``answer``, or nothing is held
    held: StreamMeta | None = None  # the stream was held when the client came
    leg: LegResponse | None = None  # a leg opened for this client (its headers are the client's)
    answer: Answer | None = None  # the upstream's own answer, to relay as is


class Hub:
    """Captures upstream streams into the log, and is the ``Source`` its followers read through."""

    def __init__(self, log: EventLog, cfg: Streams, legs: Legs, cancel_upstream: UpstreamCanceller,
                 metrics: Metrics | None = None) -> None:
        self.log = log
        self.cfg = cfg
        self.metrics: Metrics = metrics or NoMetrics()
        self.heartbeat = cfg.heartbeat
        self.cancel_upstream = cancel_upstream
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self.captures = Captures(log, cfg, legs, self.metrics)
        self.presence = Presence(log, cfg, self.captures, cancel_upstream, self.run_owned)
        self.takeover = TakeOver(log, self.captures, self.presence, self.metrics)
        self.replay = ReplayPages(log.read, cfg.replay_cache_bytes, self.metrics.replayed)
        self._capture_locks: weakref.WeakValueDictionary[str, _OpenLock] = weakref.WeakValueDictionary()
        self._overflowed = partial(self.metrics.overflowed, 1)  # one for every feed, not one each

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.takeover.start()

    @property
    def closing(self) -> bool:
        return self.presence.closing

    def end_clients(self) -> None:
        """Cut every client stream at an event boundary (shutdown: clients resume elsewhere)."""
        self.presence.closing = True
        for f in list(self.presence.followers):
            f.shutdown()

    async def stop(self) -> None:
        """Stop ingest; open streams stay open in the log and are taken over (by another replica
        now, or by this gateway at its next start)."""
        self.end_clients()
        await self.takeover.stop()
        side = list(self._side_tasks)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await self.captures.stop_all()

    def run_owned(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run work that must finish even if the request that started it is cancelled.

        The hub owns the task: it is cancelled at shutdown and its failure is logged.
        """
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)
        return task

    async def hand_over(self, work: Awaitable[T], unclaimed: Callable[[T], None]) -> T:
        """``work``'s outcome, the work owned by the hub (``run_owned``): a request that started it
        and is cancelled meanwhile (its client hung up) stops waiting, not the work; what the work
        made for it then goes to ``unclaimed``.

        The request waits on a future the work resolves itself: ``asyncio.shield`` of the task woke
        the request two loop turns after the work ended (the task's callback, then the shield's),
        and on a saturated loop each turn is tens of ms of a new stream's time to its first event."""
        claimed: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.run_owned(_deliver(work, claimed, unclaimed))
        return await claimed

    def _side_done(self, task: asyncio.Future[Any]) -> None:
        self._side_tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, GatewayError):  # an answer (a 502, a 503 ...): its client got it, or hung up
            logger.info("hub background task ended with %d: %s", exc.status, exc)
        else:
            logger.error("hub background task failed", exc_info=exc)

    # --- what is captured here ---------------------------------------------------------------------

    def live(self, key: str) -> Ingest | None:
        return self.captures.live.get(key)

    def live_count(self) -> int:
        return len(self.captures.live)

    def following(self, key: str) -> int:
        """Followers of ``key`` in this process."""
        return self.presence.following(key)

    @property
    def followers(self) -> set[Follower]:
        return self.presence.followers

    # --- clients: a new run, or a join ----------------------------------------------------------------

    async def capture(self, meta: StreamMeta, resp: LegResponse | None, *,
                      auth: dict[str, str], cancel_on_orphan: bool = False) -> None:
        """Capture a run just created upstream: its first leg ``resp`` (the client's own request), or
        None to open one (a background run). Another process capturing it already is fine: its
        clients follow what that one commits. Raises when the log refuses (``resp`` is closed)."""
        if self.live(meta.key) is not None:
            return
        try:
            await self.captures.begin(meta, resp, auth=auth, cancel_on_orphan=cancel_on_orphan)
        except CapturedElsewhere:
            pass

    async def attach(self, join: Join, resume: Resume, prepare: Prepare) -> Attachment:
        """A client joins a stream: held, to capture, captured elsewhere, or left open by nobody.

        One decision for every kind of stream: a held run, or a held stream captured here, is
        followed from where ``resume`` says (a run left open by nobody is taken over first); a
        thread stream held but not captured here, or a stream not held that the client may open
        (``join.leg``), is captured through a leg opened for it, after ``prepare``, under the
        stream's lock so two clients arriving together share one capture; one another process
        claims meanwhile is followed once that process has begun it, and asked for here again if
        that process let it go unbegun (the upstream refused its leg).
        """
        key = join.meta.key
        held = await self.log.lookup(key)
        if held is not None and self._followable(held):  # most joins: no lock, so a reconnect storm never queues
            return Attachment(await self._join(held, await resume(held), join), held=held)
        lock = self._lock(key)
        seen = lock.failed
        async with lock:
            held = await self.log.lookup(key)  # again: a capture may have begun while this one waited
            after: int | None = 0
            if held is not None:
                after = await resume(held)
                if self._followable(held):
                    return Attachment(await self._join(held, after, join), held=held)
            if join.leg is None:
                return Attachment(held=held)
            if (failure := lock.failed_since(seen)) is not None:
                raise failure  # the open this client waited for failed: so does its own, at once
            if (answer := await prepare()) is not None:
                return Attachment(held=held, answer=answer)
            deadline = asyncio.get_running_loop().time() + join.wait
            while True:
                try:
                    opened = await self.captures.open(join.meta, join.cursor, join.leg.headers, join.leg.query,
                                                      auth=join.auth, cancel_on_orphan=join.cancel_on_orphan)
                    break
                except UpstreamError as exc:
                    lock.fail(exc)
                    raise
                except CapturedElsewhere:  # a client of another replica asked for it at the same moment
                    if (begun := await self.log.lookup(key)) is not None:  # begun there: follow what it commits
                        # As any join of a held stream: a cancel on disconnect this client asked for is
                        # noted for its captor (and sent from here if its last follower is here).
                        return Attachment(await self._join(begun, after, join), held=held)
                    # Not begun yet, or never: the upstream refused that replica's leg (its answer went to
                    # its client) and the claim was let go. Asked again, the upstream answers this one.
                    if asyncio.get_running_loop().time() > deadline:
                        raise StreamBusy(f"stream {key} is being opened by another gateway process; "
                                         "try again") from None
                    await asyncio.sleep(0.05)
            if isinstance(opened, LegResponse):
                return Attachment(held=held, answer=opened)
            return Attachment(self.follow(key, after), held=held, leg=opened[1])

    async def start_held(self, held: StreamMeta) -> bool:
        """Whether the log holds ``held`` from its start (``rejoin.held_from_start``), reading its first
        event only when that decides it."""
        if not held.begun_partway or held.kind != "run" or not held.head:
            return held_from_start(held, None)
        first = await self.log.read(held.key, 0, held.head, 1)
        return held_from_start(held, first[0][1] if first else None)

    def _followable(self, held: StreamMeta) -> bool:
        """A held stream a client follows as it is: a run (captured by whoever captures it, or taken
        over), or a stream this process captures. A thread stream released (or captured elsewhere)
        is opened again through a leg, from where the client is."""
        return held.kind == "run" or self.live(held.key) is not None

    async def _join(self, held: StreamMeta, after: int | None, join: Join) -> Follower:
        """Follow a stream the log holds. A run that is open but captured by nobody (its ingest
        crashed, its process died) is taken over first: a follower never waits on a stream nobody writes."""
        key = held.key
        if (held.open and held.kind == "run" and self.live(key) is None and not self.closing
                and await self.log.claim(key) and self.live(key) is None):
            logger.info("stream %s is open but nobody captures it; re-attaching", key)
            await self.takeover.adopt(held)
        elsewhere = join.cancel_on_orphan and held.kind == "run" and held.open and (
            await self.presence.cancel_when_orphaned(held))
        follower = self.follow(key, after)
        if elsewhere:
            self.presence.asked(key, join.auth)
        return follower

    def _lock(self, key: str) -> _OpenLock:
        lock = self._capture_locks.get(key)
        if lock is None:
            lock = self._capture_locks[key] = _OpenLock()
        return lock

    # --- followers: the Source they read through ------------------------------------------------

    def follow(self, key: str, after: int | None) -> Follower:
        """A follower of ``key`` from ``after`` (None: the live tail), registered at once."""
        return Follower(self, key, after)

    async def ready(self, feed: Feed) -> None:
        await self.log.ready(feed)

    async def lookup(self, key: str) -> StreamMeta | None:
        return await self.log.lookup(key)

    async def page(self, key: str, after: int, upto: int, limit: int) -> Page:
        return await self.replay.page(key, after, upto, limit)

    def subscribe(self, key: str) -> Feed:
        return self.log.subscribe(key, self.cfg.subscriber_buffer, self.cfg.subscriber_buffer_bytes, self._overflowed)

    def joined(self, follower: Follower) -> None:
        self.presence.joined(follower)

    def left(self, follower: Follower) -> None:
        self.presence.left(follower)


async def _deliver(work: Awaitable[T], claimed: asyncio.Future[T], unclaimed: Callable[[T], None]) -> None:
    """``Hub.hand_over``'s task: the outcome to the request still waiting for it, else to ``unclaimed``;
    a failure nobody waits for is raised, for the hub to log."""
    try:
        outcome = await work
    except asyncio.CancelledError:
        claimed.cancel()
        raise
    except Exception as exc:
        if claimed.cancelled():
            raise
        claimed.set_exception(exc)
        return
    if claimed.cancelled():
        unclaimed(outcome)
    else:
        claimed.set_result(outcome)
