"""The event log contract: what the hub needs from durable storage, and nothing of HTTP.

LMDB (``gateway.eventlog.lmdb``) is the embedded default. A shared log on a
distributed engine (Redis Streams) implements the same interface so several
gateway replicas serve each other's resumes; ``tests/test_eventlog.py`` is the
contract suite every backend passes.

Positions ("seq") are integers from one counter for the whole log, so they
strictly increase within every stream, are never reused (not even after a
stream is evicted and captured again), and can be sent to clients as SSE ids.
A new log starts its counter at the current time in microseconds, so it stays
above every id an earlier log (one moved aside, or lost) could have handed out.

Metadata is handed out as immutable snapshots of what is committed: a snapshot
never counts an event that a failed commit did not store.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any, Awaitable, Callable, Iterable, Iterator, Literal, Protocol, Sequence

import orjson

from gateway import native
from gateway.metrics import LeaseLoss
from gateway.sse import Event

# (seq, body): a committed event as the hub and the handlers see it.
Entry = tuple[int, bytes]
# A read (``EventLog.read``) stops after about this many bytes of events unless asked for fewer: a
# page is up to 2,000 events, and of large state snapshots that would be gigabytes for one reader.
READ_PAGE_BYTES = 4 << 20

# Streams one page of ``EventLog.list_streams`` looks at, at most.
LIST_SCAN = 10_000

# Called after each commit group: (events, seconds, ok). The metrics hook.
CommitObserver = Callable[[int, float, bool], None]
# Told how a submitted batch settled: its entries once committed, or why it was not.
Settled = Callable[[list[Entry] | BaseException], None]

# A run's stream ends with the run; a thread stream (runs of a thread, one after another) and a
# session stream (the v3 thread session's events) never end: released when nobody follows them,
# trimmed by retention while open.
StreamKind = Literal["run", "thread", "session"]
STREAM_KINDS: tuple[StreamKind, ...] = ("run", "thread", "session")
EndReason = Literal["done", "interrupted"]


class StorageError(RuntimeError):
    """The log could not commit or read."""


class StorageFull(StorageError):
    """The disk budget is spent and nothing finished is left to evict."""


class StorageDamaged(StorageError):
    """What is on disk is not what the gateway wrote (a truncated file, a corrupted record)."""


class ClaimLost(Exception):
    """Another gateway process captures this stream now (this one stalled past its lease): stop
    writing it. Its followers here go on reading what the new owner commits."""


def seq_floor() -> int:
    """Where a brand-new log starts counting: above any id an older log handed out.

    An older log started at its own creation time in microseconds and handed out
    one id per event, so it stays below this unless it averaged more than a
    million events per second over its whole life.
    """
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """Everything the gateway knows about one captured stream, as committed with its events."""

    key: str
    kind: StreamKind
    upstream: str
    path: str  # upstream path that re-joins this stream with GET
    thread_id: str | None = None
    run_id: str | None = None
    # The gateway asked the upstream to keep a replay buffer for it (stream_resumable).
    resumable: bool = False
    open: bool = True  # an ingest is (or should be) attached
    end: EndReason | None = None  # None while open, and for thread streams
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    head: int = 0  # seq of the last event, 0 when empty
    count: int = 0
    size: int = 0  # bytes held in the log
    last_upstream_id: str | None = None
    last_event: str | None = None  # the SSE event name of the last event ("error" ends a run)
    # Lowest seq still held when retention trimmed the start of an open stream (0: nothing trimmed).
    first_seq: int = 0
    # A session's upstream replays the whole thread on every connection, retention's trimmed part
    # too: the upstream ids of the first and the last upstream event trimmed (``trim_marks``), by
    # which a re-join tells the replay of what was trimmed from new events (gateway.sessions).
    trimmed_from: str | None = None
    trimmed_to: str | None = None
    # The log's last seq when this capture began: every id of this capture is above it, so a
    # client id at or below it belongs to an earlier capture of the same run or thread.
    base: int = 0
    # Redis lost events of this stream it had acknowledged (it came back from an older snapshot):
    # its head then was this. Ids above it, up to ``base``, may have been sent to clients for events
    # the log no longer holds (and the counter handed out again): they are not held (``lost``).
    lost_after: int = 0
    # The ids held up to ``lost_after`` are those above this one (0: all of them): the events this
    # capture appended from its ``base`` of then. Below it, as above ``lost_after``, ids up to ``base``
    # are not held (an earlier capture's, or ones Redis lost).
    held_after: int = 0
    # A client asked for the run to be cancelled once nobody follows it (cancel_on_disconnect),
    # wherever it joined: the capturing process reads it here.
    cancel_on_orphan: bool = False
    # The capture began with a client's join, not from the stream's start (gateway.rejoin's
    # begins_partway): what came before (a run's first events, a thread's earlier runs) may not be held.
    begun_partway: bool = False
    # Salted hash of the credentials that started the capture (gateway.access); never the secret.
    auth_salt: str | None = None
    auth_digest: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson reads dataclasses natively: ten times asdict's speed

    @classmethod
    def from_bytes(cls, raw: bytes) -> StreamMeta:
        """Decode a stored record; anything malformed is StorageDamaged, never a stray TypeError."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StorageDamaged(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise StorageDamaged("not a JSON object")
        known: dict[str, Any] = {k: v for k, v in data.items() if k in _FIELDS}
        missing = {"key", "kind", "upstream", "path"} - known.keys()
        if missing:
            raise StorageDamaged(f"missing {', '.join(sorted(missing))}")
        meta = cls(**known)
        if meta.kind not in STREAM_KINDS or not isinstance(meta.head, int) or not isinstance(meta.key, str):
            raise StorageDamaged(f"bad field values in {meta.key!r}")
        return meta

    @property
    def finished(self) -> bool:
        return self.end is not None

    def lost(self, seq: int) -> bool:
        """Whether a client's id ``seq`` is one none of the held events follow: from an earlier
        capture (at or below ``base``), or one of the events a Redis rollback lost."""
        return seq <= self.base and not self.held_after < seq <= self.lost_after

    @property
    def endless(self) -> bool:
        """A stream that never ends by itself (thread, session): it lingers, is released, is trimmed."""
        return self.kind != "run"

    def advanced(self, head: int, count: int, size: int, last_upstream_id: str | None, last_event: str,
                 now: float) -> StreamMeta:
        """This snapshot after appending events (``replace`` with these six fields), on every chunk.

        Declared here for its signature; the class runs straight-line code generated from its
        fields at import (``_unrolled_advanced``): a quarter of ``replace``'s cost."""
        raise NotImplementedError("replaced at import by _unrolled_advanced")


