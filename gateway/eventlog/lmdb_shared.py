"""One LMDB data directory shared by several gateway processes on one host (``workers: N``).

Every process opens the same environment; LMDB serialises their write transactions, each
process's writer thread still commits a whole group at once. What one process alone kept in
memory is kept in the file instead, and decided inside the write transaction:

- **Leases** (``leases`` database: stream key -> owning process, ``-`` when free). A process
  captures a stream only while its lease names it, taken by a claim in a write transaction; every
  group checks the lease of each stream it writes (fencing: a stalled owner whose streams were
  taken over cannot write them). Whether an owner is alive is ``gateway.eventlog.siblings``' call.
- **Ids**: each process hands out ids from its own counter, and the file's counter is the
  highest committed by anyone. Beginning a capture moves the process's counter above the file's,
  and the begin commits only if the stream's head is still what it was staged on, so every id of
  a stream is above every id it held before (on whichever process).
- **The size held** is a counter in the file, moved by each group; retention decides from the
  file's streams and re-checks in the transaction that a stream it drops is still closed.
- **The live feed**: after each group a process tells the others which streams moved (key, old
  and new head, ended); one that has followers of a stream reads the new events from the file and
  hands them to them. Follower counts and cancel requests travel the same way; after a message to a
  process was dropped, they are sent to it again whole (``_restate``), as the commits are read again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from typing import Any, Callable, Iterator

import lmdb

from gateway.config import Storage
from gateway.eventlog.base import (
    LIST_SCAN,
    Batch,
    ClaimLost,
    CommitObserver,
    StorageError,
    StreamMeta,
    accepting,
    stop_tasks,
    to_evict,
)
from gateway.eventlog.lmdb import _SEQ_KEY, SIZE_KEY, LmdbEventLog, _Batch, _prefix
from gateway.eventlog.siblings import FREE, Message, Siblings
from gateway.metrics import LeaseLoss

log = logging.getLogger("gateway.eventlog")

# Stream changes per message: a datagram stays well under the kernel's limits.
_ANNOUNCE_CHUNK = 200
# Bytes of follower counts and cancels per message of a process's whole state (``_restate``): well
# under a datagram's limit (~200 KB by default, EMSGSIZE past it) whatever the keys' lengths, and few
# messages, so the state fits a sibling's queue of datagrams at once.
_STATE_BYTES = 48 * 1024
# Cancels this process's clients asked for on streams others capture, said again after a dropped
# message (the newest; one said again after its stream ended is ignored by its captor).
_CANCELS_KEPT = 1000
# The map is reserved at this multiple of the disk budget up front: growing it under other
# processes makes each of them re-map (MapResizedError) in the middle of their reads.
_MAP_HEADROOM = 4


def _bytes(raw: Any) -> bytes | None:
    """A value read in a write transaction (the writer's transactions hand out buffers)."""
    return bytes(raw) if raw is not None else None


class SharedLmdbEventLog(LmdbEventLog):
    _park_at_hand_over = False  # its writer waits for the other processes' commits: see there

    def __init__(self, cfg: Storage, *, on_commit: CommitObserver | None = None) -> None:
        super().__init__(cfg, on_commit=on_commit)
        self.takeover_interval = cfg.lease_ttl / 2
        self._announcing = True
        self._siblings = Siblings(cfg.path, cfg.lease_ttl, self._on_message, self._on_gone, self._restate)
        self._me = self._siblings.me.encode()
        self._leases_db: Any = None
        self._lost_callbacks: list[Callable[[str, LeaseLoss], None]] = []
        self._outgoing: list[list[Any]] = []  # this group's stream changes, for the others
        self._followers_here: dict[str, int] = {}
        self._followers_due: dict[str, int] = {}
        self._followers_elsewhere: dict[str, dict[str, int]] = {}  # sibling -> key -> followers
        self._restating: dict[str, dict[str, int]] = {}  # a sibling's counts, said again whole, in parts
        self._cancels_asked: dict[str, None] = {}  # oldest first, at most _CANCELS_KEPT
        self._ready = asyncio.Event()
        self._ready_timer: asyncio.TimerHandle | None = None
        self._awaiting: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._looked_unleased = False
        self._beginning: set[str] = set()
        # Whether the log holds something finished that retention could evict to make room: known
        # at open and at each sweep, and set whenever any process ends a stream.
        self._evictable = False
        self._stored_size: int | None = None  # writer thread: the size held after its last group
        self._dropped_bytes = 0  # writer thread, per group
        self._dropping: set[bytes] = set()  # writer thread, per group: the streams its batches drop

    @property
    def worker(self) -> str:
        return self._siblings.me

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        await super().open()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._clear_dead_readers)
        self._siblings.start(loop)
        self._awaiting = set(self._siblings.peers)
        for who in list(self._awaiting):  # one found gone is dropped from it meanwhile
            self._siblings.send(who, ["hello", self.worker])
        if self._awaiting:  # a sibling that never answers is not waited for
            self._ready_timer = loop.call_later(1.0, self._ready.set)
        else:
            self._ready.set()
        self._spawn(self._beat_loop(), "siblings-beat")
        log.info("event log shared by gateway processes on this host; this one is %s", self.worker)

    async def close(self) -> None:
        if self._ready_timer is not None:
            self._ready_timer.cancel()
        await stop_tasks(self._tasks, "shared log")
        await super().close()
        self._siblings.stop()

    def _map_size(self) -> int:
        return max(self._cfg.map_size, _MAP_HEADROOM * self._cfg.max_bytes)

    _DIR_LOCK = fcntl.LOCK_SH  # with the other workers; never with a gateway that owns the directory alone
    _DIR_IN_USE = "in use by a gateway process that does not share it (workers: 1)"

    def _meta_due(self, key: str, meta: StreamMeta) -> bool:
        return True  # the other processes read heads from the file (fencing, takeover, followers)

    def _opened_sync(self) -> None:
        assert self._env is not None
        self._leases_db = self._env.open_db(b"leases")
        with self._env.begin(write=True, db=self._meta_db) as txn:
            raw = txn.get(SIZE_KEY)
            if raw is None:  # the first process on this directory counts what the log holds
                txn.put(SIZE_KEY, str(self._size).encode())
            else:
                self._size = int(raw)
        self._evictable = any(not m.open for m in self._metas.values())
        # Only the streams this process captures are kept in memory; the rest is read from the file.
        self._metas.clear()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shared log task %s failed: %r", task.get_name(), task.exception())

    async def _beat_loop(self) -> None:
        ttl = self._cfg.lease_ttl
        last = time.monotonic()
        while True:
            await asyncio.sleep(ttl / 3)
            now = time.monotonic()
            lag = now - last
            stalled, last = lag > ttl, now
            self._siblings.beat()
            self._siblings.scan()
            self._siblings.settle()
            # Off the beat: the executor serves the log's reads too, and a beat that waited behind
            # them would make this process look stalled (or dead) to itself and to the others.
            if not any(t.get_name() == "clear-dead-readers" for t in self._tasks):
                self._spawn(asyncio.to_thread(self._clear_dead_readers), "clear-dead-readers")
            for who in self._awaiting & self._siblings.peers:  # a hello that was dropped: asked again
                self._siblings.send(who, ["hello", self.worker])
            if lag > ttl / 2:
                # Others may have taken this process for dead meanwhile: they sent it no commits, and
                # forgot its follower counts. Its followers catch up from the file; its counts go again.
                self._feeds.resync_all()
                self._siblings.reintroduce()
            if stalled:  # others may have taken this process's streams over meanwhile
                for key in list(self._claimed):
                    if self._lease_of(key) not in (None, self.worker):
                        log.warning("lease on %s was lost (this process stalled past %gs?)", key, ttl)
                        self._lost(key, "renewal")

    def _clear_dead_readers(self) -> None:
        """Free the reader slots of processes that died in a read (SIGKILL): each holds the snapshot it
        read, and LMDB reuses no page freed after the oldest one held, so the file would grow by every
        commit for as long as any process has it open (LMDB clears them only when asked)."""
        self._rw.acquire_read()  # not while the environment closes
        try:
            if self._env is None:
                return
            cleared = self._env.reader_check()
        except lmdb.Error as exc:
            log.warning("event log: looking for dead processes' reader slots failed: %s", exc)
            return
        finally:
            self._rw.release_read()
        if cleared:
            log.info("event log: %d reader slots of processes that died were cleared", cleared)

    # --- reads from the file ---------------------------------------------------------------------

    def _get(self, db: Any, key: bytes) -> bytes | None:
        """One value as the file holds it now (a read transaction of its own, on the loop: a few µs)."""
        with self._snapshot(db=db) as txn:
            return _bytes(txn.get(key))

    def _read_meta(self, key: str) -> StreamMeta | None:
        raw = self._get(self._streams_db, key.encode())
        return StreamMeta.from_bytes(raw) if raw is not None else None

    def _lease_of(self, key: str) -> str | None:
        raw = self._get(self._leases_db, key.encode())
        return raw.decode(errors="replace") if raw is not None else None

    def _stored_bytes(self) -> int:
        """The size held as the file says now: what this process saw at its last commit may be long
        gone (another process evicted since), and retention and the budget go by it."""
        try:
            raw = self._get(self._meta_db, SIZE_KEY)
        except (StorageError, lmdb.Error):  # closed, or unreadable: what this process knows
            return self._size
        self._size = int(raw) if raw is not None and raw.isdigit() else self._size
        return self._size

    def _stored_seq(self) -> int:
        raw = self._get(self._meta_db, _SEQ_KEY)
        return int(raw) if raw is not None and raw.isdigit() else 0

    def get(self, key: str) -> StreamMeta | None:
        mine = self._metas.get(key) if key in self._claimed else None
        return mine if mine is not None else self._read_meta(key)

    async def lookup(self, key: str) -> StreamMeta | None:
        return self.get(key)

    async def streams(self) -> list[StreamMeta]:
        out: list[StreamMeta] = []
        after = ""
        while True:
            page, after_next = await self.list_streams(after, LIST_SCAN, lambda m: True)
            out += page
            if after_next is None:
                return out
            after = after_next

    def _holds(self, key: str) -> bool:
        return True

    async def last_seq(self) -> int:
        return max(self._seq, self._stored_seq())

    def accepting(self, key: str | None = None) -> bool:
        return accepting(self.failure, self._stored_bytes(), self._cfg.max_bytes, self._evictable)

    # --- leases ------------------------------------------------------------------------------------

    async def claim(self, key: str) -> bool:
        owner = self._lease_of(key)
        if owner is not None and owner != self.worker and self._siblings.alive(owner):
            return False  # the common refusal, without a write
        # Taken in a write transaction: of two processes claiming at once, one gets it (and opens
        # the one upstream leg). A stream this process let go of (lost, released) is taken anew:
        # a failed commit of its earlier capture here must not refuse the writes of this one (they
        # go on from what the file holds, read again by _adopt), as a begin would revive it; a
        # takeover captures without a begin, and over the budget a begin is refused.
        anew = key not in self._claimed
        taken = bool(await self._submit(_Batch(op="claim", subject=key, revive=anew)))
        if taken:
            self._claimed.add(key)
            self._adopt(key)
        return taken

    def _adopt(self, key: str) -> None:
        """This process writes ``key`` from now on: from what the file holds of it, with ids above
        every id anyone committed before (the stream's own included)."""
        if key not in self._staged:
            held = self._read_meta(key)
            if held is not None:
                self._staged[key] = self._metas[key] = held
        stored = self._stored_seq()
        if stored > self._seq:
            # Others counted past this process: ids between its marks of recent writes and ``stored``
            # were theirs, written at any time, so no read below ``stored`` counts as recent (_hot).
            self._seq = stored
            self._recent = ((time.monotonic(), stored),) * 2

    async def release(self, key: str) -> None:
        self._claimed.discard(key)
        await self._submit(_Batch(op="release", subject=key))
        if key not in self._claimed:  # not claimed again meanwhile: another process may write it now
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._metas.pop(key, None)
        self._staged.pop(key, None)
        self._broken.discard(key)

    async def unowned(self) -> list[StreamMeta]:
        out, stale = await asyncio.get_running_loop().run_in_executor(None, self._unowned_sync)
        if stale:  # leases a dead process left on streams that ended: cleared, or the scan grows
            await self._submit(_Batch(op="clear", subject=stale))
        return out

    def _unowned_sync(self) -> tuple[list[StreamMeta], list[tuple[str, str]]]:
        out: list[StreamMeta] = []
        stale: list[tuple[str, str]] = []
        with self._snapshot() as txn:
            leases = {bytes(k).decode(errors="replace"): bytes(v).decode(errors="replace")
                      for k, v in txn.cursor(db=self._leases_db)}
            keys = [k for k, who in leases.items() if not self._siblings.alive(who)]
            for key in keys:
                raw = txn.get(key.encode(), db=self._streams_db)
                meta = StreamMeta.from_bytes(raw) if raw is not None else None
                if meta is not None and meta.open:
                    out.append(meta)
                else:
                    stale.append((key, leases[key]))
            if not self._looked_unleased:  # open streams from before the log was shared
                for _k, v in txn.cursor(db=self._streams_db):
                    meta = StreamMeta.from_bytes(v)
                    if meta.open and meta.key not in leases:
                        out.append(meta)
        self._looked_unleased = True
        return out, stale

    def on_lost(self, callback: Callable[[str, LeaseLoss], None]) -> None:
        self._lost_callbacks.append(callback)

    def _lost(self, key: str, how: LeaseLoss) -> None:
        if key not in self._claimed:
            return  # told once per claim
        self._claimed.discard(key)
        self._forget(key)
        for cb in self._lost_callbacks:
            cb(key, how)

    def _fenced(self, key: str) -> None:
        if key in self._beginning:  # lost the race to begin it: not a lease lost, just someone else's
            self._claimed.discard(key)
            self._forget(key)
        else:
            self._lost(key, "fenced")

    # --- the writer thread: decided in the write transaction ----------------------------------------

    def _screen(self, txn: lmdb.Transaction, batches: list[_Batch], fenced: set[int]) -> None:
        self._dropped_bytes = 0
        self._dropping.clear()
        me = self._me
        owners: dict[str, bytes | None] = {}
        heads: dict[str, int] = {}  # what earlier batches of this group leave a stream's head at

        def owner(key: str) -> bytes | None:
            if key not in owners:
                raw = txn.get(key.encode(), db=self._leases_db)
                owners[key] = bytes(raw) if raw is not None else None
            return owners[key]

        def held_elsewhere(key: str) -> bool:
            who = owner(key)
            return who is not None and who != me and self._siblings.alive(who.decode(errors="replace"))

        def still_open(key: str) -> bool:
            if key in opens:
                return opens[key]
            raw = _bytes(txn.get(key.encode(), db=self._streams_db))
            return raw is not None and StreamMeta.from_bytes(raw).open

        opens: dict[str, bool] = {}  # what earlier batches of this group leave a stream as
        for i, b in enumerate(batches):
            if b.op == "claim":
                key = b.subject
                b.result = not held_elsewhere(key)
                if b.result:
                    txn.put(key.encode(), me, db=self._leases_db)
                    owners[key] = me
                continue
            if b.op == "clear":
                for key, who in b.subject:
                    if owner(key) == who.encode() and not still_open(key):
                        txn.delete(key.encode(), db=self._leases_db)
                        owners[key] = None
                continue
            if b.op == "release":
                key = b.subject
                if owner(key) == me:
                    if still_open(key):
                        txn.put(key.encode(), FREE.encode(), db=self._leases_db)  # open: anyone takes it over
                        owners[key] = FREE.encode()
                    else:
                        txn.delete(key.encode(), db=self._leases_db)
                        owners[key] = None
                continue
            key = b.key
            if key is None:
                continue
            if b.revive:  # begin(): take the lease, if the stream is still what it was staged on
                if key not in heads:
                    raw = _bytes(txn.get(key.encode(), db=self._streams_db))
                    heads[key] = StreamMeta.from_bytes(raw).head if raw is not None else 0
                if held_elsewhere(key) or heads[key] != b.expect_head:
                    fenced.add(i)
                    continue
                if owner(key) != me:
                    txn.put(key.encode(), me, db=self._leases_db)
                    owners[key] = me
            elif owner(key) != me:
                fenced.add(i)
                continue
            staged = b.metas.get(key)
            if staged is not None:
                heads[key] = staged.head
                opens[key] = staged.open

    def _may_drop(self, txn: lmdb.Transaction, prefix: bytes) -> bool:
        raw = _bytes(txn.get(prefix[:-1], db=self._streams_db))
        if raw is None or prefix in self._dropping:
            return False  # another process dropped it already, or an earlier batch of this group does
        meta = StreamMeta.from_bytes(raw)
        if meta.open:
            return False
        self._dropped_bytes += meta.size
        self._dropping.add(prefix)  # a sweep and an eviction for the budget may both choose it
        return True

    def _store_seq(self, txn: lmdb.Transaction, top: int) -> None:
        raw = _bytes(txn.get(_SEQ_KEY, db=self._meta_db))
        if raw is None or not raw.isdigit() or int(raw) < top:  # others count too: never backwards
            txn.put(_SEQ_KEY, str(top).encode(), db=self._meta_db)

    def _applied(self, txn: lmdb.Transaction, batches: list[_Batch], refused: set[int]) -> None:
        raw = _bytes(txn.get(SIZE_KEY, db=self._meta_db))
        size = int(raw) if raw is not None and raw.isdigit() else 0
        size += sum(b.size_delta for i, b in enumerate(batches) if i not in refused) - self._dropped_bytes
        size = max(size, 0)
        txn.put(SIZE_KEY, str(size).encode(), db=self._meta_db)
        self._stored_size = size

    # --- back on the loop ----------------------------------------------------------------------------

    def _announce(self, key: str, prev: int, head: int, nbytes: int, ended: bool) -> None:
        self._outgoing.append([key, prev, head, nbytes, ended])
        self._evictable = self._evictable or ended

    def _committed(self, group: list[_Batch]) -> None:
        if self._stored_size is not None:
            self._size = self._stored_size
        out, self._outgoing = self._outgoing, []
        for i in range(0, len(out), _ANNOUNCE_CHUNK):
            self._siblings.broadcast(["commit", self.worker, out[i:i + _ANNOUNCE_CHUNK]])

    def _on_message(self, sender: str, message: Message) -> None:
        kind = message[0]
        if kind == "commit":
            self._deliver(message[2])
        elif kind == "followers":
            for counts in (self._followers_elsewhere.setdefault(sender, {}), self._restating.get(sender)):
                if counts is None:
                    continue
                for key, n in message[2].items():
                    if n:
                        counts[key] = n
                    else:
                        counts.pop(key, None)
        elif kind == "restate":  # every count ``sender`` has, in parts: they replace what is known at the last
            if message[3]:
                self._restating[sender] = {}
            part = self._restating.setdefault(sender, {})
            part.update(message[2])
            for key in message[5]:  # the cancels asked there lately, each as a "cancel" says it
                self._cancel_asked(key)
            if message[4]:
                self._followers_elsewhere[sender] = self._restating.pop(sender)
                self._heard(sender)  # as good as its welcome
        elif kind == "hello":  # answered with the whole state, in parts that fit a datagram
            self._siblings.state_to(sender)
        elif kind == "welcome":
            self._followers_elsewhere[sender] = dict(message[2])
            self._heard(sender)
        elif kind == "cancel":
            self._cancel_asked(message[2])
        elif kind == "resync":  # a message from ``sender`` was dropped: catch up from the file
            self._feeds.resync_all()  # (its counts come again whole after this: ``restate``)

    def _deliver(self, changes: list[list[Any]]) -> None:
        """Another process committed: hand what it wrote to this process's followers of those streams."""
        for key, prev, head, nbytes, ended in changes:
            self._evictable = self._evictable or ended
            if not self._feeds.following(key):
                continue
            if head > prev:
                try:
                    # The whole commit, however big: a read page's budget would hand the followers
                    # only its first 4 MiB as if it were all, and the rest would wait for the
                    # stream's next commit (the committing process held all of it in memory too).
                    entries = self._read_sync(key, prev, head, 1 << 30, 1 << 62)
                except (StorageError, lmdb.Error) as exc:
                    log.warning("reading %s for its followers failed (%s): they catch up from the log", key, exc)
                    self._feeds.resync(key)
                    continue
                if entries:
                    self._feeds.deliver(key, Batch("events", entries, prev, nbytes))
            if ended:
                self._feeds.deliver(key, Batch("end", prev=head))

    def _cancel_asked(self, key: str) -> None:
        """A client of another process asked for ``key`` to be cancelled when nobody follows it: noted
        on the stream if this process captures it (once: noting it again changes nothing)."""
        if key in self._claimed:
            staged = self._staged.get(key)
            if staged is None or not staged.cancel_on_orphan:
                self._spawn(LmdbEventLog.request_cancel(self, key), "cancel-request")

    def _heard(self, who: str) -> None:
        """``who`` told this process its follower counts: it knows this process, and is not awaited."""
        self._awaiting.discard(who)
        if not self._awaiting:
            self._ready.set()

    def _restate(self) -> Iterator[Message]:
        """This process's whole state, for a sibling that may have missed some of it: every follower
        count and the cancels its clients asked for lately, in parts of at most ``_STATE_BYTES`` (the
        first and the last marked). Each part's counts are read as it is sent: a part sent after a
        count changed (and was announced) says the new count, not the one of when the state began."""
        parts: list[tuple[list[str], list[str]]] = [([], [])]
        size = 0
        # (which list of a part, key, its JSON's bytes beside the key: a count, or a bare string)
        items = [(0, key, 24) for key in self._followers_here] + [(1, key, 8) for key in self._cancels_asked]
        for which, key, extra in items:
            if size + len(key) + extra > _STATE_BYTES:
                parts.append(([], []))
                size = 0
            parts[-1][which].append(key)
            size += len(key) + extra
        last = len(parts) - 1
        for i, (keys, cancels) in enumerate(parts):
            here = self._followers_here
            yield ["restate", self.worker, {k: here[k] for k in keys if k in here}, i == 0, i == last, cancels]

    def _on_gone(self, who: str) -> None:
        self._followers_elsewhere.pop(who, None)
        self._restating.pop(who, None)
        # What it committed last may never have been told (it died between its commit and its
        # datagram, or owed this process a resync): followers catch up from the file now. A stream
        # it left open shows the gap when its new captor commits; one it ended has no captor any more.
        self._feeds.resync_all()
        self._awaiting.discard(who)
        if not self._awaiting:
            self._ready.set()

    # --- the live feed, followers, cancel requests ------------------------------------------------------

    async def ready(self, feed: Any) -> None:
        await self._ready.wait()  # every sibling knows this process: it is told of each commit

    def set_followers(self, key: str, here: int) -> None:
        if here:
            self._followers_here[key] = here
        else:
            self._followers_here.pop(key, None)
        if not self._followers_due and self._loop is not None:
            self._loop.call_soon(self._publish_followers)
        self._followers_due[key] = here

    def _publish_followers(self) -> None:
        due, self._followers_due = self._followers_due, {}
        items = list(due.items())
        for i in range(0, len(items), _ANNOUNCE_CHUNK):
            self._siblings.broadcast(["followers", self.worker, dict(items[i:i + _ANNOUNCE_CHUNK])])

    async def followers(self, key: str, here: int) -> int:
        # The siblings' counts come with their answers to this process's hello: until then (at most
        # a second), and from one that has not answered by then, any stream may be followed there.
        # Said as one follower: "nobody" would end a thread stream someone follows, or cancel a run.
        await self._ready.wait()
        unknown = 1 if self._awaiting else 0
        return here + unknown + sum(counts.get(key, 0) for counts in self._followers_elsewhere.values())

    async def request_cancel(self, key: str) -> None:
        if key in self._claimed:
            await super().request_cancel(key)
        else:
            self._cancels_asked.pop(key, None)
            self._cancels_asked[key] = None  # said again after a dropped message
            while len(self._cancels_asked) > _CANCELS_KEPT:
                del self._cancels_asked[next(iter(self._cancels_asked))]
            self._siblings.broadcast(["cancel", self.worker, key])  # the owner notes it on the stream

    # --- begin, retention ------------------------------------------------------------------------------

    def begin_staged(self, meta: StreamMeta) -> tuple[StreamMeta, asyncio.Future[Any]]:
        key = meta.key
        self._stored_bytes()  # the budget as it is now, not as this process's last commit left it
        self._adopt(key)
        self._claimed.add(key)
        self._beginning.add(key)
        try:
            staged, committed = super().begin_staged(meta)
        except BaseException:
            self._beginning.discard(key)
            raise
        committed.add_done_callback(lambda _f: self._beginning.discard(key))
        return staged, committed

    def _make_room(self, key: str) -> bool:
        # Reading every stream's metadata from the file held the loop ~0.4 s at 50,000 streams
        # (bench/budget_begin.py --shared): it is read in the executor, and this begin goes ahead on
        # what is known (something finished is there to evict). The budget is exceeded meanwhile by
        # what is written in that time, as it is between sweeps on Redis.
        if not self._evictable:
            return False
        if not any(t.get_name() == "evict-to-budget" for t in self._tasks):
            self._spawn(self._evict_to_budget(), "evict-to-budget")
        return True

    async def _evict_to_budget(self) -> None:
        metas = await asyncio.get_running_loop().run_in_executor(None, self._file_metas)
        batch = _Batch()
        self._stored_bytes()
        self._evict_from(batch, [m for m in metas if m.key not in self._beginning], float("-inf"))
        if batch.drop_prefixes:
            await self._submit(batch)

    def _evict_from(self, batch: _Batch, metas: list[StreamMeta], cutoff: float, exclude: str | None = None) -> int:
        """Retention's choice (``to_evict``) among the file's streams, dropped in ``batch``; notes
        whether anything finished is left to evict."""
        doomed = to_evict(metas, self._size, self._cfg.max_bytes, cutoff, exclude)
        for m in doomed:
            self._drop_shared(batch, m)
        self._evictable = len(doomed) < sum(1 for m in metas if not m.open)
        return len(doomed)

    def _file_metas(self) -> list[StreamMeta]:
        with self._snapshot(db=self._streams_db) as txn:
            return [StreamMeta.from_bytes(v) for _k, v in txn.cursor()]

    def _drop_shared(self, batch: _Batch, meta: StreamMeta) -> None:
        batch.drop_prefixes.append(_prefix(meta.key))
        batch.metas[meta.key] = None
        self._size -= meta.size  # until the commit says what the log holds
        self._forget(meta.key)

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - self._cfg.retention
        metas = await asyncio.get_running_loop().run_in_executor(None, self._file_metas)
        batch = _Batch()
        self._stored_bytes()
        doomed = self._evict_from(batch, metas, cutoff)
        trims: list[asyncio.Future[Any]] = []
        for key in list(self._claimed):
            mine = self._metas.get(key)
            if mine is not None and mine.open and mine.endless:
                # A write of the stream's own, fenced as its appends are: another process that took it
                # over meanwhile (this one stalled) keeps its metadata, not this one's stale copy.
                trim = _Batch(key=key)
                await self._trim(trim, key, cutoff)
                if trim.metas:
                    trims.append(self._submit(trim))
        if batch.metas or batch.drop_prefixes or batch.drop_keys:
            await self._submit(batch)
        for outcome in await asyncio.gather(*trims, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, ClaimLost):  # lost: told on_lost
                raise outcome
        if doomed:
            log.info("retention removed up to %d streams; %d bytes held", doomed, self._size)
        return doomed


__all__ = ["SharedLmdbEventLog"]