def trim_marks(meta: StreamMeta, uids: Iterable[str | None]) -> StreamMeta:
    """``meta`` after retention trimmed events with these upstream ids (oldest first) from its start:
    the first and last upstream id of the trimmed run of upstream events (``trimmed_from``,
    ``trimmed_to``). One of the gateway's own events (no id: a gap marker, an upstream that may
    have started over) begins that run anew; one trimmed last leaves none."""
    first, last = meta.trimmed_from, meta.trimmed_to
    for uid in uids:
        if uid is None:
            first = last = None
        else:
            first, last = first or uid, uid
    return meta if (first, last) == (meta.trimmed_from, meta.trimmed_to) else \
        replace(meta, trimmed_from=first, trimmed_to=last)


_FIELDS = frozenset(f.name for f in fields(StreamMeta))
_SLOTS = tuple(f.name for f in fields(StreamMeta))


def _unrolled_advanced() -> Callable[..., StreamMeta]:
    """``StreamMeta.advanced`` as straight-line code: one slot store per field, no loop, no
    getattr by name. It runs once per chunk of every captured stream (once per token): 1.0 us
    against 3.7 for a loop over the fields with getattr and object.__setattr__ (21 fields). It is
    built from the dataclass's own fields, so a new field is copied without anyone remembering to
    (with the C extension, ``native.clone`` copies them all)."""
    moved = {"head": "head", "count": "count", "size": "size", "last_upstream_id": "last_upstream_id",
             "last_event": "last_event", "updated_at": "now"}
    env: dict[str, Any] = {"_new": object.__new__, "_cls": StreamMeta, "_clone": native.clone}
    lines = ["def advanced(self, head, count, size, last_upstream_id, last_event, now):"]
    # In C, the copy of every slot is one call and only the six that move are set here: ~3x cheaper.
    copied = native.ON and native.clone(StreamMeta("k", "run", "u", "/")) is not None
    lines.append("    new = _clone(self)" if copied else "    new = _new(_cls)")
    for name in _SLOTS:
        if copied and name not in moved:
            continue
        env[f"_set_{name}"] = getattr(StreamMeta, name).__set__  # the slot's own descriptor
        lines.append(f"    _set_{name}(new, {moved.get(name, 'self.' + name)})")
    lines.append("    return new")
    exec("\n".join(lines), env)  # noqa: S102 - code built here from field names, nothing external
    fn: Callable[..., StreamMeta] = env["advanced"]
    fn.__doc__ = StreamMeta.advanced.__doc__
    return fn


setattr(StreamMeta, "advanced", _unrolled_advanced())


FeedKind = Literal["events", "end", "beat", "cut"]


# Not frozen: made once per committed chunk, and a frozen dataclass's __init__ (a call of
# object.__setattr__ per field) cost several times a plain one. Every follower of the stream shares
# the one Batch: nothing changes it once made.
@dataclass(slots=True, eq=False)
class Batch:
    """What a stream's live feed carries: committed events, or a notice about the stream.

    ``prev`` is the stream's head before ``entries``: a follower whose position is
    below it has missed something (a dropped message) and catches up from the log.
    """

    kind: FeedKind
    entries: list[Entry] = field(default_factory=list)
    prev: int = 0
    nbytes: int = 0


BEAT = Batch("beat")  # the upstream sent a heartbeat: pass it on (this process's followers only)
CUT = Batch("cut")  # the capture failed here: cut this process's followers, they resume elsewhere or later


class Feed:
    """One follower's bounded subscription to a stream's live batches, wherever they were committed.

    Bounded by batches' events and bytes: a follower that falls behind is never waited
    for; its feed overflows, and it catches up from the log instead. Kept small, since an
    idle client holds one for hours: no queue while nothing is queued, one future while
    its follower waits, and no timer of its own (``LocalFeeds`` ticks for all of them).
    """

    __slots__ = ("key", "queue", "queued", "queued_bytes", "limit", "byte_limit", "overflowed", "_owner",
                 "_on_overflow", "_waiter", "_active", "_idle", "express")

    def __init__(self, key: str, limit: int, byte_limit: int, owner: LocalFeeds,
                 on_overflow: Callable[[], None] | None = None) -> None:
        self.key = key
        self.queue: deque[Batch] | None = None
        self.queued = 0
        self.queued_bytes = 0
        self.limit = limit
        self.byte_limit = byte_limit
        self.overflowed = False
        self._owner = owner
        self._on_overflow = on_overflow
        self._waiter: asyncio.Future[None] | None = None
        self._active = False  # the current wait began after the idle ticker last looked
        self._idle = False  # the idle ticker woke the follower
        # Set by a follower caught up with the live tail: takes a batch of events straight from the
        # commit (written to its client there and then) and says True, or False to have it queued.
        self.express: Callable[[Batch], bool] | None = None

    def push(self, batch: Batch) -> bool:
        """Queue a batch; False when the follower is too far behind (the queue is dropped)."""
        if self.overflowed:
            return False
        waiter = self._waiter
        if (self.express is not None and self.queue is None and waiter is not None and not waiter.done()
                and batch.kind == "events" and self.express(batch)):
            # Its follower waits with nothing queued and took the batch itself: no queue, no wake-up
            # of its task (one task step and a future per event on a token stream, for nothing).
            self._active = True  # the client got bytes: not idle
            return True
        n = len(batch.entries)
        if self.queued + n > self.limit or self.queued_bytes + batch.nbytes > self.byte_limit:
            self.drop()
            if self._on_overflow is not None:
                self._on_overflow()
            return False
        if self.queue is None:
            self.queue = deque()
        self.queue.append(batch)
        self.queued += n
        self.queued_bytes += batch.nbytes
        self.wake()
        return True

    def drop(self) -> None:
        """Forget what is queued: the follower catches up from the log instead."""
        self.overflowed = True
        self.queue = None
        self.queued = self.queued_bytes = 0
        self.wake()

    def take(self) -> Batch | None:
        if not self.queue:
            return None
        batch = self.queue.popleft()
        if not self.queue:
            self.queue = None
        self.queued -= len(batch.entries)
        self.queued_bytes -= batch.nbytes
        return batch

    def wake(self) -> None:
        """Let a waiting follower look (a batch came, the gateway stops, it fell behind)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, idle: float) -> bool:
        """Until something can be taken (or the feed overflowed); False once nothing came for
        between half of ``idle`` and ``idle`` seconds (``LocalFeeds`` ticks every half ``idle``,
        and a wait is idle from the second tick on), never later: ``idle`` is the longest a
        client may go without a byte (set below a load balancer's idle timeout)."""
        waiter = self.waiting(idle)
        if waiter is None:
            return True
        try:
            await waiter
        except BaseException:
            self._waiter = None  # cancelled: nobody waits on this feed now
            raise
        return self.woke()

    def waiting(self, idle: float) -> asyncio.Future[None] | None:
        """``wait`` in two steps, for a caller that waits for hours and keeps no coroutine for it:
        the future to wait on (None: something can be taken now), then ``woke``."""
        if self.queue or self.overflowed:
            return None
        self._owner.tick_every(idle)
        self._active = True  # the first tick of a wait only starts its idle time
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter

    def woke(self) -> bool:
        """After the future of ``waiting`` is done: False when the wait ended idle."""
        self._waiter = None
        if self._idle and not self.queue and not self.overflowed:
            self._idle = False
            return False
        return True

    def tick(self) -> None:
        """The idle ticker: wake a follower that has waited a whole tick with nothing coming."""
        if self._waiter is None:
            return  # busy writing to its client, not idle
        if self._active:
            self._active = False
            return
        self._idle = True
        self.wake()

    def restart(self) -> None:
        """After an overflow: the follower caught up from the log; queue from here on again."""
        self.overflowed = False

    def close(self) -> None:
        self._waiter = None  # a wait of ``waiting`` cut short: the feed is done with either way
        self._owner.unlink(self)


class LocalFeeds:
    """The feeds of this process's followers, by stream: what every backend delivers to.

    One timer ticks for all of them (a timer per feed cost more than the feed), every half
    ``idle`` while anyone waits, so an idle client gets its heartbeat within ``idle``.
    """

    def __init__(self) -> None:
        # A stream's one follower is held as itself, its second makes a set: most streams have one
        # follower for hours, and a set of one is 216 bytes of an idle stream's budget.
        self._feeds: dict[str, Feed | set[Feed]] = {}
        self._ticker: asyncio.TimerHandle | None = None

    def subscribe(self, key: str, limit: int, byte_limit: int, on_overflow: Callable[[], None] | None = None) -> Feed:
        feed = Feed(key, limit, byte_limit, self, on_overflow)
        held = self._feeds.get(key)
        if held is None:
            self._feeds[key] = feed
        elif isinstance(held, Feed):
            self._feeds[key] = {held, feed}
        else:
            held.add(feed)
        return feed

    def unlink(self, feed: Feed) -> None:
        held = self._feeds.get(feed.key)
        if held is feed:
            del self._feeds[feed.key]
        elif isinstance(held, set):
            held.discard(feed)
            if len(held) == 1:
                self._feeds[feed.key] = next(iter(held))

    def _of(self, key: str) -> tuple[Feed, ...] | set[Feed]:
        held = self._feeds.get(key)
        return () if held is None else (held,) if isinstance(held, Feed) else held

    def tick_every(self, idle: float) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(idle / 2, self._tick, idle)

    def _tick(self, idle: float) -> None:
        self._ticker = None
        for key in list(self._feeds):
            for feed in list(self._of(key)):
                feed.tick()
        if self._feeds:
            self.tick_every(idle)

    def stop(self) -> None:
        """The log closes: no more ticks."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def deliver(self, key: str, batch: Batch) -> int:
        """Hand a batch to every local follower of ``key``; returns how many overflowed."""
        held = self._feeds.get(key)
        if held is None:
            return 0
        if isinstance(held, Feed):  # the common case, once per committed chunk: no loop
            return 0 if held.push(batch) else 1
        overflowed = 0
        for feed in held:  # a loop, not sum() over a generator: this runs per committed chunk
            if not feed.push(batch):
                overflowed += 1
        return overflowed

    def following(self, key: str) -> bool:
        return key in self._feeds

    def resync(self, key: str) -> None:
        """Batches of ``key`` may have been lost on the way: every follower catches up from the log."""
        for f in list(self._of(key)):
            f.drop()

    def resync_all(self) -> None:
        """Batches of any stream may have been lost on the way: every follower catches up."""
        for key in list(self._feeds):
            self.resync(key)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], what: str, attempts: int = 20) -> None:
    """Cancel background tasks and wait until they have ended, cancelling again any that went on.

    A task's cancellation can be swallowed underneath it: redis-py catches CancelledError in some
    of its connection clean-up paths, and a loop around such a call then simply goes round and
    waits again, so a single cancel() left shutdown waiting for ever (seen once in CI: a Redis
    log's presence loop back in its wait after the cancel). Each round waits at most a second."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(attempts):
        if not pending:
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for t in pending:
        logging.getLogger("gateway.eventlog").error("%s: task %s would not stop; left behind", what, t.get_name())


class Health:
    """Whether commits succeed right now, and why not: one state, whatever the backend."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._healthy = asyncio.Event()
        self._healthy.set()

    def fail(self, reason: str) -> bool:
        """Commits fail; True when they did not already (the moment to log it, and to start probing)."""
        first = self.failure is None
        self.failure = reason
        self._healthy.clear()
        return first

    def recovered(self) -> bool:
        """Commits succeed again; True when they had been failing."""
        if self.failure is None:
            return False
        self.failure = None
        self._healthy.set()
        return True

    async def wait(self) -> None:
        await self._healthy.wait()


# A log at its budget evicts down to this share of it. Evicting only to just under the budget, a
# log that stays there (the budget, not the TTL, is what binds) evicted one stream at each new
# capture, each time sorting every stream it holds on the loop: at 50,000 streams 3 ms a begin
# (embedded), 410 ms (shared, which reads them from the file). bench/budget_begin.py measures it.
EVICT_DOWN_TO = 0.95


def to_evict(metas: Iterable[StreamMeta], size: int, budget: int, cutoff: float,
             exclude: str | None = None) -> list[StreamMeta]:
    """Retention, one rule for every backend: the closed streams to remove whole, oldest first:
    every one last updated before ``cutoff`` (the TTL), then, when ``size`` is at ``budget`` or
    over it, more until it is under ``EVICT_DOWN_TO`` of it. Open streams never (``exclude``: the
    stream being begun, never evicted to make room for itself)."""
    out: list[StreamMeta] = []
    goal = budget if size < budget else int(budget * EVICT_DOWN_TO)
    for m in sorted((m for m in metas if not m.open and m.key != exclude), key=lambda m: m.updated_at):
        if m.updated_at >= cutoff and size < goal:
            break
        out.append(m)
        size -= m.size
    return out


def accepting(failure: str | None, size: int, budget: int, evictable: bool) -> bool:
    """Whether a new capture may begin: storage healthy, and under budget or able to get under it
    by evicting something finished."""
    return failure is None and (size < budget or evictable)


class EventLog(abc.ABC):
    """Append-only, per-stream event log with group commit and retention."""

    health: Health

    @property
    def failure(self) -> str | None:
        """Why commits are failing right now (a full disk, an I/O error), or None when healthy."""
        return self.health.failure

    async def wait_healthy(self) -> None:
        """Return once commits succeed again (at once when healthy)."""
        await self.health.wait()

    @abc.abstractmethod
    async def open(self) -> None:
        """Open storage and load stream metadata (streams left open by a crash stay open).

        Raises StorageDamaged, naming the file and the problem, when what is on disk
        cannot be trusted; never starts over silently.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit what is queued and release storage."""

    @abc.abstractmethod
    async def lookup(self, key: str) -> StreamMeta | None:
        """The committed snapshot of a stream held in the log, or None."""

    @abc.abstractmethod
    async def streams(self) -> list[StreamMeta]:
        """Every stream held in the log."""

    @abc.abstractmethod
    async def list_streams(self, after: str, limit: int, keep: Callable[[StreamMeta], bool],
                           scan: int = LIST_SCAN) -> tuple[list[StreamMeta], str | None]:
        """A page of the streams held, in key order: those after ``after`` that ``keep`` accepts, at
        most ``limit``, and the key the next page starts after (None: nothing follows).

        Looks at ``scan`` streams at most, so a page costs the same with a million streams held
        (a selective ``keep`` may then return fewer, with a key to go on from).
        """

    # --- the live feed: committed batches of a stream, for followers in this process -------------

    @abc.abstractmethod
    def subscribe(self, key: str, limit: int, byte_limit: int, on_overflow: Callable[[], None] | None = None) -> Feed:
        """Start receiving ``key``'s batches as they are committed, by whichever writer.

        Register before reading the durable head: what commits in between is queued,
        and the follower drops what it already read (register-then-replay).
        """

    async def ready(self, feed: Feed) -> None:
        """Until ``feed`` receives everything committed from now on (at once when local)."""

    @abc.abstractmethod
    def beat(self, key: str) -> None:
        """An upstream heartbeat arrived for ``key``: pass it to this process's followers."""

    @abc.abstractmethod
    def cut(self, key: str) -> None:
        """The capture of ``key`` failed in this process: cut this process's followers."""

    @abc.abstractmethod
    async def begin(self, meta: StreamMeta) -> StreamMeta:
        """Start (or restart) capturing a stream, durably; raises StorageFull when over budget.

        Restarting keeps the events already held, and clears a stream a failed
        commit had stopped, so its capture can go on once storage is healthy.
        """

    def begin_staged(self, meta: StreamMeta) -> tuple[StreamMeta, Awaitable[object]] | None:
        """``begin`` in two steps, where a backend can: the stream as it will be once begun, at
        once, and the begin's commit to await. The stream's events may be submitted meanwhile:
        they commit with the begin or after it, and fail with it. None: await ``begin`` instead.

        A capture starts copying its first leg before the begin commits, so the leg's first
        events share its commit: every new stream's first event reaches its client a commit
        sooner (``Captures.begin``)."""
        return None

    @abc.abstractmethod
    def submit(self, key: str, events: Sequence[Event]) -> asyncio.Future[list[Entry]]:
        """Queue events for the next commit without waiting for it.

        The future gives the events with their seqs once committed. Futures
        resolve in submission order, so callbacks on them publish in order
        while the caller already parses the next chunk. After a failed commit,
        every later submit for the stream fails too until it is begun again:
        a stream never has a hole.
        """

    def submit_then(self, key: str, events: Sequence[Event], settled: Settled) -> None:
        """``submit``, with ``settled`` told the outcome instead of a future being returned.

        Same order and guarantees as ``submit``'s futures. A capture submits once per chunk (once
        per token): a backend may tell ``settled`` straight from its commit, without a future and
        a loop callback each. ``settled`` must not raise.
        """
        def tell(fut: asyncio.Future[list[Entry]]) -> None:
            # Cancelled only when the log is torn down under it: nothing to tell but that it settled.
            settled([] if fut.cancelled() else fut.exception() or fut.result())

        self.submit(key, events).add_done_callback(tell)

    async def append(self, key: str, events: Sequence[Event]) -> list[Entry]:
        """Append events in order; returns them with their seqs once committed."""
        return await self.submit(key, events)

    @abc.abstractmethod
    async def finish(self, key: str, end: EndReason | None, events: Sequence[Event] = ()) -> list[Entry]:
        """Append final events and close the stream in one commit.

        ``end`` is None for a stream that may be captured again later (a thread
        stream whose last client left).
        """

    @abc.abstractmethod
    async def read(self, key: str, after: int, upto: int, limit: int,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Entry]:
        """Committed events with ``after < seq <= upto``, oldest first, at most ``limit``, and
        bodies of ``max_bytes`` at most, never fewer than one event (``records.record_page``)."""

    @abc.abstractmethod
    async def tail(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        """Upstream ids and bodies of the last events (at most ``limit``), oldest first."""

    @abc.abstractmethod
    async def sweep(self, now: float | None = None) -> int:
        """Apply retention; returns streams removed.

        Closed streams past the TTL go whole, then the oldest closed ones while over
        the size budget; open streams are never removed, but an open thread stream
        loses the batches appended before the TTL (``StreamMeta.first_seq`` says where
        it now starts).
        """

    @abc.abstractmethod
    def accepting(self, key: str | None = None) -> bool:
        """False when a capture of ``key`` must be refused: storage failing, or over budget
        with nothing else finished to evict (``accepting`` above, the one rule)."""

    # --- several gateway processes on one log -------------------------------------------------------
    # A shared log lets any number of gateway replicas serve each other's streams. Exactly
    # one captures a stream at a time: it holds a claim (a lease, with a fencing token that
    # the log checks on every append, so a stalled former owner cannot write). The others
    # follow it through the feed. A log one process owns grants every claim.

    # How often the hub looks for open streams nobody captures (None: only at start).
    takeover_interval: float | None = None

    @abc.abstractmethod
    async def claim(self, key: str) -> bool:
        """Take the exclusive right to capture ``key``; False while another process holds it."""

    @abc.abstractmethod
    async def release(self, key: str) -> None:
        """Give the claim on ``key`` up (the stream ended, or this process stops)."""

    @abc.abstractmethod
    async def unowned(self) -> list[StreamMeta]:
        """Open streams nobody captures (their owner stopped or died): to take over."""

    @abc.abstractmethod
    def on_lost(self, callback: Callable[[str, LeaseLoss], None]) -> None:
        """Call ``callback(key, how)`` when this process loses a claim to another one (once per claim)."""

    @abc.abstractmethod
    async def request_cancel(self, key: str) -> None:
        """Note on ``key`` that a client wants its run cancelled once nobody follows it
        (``StreamMeta.cancel_on_orphan``), for whichever process captures it."""

    @abc.abstractmethod
    def set_followers(self, key: str, here: int) -> None:
        """This process now has ``here`` followers of ``key`` (noted now, published by the log when it
        is shared: called on every client's arrival and departure, so it must not wait)."""

    @abc.abstractmethod
    async def followers(self, key: str, here: int) -> int:
        """Followers of ``key`` in every process (``here`` of them in this one)."""

    @abc.abstractmethod
    async def last_seq(self) -> int:
        """The highest seq handed out so far, over all streams (by any writer of a shared log)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes held."""


# --- the log read from outside the serving path (the operator commands) ------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """One stored batch: its first seq, the time it was appended (unix ms), its events."""

    first: int
    time_ms: int
    events: list[tuple[int, str | None, bytes]]  # (seq, upstream id, body)
    size: int


class LogView(Protocol):
    """A log, read-only: what each backend offers the operator commands (``gateway.logview``), beside a
    gateway that writes it."""

    where: str  # what it reads, for messages: the data file, or the Redis URL without secrets

    def metas(self) -> list[StreamMeta]: ...
    def meta(self, key: str) -> StreamMeta | None: ...
    def records(self, key: str, upto: int | None = None, after: int = 0) -> Iterator[Record]:
        """A stream's records, oldest first, up to the one starting at ``upto``, from the one that
        holds a seq above ``after`` (so a follower never re-reads what it printed)."""
        ...
    def counter(self) -> int: ...
    def orphan_keys(self) -> set[str]: ...
    def close(self) -> None: ...
