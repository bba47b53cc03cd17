"""The embedded event log: LMDB, one writer thread, group commit.

Layout (named databases in one environment):
- ``events``: one record per appended batch (a chunk's events):
  ``<stream key> NUL <first seq: 8 bytes big-endian>`` -> ``<u64 unix ms>`` then for
  each event ``<u32 body length><u16 id length><upstream id><body>``; seqs in a
  batch are consecutive, so one LMDB put carries a whole chunk. The time lets
  retention trim the old part of a thread stream that never closes.
- ``streams``: ``<stream key>`` -> StreamMeta as JSON. An open stream's counters (head, count,
  size, last id and event, time) may lag its records: a group that only appends events writes
  them every ``_META_EVERY`` events of the stream, not every commit (each write dirtied a page
  per stream per commit). Whoever reads the file brings them up to the records first
  (``caught_up``); opening the log writes them back.
- ``meta``: ``seq`` -> the last seq handed out (so seqs are never reused)

Seqs are assigned on the event loop, in call order, against a *staged* view of
each stream; the committed snapshots (what ``get`` returns) change only once
the writer thread reports a commit. The writer drains everything queued into
one write transaction and commits once, so one fsync covers every stream that
had events waiting (group commit). Futures resolve after the commit: nothing
reaches a client before it is on disk.

When a commit fails (a full disk, an I/O error) every stream in it is marked
broken: its later batches are refused until the hub begins it again, so no
stream ever has a hole. The writer then probes with a small real write every
second and reports recovery, so the gateway heals by itself when space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lmdb

from gateway.config import Storage
from gateway.eventlog.base import (
    BEAT,
    CUT,
    LIST_SCAN,
    READ_PAGE_BYTES,
    Batch,
    ClaimLost,
    CommitObserver,
    EndReason,
    Entry,
    EventLog,
    Feed,
    Health,
    LocalFeeds,
    Record,
    Settled,
    StorageDamaged,
    StorageError,
    StorageFull,
    StreamMeta,
    accepting,
    seq_floor,
    to_evict,
    trim_marks,
)
from gateway.eventlog.records import decode, encode, record_page, record_time_ms
from gateway.metrics import LeaseLoss
from gateway.sse import Event, event_name

log = logging.getLogger("gateway.eventlog")

_SEQ_KEY = b"seq"
# An open stream's metadata is written at least once per this many of its events (it is always
# written when anything but its counters changes): bounds what a start-up reads to catch it up.
_META_EVERY = 1000
SIZE_KEY = b"size"  # bytes held, kept by a shared log (one process counts in memory)
_PROBE_KEY = b"probe"
# A read of at most this many of a live stream's last events, written this recently, is done on the
# loop (``read``): pages written seconds ago are in the page cache, and a few small records cost
# less to copy than the executor's hand-off.
_HOT_EVENTS = 32
_HOT_SECONDS = 10.0
# So is a page of a live stream this process writes, of at most this many bytes, when all of it was
# written within _HOT_SECONDS: a follower catching up with a fast stream (its queue overflowed) reads
# page after page, and on the executor each page cost two loop turns and the GIL traded three ways
# (scenario a: ~25% of its events/s).
_HOT_PAGE_BYTES = 64 << 10
_TAIL_BYTES = 8 << 20  # the de-duplication tail: enough for thousands of events, bounded for huge ones
# While commits fail, the writer tries a real write this often, and this big, to see whether space is back.
PROBE_INTERVAL = 1.0
_PROBE_BYTES = 1 << 20
_PROBE_MAX_BYTES = 64 << 20

# The writer holds the loop still while it puts a group (LmdbEventLog._loop_held): it waits this
# long for the loop to get to it, and the loop waits at most this long for the puts.
_LOOP_PARK_WAIT = 0.25
_LOOP_HOLD_LIMIT = 0.1



@dataclass(slots=True, eq=False)
class _Batch:
    """Writes staged on the loop, applied by the writer thread in submission order."""

    key: str | None = None  # the stream whose events these are (None: retention work)
    metas: dict[str, StreamMeta | None] = field(default_factory=dict)  # snapshots once committed; None deletes
    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    drop_prefixes: list[bytes] = field(default_factory=list)
    drop_keys: list[bytes] = field(default_factory=list)
    seq: int = 0  # highest seq in the batch (0: none)
    count: int = 0  # events in the records above (metrics)
    nbytes: int = 0  # bytes of those events' bodies (what followers queue)
    # begin(), or a shared log's claim of a stream taken anew: the stream may take writes again
    # after a failure (``revives``)
    revive: bool = False
    # A shared log (gateway.eventlog.lmdb_shared): bytes this batch adds to the log (negative:
    # removes), the stream's head the begin() was staged on (-1: not a begin), and a lease
    # operation decided in the write transaction ("claim", "release", "clear") on ``subject``.
    size_delta: int = 0
    expect_head: int = -1
    op: str | None = None
    subject: Any = None
    result: Any = None
    future: asyncio.Future[Any] | None = None
    settled: Settled | None = None  # told instead of ``future`` (submit_then): no future per chunk
    hot: bool = False  # events only: the stream's metadata changes only in its counters
    # Retention's trims of open streams: key -> (bytes dropped, first_seq before, trim marks before).
    # Staged at once (later batches build on the trimmed metadata), so a trim that fails to commit
    # is undone by these.
    trimmed: dict[str, tuple[int, int, str | None, str | None]] = field(default_factory=dict)
    dropped: list[StreamMeta] = field(default_factory=list)  # retention's evictions, put back if it fails

    @property
    def revives(self) -> str | None:
        """The stream this batch lets take writes again: a begin's, or one a claim took anew (its
        staged state was read afresh from the file: nothing staged on a failed commit is left)."""
        if not self.revive:
            return None
        if self.op == "claim":
            return self.subject if self.result else None
        return self.key


def _probe_size(group: list[_Batch]) -> int:
    """How much the storage probe writes after ``group`` failed to commit: at least what the group
    tried to write (bounded). A failed commit leaves the pages it wrote before the disk filled
    allocated in the file; a smaller probe fits in them on a disk still full, and the log would
    say it recovered only to fail again at its next commit."""
    tried = sum(len(k) + len(v) for b in group for k, v in b.events)
    return max(_PROBE_BYTES, min(2 * tried, _PROBE_MAX_BYTES))


class _RWLock:
    """Readers share; the writer takes it alone only to grow the map (LMDB requires no open txn)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True

    def release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


def _prefix(key: str) -> bytes:
    return key.encode() + b"\x00"


@contextlib.contextmanager
def _opening(path: Path) -> Iterator[None]:
    """One process at a time checks the data file and opens it. Workers sharing a new directory
    start together: LMDB creates the file empty and writes its header a moment later, and a sibling
    checking it in between would take a log being made for a truncated one."""
    fd = os.open(path / "opening.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def verify_file(path: Path) -> None:
    """Refuse a data file LMDB would misread: empty, or shorter than its own header says.

    LMDB maps the file; a page past its end is a SIGBUS in the middle of a read,
    and an empty file is taken for a new log (ids would start over). Both meta
    pages are read here first: the newer one says how many pages must exist.
    """
    data = path / "data.mdb"
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return  # a new log
    hint = "move the data directory aside to start a new log (see README, 'A damaged log')"
    if size < 2 * 4096:
        raise StorageDamaged(f"{data}: truncated ({size} bytes, less than LMDB's two header pages); {hint}")
    with open(data, "rb") as f:
        first = f.read(4096)
        magic, psize = struct.unpack_from("<I", first, 16)[0], struct.unpack_from("<I", first, 40)[0]
        if magic != 0xBEEFC0DE or psize < 512 or psize & (psize - 1):
            raise StorageDamaged(f"{data}: not an LMDB file (bad header); {hint}")
        f.seek(psize)
        second = f.read(256)
    metas = [struct.unpack_from("<QQ", page, 136) for page in (first, second) if len(page) >= 152
             and struct.unpack_from("<I", page, 16)[0] == 0xBEEFC0DE]
    last_pg, _txnid = max(metas, key=lambda m: m[1])
    needed = (last_pg + 1) * psize
    if size < needed:
        raise StorageDamaged(f"{data}: truncated ({size} bytes, its header needs {needed}); {hint}")


class LmdbEventLog(EventLog):
    # Whether the loop parks itself when it hands a group to the writer thread (``_hand_over``). Not
    # when processes share the file: the writer may wait there for another process's commit (LMDB's
    # writer lock), and the loop must not stand still for that; it is parked once the lock is held.
    _park_at_hand_over = True

    def __init__(self, cfg: Storage, *, on_commit: CommitObserver | None = None) -> None:
        self._cfg = cfg
        self._env: lmdb.Environment | None = None
        self._events_db: Any = None
        self._streams_db: Any = None
        self._meta_db: Any = None
        self._metas: dict[str, StreamMeta] = {}  # committed snapshots
        self._staged: dict[str, StreamMeta] = {}  # what each stream will be once its queued batches commit
        # (when, the seq staged by then), older first: what was written since (``_hot``).
        self._recent: tuple[tuple[float, int], tuple[float, int]] = ((-math.inf, 0), (-math.inf, 0))
        self._broken: set[str] = set()  # streams a failed commit stopped (loop side)
        self._seq = 0
        self._size = 0
        # A group of batches and, when the loop parked itself to hand it over, the lock it waits on.
        self._queue: queue.SimpleQueue[tuple[list[_Batch], threading.Lock | None] | None] = queue.SimpleQueue()
        # Batches submitted while a group commits wait here and go to the writer together when it is
        # done: a group is everything that came during the previous commit (its fsync, mostly), one
        # hand-over per group, however the loop and the writer thread happen to trade the GIL.
        self._outbox: list[_Batch] = []
        self._committing = False
        self._handover_due = False
        self._closing = False
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rw = _RWLock()
        self._on_commit = on_commit
        self._meta_written: dict[str, int] = {}  # the writer thread's: a stream's count when its metadata was last written
        self._lock_fd: int | None = None
        self.health = Health()
        self._feeds = LocalFeeds()
        self._claimed: set[str] = set()
        # Set by a shared log: committed stream changes are collected for the other processes.
        self._announcing = False

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._open_sync)
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="eventlog-writer", daemon=True)
        self._writer.start()

    def _open_sync(self) -> None:
        path = Path(self._cfg.path)
        data = path / "data.mdb"
        try:
            os.makedirs(path, exist_ok=True)
            self._take_dir_lock(path)
            sync = self._cfg.durability == "fsync"
            with _opening(path):
                verify_file(path)
                self._env = lmdb.open(
                    str(path), map_size=self._map_size(), max_dbs=4, max_readers=512,
                    sync=sync, metasync=sync, readahead=False, lock=True,
                )
            self._events_db = self._env.open_db(b"events")
            self._streams_db = self._env.open_db(b"streams")
            self._meta_db = self._env.open_db(b"meta")
            self._catch_up_sync()
            with self._env.begin() as txn:
                raw = txn.get(_SEQ_KEY, db=self._meta_db)
                for k, v in txn.cursor(db=self._streams_db):
                    try:
                        meta = StreamMeta.from_bytes(v)
                    except StorageDamaged as exc:
                        shown = bytes(k)[:80].decode("utf-8", "replace")
                        raise StorageDamaged(f"{data}: stream record {shown!r} is damaged ({exc}); move the data "
                                             "directory aside to start a new log (see README, 'A damaged log')") from None
                    self._metas[meta.key] = meta
                    self._size += meta.size
            if raw is not None:
                if not raw.isdigit():
                    raise StorageDamaged(f"{data}: the seq record is damaged ({bytes(raw)[:40]!r}); move the data "
                                         "directory aside to start a new log (see README, 'A damaged log')")
                self._seq = int(raw)
            top = max((m.head for m in self._metas.values()), default=0)
            if raw is None or top > self._seq:
                # A new log (or one from before the counter was stored first): start above every old id.
                self._seq = max(self._seq, top, seq_floor())
                with self._env.begin(write=True) as wtxn:
                    wtxn.put(_SEQ_KEY, str(self._seq).encode(), db=self._meta_db)
            self._opened_sync()
        except StorageError:
            self._release_dir_lock()
            raise
        except (lmdb.Error, OSError) as exc:
            self._release_dir_lock()
            raise StorageError(f"open event log at {path}: {exc}") from exc
        self._staged = dict(self._metas)
        log.info("event log open at %s: %d streams, %d bytes, next seq %d",
                 path, len(self._metas), self._size, self._seq + 1)

    def _catch_up_sync(self) -> None:
        """Bring every open stream's metadata up to its records, in the file (one write
        transaction: a process sharing the directory sees it whole or not at all)."""
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            behind: list[StreamMeta] = []
            for _k, v in txn.cursor(db=self._streams_db):
                try:
                    meta = StreamMeta.from_bytes(v)
                except StorageDamaged:
                    continue  # said when the streams are loaded, with where to look
                now = caught_up(txn, self._events_db, meta)
                if now is not meta:
                    behind.append(now)
            for meta in behind:
                txn.put(meta.key.encode(), meta.to_bytes(), db=self._streams_db)
        if behind:
            log.info("event log: %d open streams' metadata caught up with their records", len(behind))

    def _map_size(self) -> int:
        return self._cfg.map_size

    def _opened_sync(self) -> None:
        """After the streams are loaded. One process keeps the size held in memory only; a count
        left by a shared log would be stale the next time one is opened here: dropped."""
        assert self._env is not None
        with self._env.begin(db=self._meta_db) as txn:
            stale = txn.get(SIZE_KEY) is not None
        if stale:
            with self._env.begin(write=True, db=self._meta_db) as wtxn:
                wtxn.delete(SIZE_KEY)

    # LMDB itself allows several processes; two gateways on one log that each think they own it
    # would both hand out the same seqs and both re-attach the same streams: one owner per data
    # directory (a shared log takes the lock shared, with its siblings, and never with an owner).
    _DIR_LOCK = fcntl.LOCK_EX
    _DIR_IN_USE = "in use by another gateway process"

    def _take_dir_lock(self, path: Path) -> None:
        fd = os.open(path / "gateway.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, self._DIR_LOCK | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"data directory {path} is {self._DIR_IN_USE}") from None
        self._lock_fd = fd

    def _release_dir_lock(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def _snapshot(self, **kwargs: Any) -> Iterator[Any]:
        """A read transaction, under the read lock (see ``_RWLock``). Where processes share the file,
        one that grew the map makes LMDB refuse every transaction of the others (MDB_MAP_RESIZED)
        until they adopt its size: this process adopts it then, and begins again."""
        for attempt in range(3):
            self._rw.acquire_read()
            try:
                if self._env is None:
                    raise StorageError("event log is closed")
                try:
                    txn = self._env.begin(**kwargs)
                except lmdb.MapResizedError:
                    if attempt == 2:
                        raise
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            finally:
                self._rw.release_read()
            self._adopt_map()  # outside the read lock: it waits until no transaction is open here

    async def close(self) -> None:
        self._feeds.stop()
        if self._writer is not None:
            self._closing = True  # what comes now would never be handed over: refused instead
            if self._outbox:
                self._queue.put((self._outbox, None))
                self._outbox = []
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        if self._env is not None:
            self._rw.acquire_write()  # no read may be inside LMDB while the environment closes
            try:
                self._env.close()
                self._env = None
            finally:
                self._rw.release_write()
        self._release_dir_lock()

    # --- metadata ----------------------------------------------------------------------------

    def get(self, key: str) -> StreamMeta | None:
        """The committed snapshot, without awaiting (this log keeps them all in memory)."""
        return self._metas.get(key)

    async def lookup(self, key: str) -> StreamMeta | None:
        return self._metas.get(key)

    async def streams(self) -> list[StreamMeta]:
        return list(self._metas.values())

    async def list_streams(self, after: str, limit: int, keep: Callable[[StreamMeta], bool],
                           scan: int = LIST_SCAN) -> tuple[list[StreamMeta], str | None]:
        # Off the loop, from the streams database (in key order): never a sort of every stream held.
        return await asyncio.get_running_loop().run_in_executor(None, self._list_sync, after, limit, keep, scan)

    def _list_sync(self, after: str, limit: int, keep: Callable[[StreamMeta], bool],
                   scan: int) -> tuple[list[StreamMeta], str | None]:
        out: list[StreamMeta] = []
        last = after
        with self._snapshot(db=self._streams_db) as txn:
            cur = txn.cursor()
            found = cur.set_range(after.encode() + b"\x00") if after else cur.first()
            while found and scan > 0:
                meta = caught_up(txn, self._events_db, StreamMeta.from_bytes(cur.value()))
                last, scan = meta.key, scan - 1
                if keep(meta):
                    out.append(meta)
                    if len(out) == limit:
                        return out, last
                found = cur.next()
        return out, (last if found else None)

    @property
    def size(self) -> int:
        return self._size

    def _holds(self, key: str) -> bool:
        """Whether reads of ``key`` can find anything (a shared log: another process may hold it)."""
        return key in self._metas

    async def last_seq(self) -> int:
        return self._seq

    # --- one process owns the log: every claim is granted, every follower is here -------------

    async def claim(self, key: str) -> bool:
        self._claimed.add(key)
        return True

    async def release(self, key: str) -> None:
        self._claimed.discard(key)

    async def unowned(self) -> list[StreamMeta]:
        return [m for m in self._metas.values() if m.open and m.key not in self._claimed]

    def on_lost(self, callback: Callable[[str, LeaseLoss], None]) -> None:
        pass  # nobody else can take a claim

    async def request_cancel(self, key: str) -> None:
        staged = self._staged.get(key)
        if staged is None or staged.cancel_on_orphan or key in self._broken:
            return
        self._staged[key] = staged = replace(staged, cancel_on_orphan=True)
        await self._submit(_Batch(key=key, metas={key: staged}))

    def set_followers(self, key: str, here: int) -> None:
        pass

    async def followers(self, key: str, here: int) -> int:
        return here

    # --- the live feed (one process: every follower is local) ------------------------------------

    def subscribe(self, key: str, limit: int, byte_limit: int, on_overflow: Callable[[], None] | None = None) -> Feed:
        return self._feeds.subscribe(key, limit, byte_limit, on_overflow)

    def beat(self, key: str) -> None:
        self._feeds.deliver(key, BEAT)

    def cut(self, key: str) -> None:
        self._feeds.deliver(key, CUT)

    def accepting(self, key: str | None = None) -> bool:
        # Same rule as begin(): the stream being (re)started is never evicted to make room for itself.
        return accepting(self.failure, self._size, self._cfg.max_bytes,
                         any(not m.open and m.key != key for m in self._metas.values()))

    async def begin(self, meta: StreamMeta) -> StreamMeta:
        _staged, committed = self.begin_staged(meta)
        await committed
        return self._metas[meta.key]

    def begin_staged(self, meta: StreamMeta) -> tuple[StreamMeta, asyncio.Future[Any]]:
        if self.failure is not None:
            raise StorageError(f"storage is failing: {self.failure}")
        if self._size >= self._cfg.max_bytes and not self._make_room(meta.key):
            raise StorageFull(
                f"event log is at its budget ({self._size} of {self._cfg.max_bytes} bytes) "
                "and every stream held is still live")
        existing = self._staged.get(meta.key)
        now = time.time()
        if existing is not None:
            staged = replace(existing, open=True, end=None, path=meta.path,
                             resumable=existing.resumable or meta.resumable, updated_at=now)
            if meta.auth_digest is not None:  # the new captor is who may resume it now
                staged = replace(staged, auth_salt=meta.auth_salt, auth_digest=meta.auth_digest)
        else:
            staged = replace(meta, base=self._seq, created_at=now, updated_at=now)
        self._staged[meta.key] = staged
        self._broken.discard(meta.key)
        return staged, self._submit(_Batch(key=meta.key, metas={meta.key: staged}, revive=True,
                                           expect_head=existing.head if existing is not None else 0))

    # --- writes ------------------------------------------------------------------------------

    def submit(self, key: str, events: Sequence[Event]) -> asyncio.Future[list[Entry]]:
        return self._submit(self._staged_batch(key, events, end=False, end_reason=None))

    def submit_then(self, key: str, events: Sequence[Event], settled: Settled) -> None:
        batch = self._staged_batch(key, events, end=False, end_reason=None)
        batch.settled = settled
        self._enqueue(batch)

    async def finish(self, key: str, end: EndReason | None, events: Sequence[Event] = ()) -> list[Entry]:
        entries: list[Entry] = await self._submit(self._staged_batch(key, events, end=True, end_reason=end))
        return entries

    def _staged_batch(self, key: str, events: Sequence[Event], *, end: bool, end_reason: EndReason | None) -> _Batch:
        """A batch appending ``events`` to ``key`` (and ending it, with ``end``), staged: its seqs
        assigned, the stream's metadata as it will be once it commits. Once per chunk, i.e. per
        token: one function, each part built once and handed to the batch whole."""
        meta = self._staged.get(key)
        if meta is None:
            raise StorageError(f"stream {key} is not held (evicted or never begun)")
        if key in self._broken:
            raise StorageError(f"stream {key} stopped at a failed commit: {self.failure or 'storage error'}")
        if events:
            first = self._seq + 1
            now = time.time()
            enc = encode(events, int(now * 1000), first)
            record_key = _prefix(key) + first.to_bytes(8, "big")
            self._seq = seq = first + enc.count - 1
            size = len(record_key) + len(enc.record)
            meta = meta.advanced(seq, meta.count + enc.count, meta.size + size,
                                 enc.last_upstream_id or meta.last_upstream_id, enc.last_event, now)
            batch = _Batch(key=key, events=[(record_key, enc.record)], seq=seq, count=enc.count, nbytes=enc.nbytes,
                           size_delta=size, result=enc.entries, hot=not end)
        else:
            batch = _Batch(key=key, result=[], hot=not end)
        if end:
            meta = replace(meta, open=False, end=end_reason, updated_at=time.time())
        self._staged[key] = batch.metas[key] = meta
        return batch

    def _submit(self, batch: _Batch) -> asyncio.Future[Any]:
        self._enqueue(batch)  # the writer sees the batch only after this turn of the loop
        assert self._loop is not None
        batch.future = fut = self._loop.create_future()
        return fut

    def _enqueue(self, batch: _Batch) -> None:
        if self._writer is None or self._loop is None or self._closing:
            raise StorageError("event log is closed")
        self._outbox.append(batch)
        if not self._committing and not self._handover_due:
            self._handover_due = True
            self._loop.call_soon(self._hand_over)  # after this turn of the loop: its batches in one group

    def _hand_over(self) -> None:
        self._handover_due = False
        if self._committing or not self._outbox or self._writer is None:
            return
        self._committing = True
        if not self._park_at_hand_over or self.failure is not None or not self._writer.is_alive():
            # Failing, the writer thread may be busy probing the disk: the loop would wait its limit.
            self._queue.put((self._outbox, None))
            self._outbox = []
            return
        # The loop stands still here, the GIL free, while the writer thread puts the group's records
        # (``_commit_group`` lets it go once they are in): parked in the turn that hands the group
        # over, where ``_loop_held`` parks it in a turn of its own, which a busy loop gets to only
        # after everything else that turn holds (a fifth of a token's latency at 1,000 streams).
        hold = threading.Lock()
        hold.acquire()
        self._queue.put((self._outbox, hold))
        self._outbox = []
        hold.acquire(timeout=_LOOP_HOLD_LIMIT)  # bounded, as _loop_held's waits are

    # --- the writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        q = self._queue
        broken: set[str] = set()  # writer side: batches of these streams are refused until revived
        failing = False
        probe_bytes = _PROBE_BYTES
        stopping = False
        while not stopping:
            try:
                item = q.get(timeout=PROBE_INTERVAL) if failing else q.get()
            except queue.Empty:
                failing = not self._probe(probe_bytes)
                continue
            items = [item]
            while True:  # drain: everything queued now shares one commit (at close, the last groups)
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            group: list[_Batch] = []
            holds: list[threading.Lock] = []
            for it in items:
                if it is None:
                    stopping = True
                    continue
                group += it[0]
                if it[1] is not None:
                    holds.append(it[1])
            if not group:
                continue
            started = time.perf_counter()
            error: BaseException | None = None
            refused: set[int] = set()
            fenced: set[int] = set()
            try:
                refused, fenced = self._commit_group(group, broken, holds)
            except BaseException as exc:  # reported to every waiter; the thread lives on
                if not failing:
                    log.error("event log commit failed: %s", exc)
                    probe_bytes = _probe_size(group)
                error = exc
                # A trim lost nothing of its stream: only a stream whose events failed stops here.
                broken.update(b.key for b in group if b.key is not None and not b.trimmed)
            for h in holds:  # failed before its puts: the loop is let go all the same
                h.release()
            holds.clear()
            if error is not None:
                failing = True
            elif len(refused) < len(group):
                failing = False  # something was written: storage takes writes again
            # else: every batch was refused (streams stopped at a failure), nothing was written, and
            # an empty commit says nothing about the disk: failing stays as it was.
            self._report(group, refused, fenced, error, time.perf_counter() - started, recovered=not failing)

    def _report(self, group: list[_Batch], refused: set[int], fenced: set[int], error: BaseException | None,
                seconds: float, recovered: bool) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._resolve, group, refused, fenced, error, seconds, recovered)
        except RuntimeError:  # loop already closed at shutdown
            pass

    def _commit_group(self, batches: list[_Batch], broken: set[str],
                      holds: list[threading.Lock]) -> tuple[set[int], set[int]]:
        """Apply a group in one transaction; returns the indexes of batches refused (broken streams),
        and of those the ones refused because another process captures their stream now."""
        assert self._env is not None
        while True:
            refused: set[int] = set()
            fenced: set[int] = set()
            try:
                with self._env.begin(write=True) as txn:
                    self._screen(txn, batches, fenced)  # before _loop_held holds the loop: it may read
                    refused |= fenced
                    try:
                        if holds:
                            self._apply(txn, batches, broken, refused)
                        else:
                            with self._loop_held():
                                self._apply(txn, batches, broken, refused)
                    finally:
                        for h in holds:
                            h.release()
                        holds.clear()
                    # The commit (and its fsync) runs with the GIL released: the loop goes on meanwhile.
                for i, b in enumerate(batches):
                    if b.revives is not None and i not in fenced:
                        broken.discard(b.revives)
                return refused, fenced
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.MapResizedError:  # another process sharing the log grew the map
                self._adopt_map()

    def _screen(self, txn: lmdb.Transaction, batches: list[_Batch], fenced: set[int]) -> None:
        """Refuse batches this process may no longer write (a shared log checks its leases here)."""

    @contextlib.contextmanager
    def _loop_held(self) -> Iterator[None]:
        """Hold the event loop still while this thread puts a group's records (a group the loop
        parked itself for when it handed it over needs none: see ``_hand_over``).

        py-lmdb releases the GIL around every single put and takes it back after, so beside a
        busy loop each record waits for the loop's thread to let go of the GIL: a group of
        3,000 token events took 50-80 ms to put instead of ~5 (``bench/lmdb_gil.py``), and
        every event waited for it. Parked in a callback that waits on an event (the GIL free),
        the loop loses only the few milliseconds of the puts. Both waits are bounded: a loop
        that does not get to the callback soon, or puts that take long (a cold map read from
        disk), go on side by side as before, so the loop never stands still for long.
        """
        # Two bare locks, each taken here and given back by the other thread once: the signals
        # threading.Event gives, without its Condition's Python code (at a few hundred commits a
        # second, the two Events were ~10% of the loop's Python time).
        loop, parked, release = self._loop, threading.Lock(), threading.Lock()
        parked.acquire()
        release.acquire()

        def park() -> None:
            parked.release()  # the loop is here: the puts may begin
            release.acquire(timeout=_LOOP_HOLD_LIMIT)  # until they are done, or the limit

        try:
            assert loop is not None
            loop.call_soon_threadsafe(park)
        except RuntimeError:  # the loop is closed (shutdown): nothing to hold
            yield
            return
        parked.acquire(timeout=_LOOP_PARK_WAIT)
        try:
            yield
        finally:
            release.release()

    def _apply(self, txn: lmdb.Transaction, batches: list[_Batch], broken: set[str], refused: set[int]) -> None:
        top = 0
        revived: set[str] = set()
        metas: dict[str, StreamMeta | None] = {}
        spared: set[str] = set()  # chosen by retention, but opened again by another process since
        cold: set[str] = set()  # streams whose metadata changed beyond its counters: written now
        puts: list[tuple[bytes, bytes]] = []
        for i, b in enumerate(batches):
            if i in refused:
                continue
            if b.key is not None and b.key in broken and not b.revive and b.key not in revived:
                refused.add(i)
                continue
            if b.revives is not None:
                revived.add(b.revives)
            if b.drop_keys or b.drop_prefixes:
                self._put_events(txn, puts)  # what came before a drop is written before it
            for k in b.drop_keys:
                txn.delete(k, db=self._events_db)
            for prefix in b.drop_prefixes:
                if not self._may_drop(txn, prefix):
                    spared.add(prefix[:-1].decode())
                    continue
                cur = txn.cursor(db=self._events_db)
                if cur.set_range(prefix):
                    while bytes(cur.key()).startswith(prefix):
                        if not cur.delete():
                            break
            puts += b.events
            metas.update(b.metas)
            if not b.hot:
                cold.update(b.metas)
            top = max(top, b.seq)
        self._put_events(txn, puts)  # one call for the group's records: a call per chunk cost more than the copy
        # A stream's metadata is written once per group, as its last batch left it: with many
        # small chunks per stream in a group, encoding every intermediate snapshot was most of
        # the writer's time under the GIL.
        for key, meta in metas.items():
            if meta is None:
                if key not in spared:
                    txn.delete(key.encode(), db=self._streams_db)
                self._meta_written.pop(key, None)
            elif key in cold or self._meta_due(key, meta):
                txn.put(key.encode(), meta.to_bytes(), db=self._streams_db)
                self._meta_written[key] = meta.count
        if top:
            self._store_seq(txn, top)
        self._applied(txn, batches, refused)

    def _may_drop(self, txn: lmdb.Transaction, prefix: bytes) -> bool:
        """Whether a stream retention chose may still go (a shared log: nobody re-opened it since)."""
        return True

    def _meta_due(self, key: str, meta: StreamMeta) -> bool:
        """Whether a group that only appended to ``key`` writes its metadata (the writer thread's
        own count of what it last wrote; a shared log writes it every time, see there)."""
        return meta.count - self._meta_written.get(key, -_META_EVERY) >= _META_EVERY

    def _store_seq(self, txn: lmdb.Transaction, top: int) -> None:
        txn.put(_SEQ_KEY, str(top).encode(), db=self._meta_db)

    def _applied(self, txn: lmdb.Transaction, batches: list[_Batch], refused: set[int]) -> None:
        """The group's writes are in ``txn`` (a shared log adds the size held)."""

    def _put_events(self, txn: lmdb.Transaction, puts: list[tuple[bytes, bytes]]) -> None:
        if puts:
            txn.cursor(db=self._events_db).putmulti(puts, dupdata=False, overwrite=True)
            puts.clear()

    def _probe(self, nbytes: int) -> bool:
        """A real write of ``nbytes``, undone at once: True when storage takes writes again."""
        assert self._env is not None
        try:
            with self._env.begin(write=True) as txn:
                txn.put(_PROBE_KEY, b"\0" * nbytes, db=self._meta_db)
            with self._env.begin(write=True) as txn:
                txn.delete(_PROBE_KEY, db=self._meta_db)
        except lmdb.MapFullError:
            try:
                self._grow_map()
            except lmdb.Error as exc:  # the writer thread must live on: it is what probes again
                log.warning("event log map could not grow: %s", exc)
            return False
        except lmdb.MapResizedError:  # another process sharing the log grew the map: the next probe can tell
            self._adopt_map()
            return False
        except lmdb.Error as exc:
            log.debug("storage probe failed: %s", exc)
            return False
        log.info("event log storage takes writes again")
        self._report([], set(), set(), None, 0.0, recovered=True)
        return True

    def _adopt_map(self) -> None:
        assert self._env is not None
        self._rw.acquire_write()
        try:
            self._env.set_mapsize(0)  # 0: the size the file's header says (another process grew it)
        finally:
            self._rw.release_write()

    def _grow_map(self) -> None:
        assert self._env is not None
        new_size = self._env.info()["map_size"] * 2
        self._rw.acquire_write()
        try:
            self._env.set_mapsize(new_size)
        finally:
            self._rw.release_write()
        log.info("event log map grown to %d bytes", new_size)

    # --- back on the loop --------------------------------------------------------------------

    def _resolve(self, group: list[_Batch], refused: set[int], fenced: set[int], error: BaseException | None,
                 seconds: float, recovered: bool) -> None:
        # In submission order: a stream's commits resolve (and publish) in the order they were made.
        if group and self._on_commit is not None:  # the events committed: refused batches are not
            self._on_commit(sum(b.count for i, b in enumerate(group) if i not in refused), seconds, error is None)
        if group:
            self._committing = False
        if error is not None:
            self.health.fail(f"{error.__class__.__name__}: {error}")
        elif recovered:
            self.health.recovered()
        for i, b in enumerate(group):
            failed = error is not None or i in refused
            if failed:
                self._fail_batch(b, error)
            else:
                self._apply_committed(b)
            if i in fenced and b.key is not None:
                self._fenced(b.key)
            fut, settled = b.future, b.settled
            if settled is not None:
                _tell(settled, self._outcome(b, i in fenced, failed))
            elif fut is not None and not fut.done():
                outcome = self._outcome(b, i in fenced, failed)
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
        if group:
            self._mark_recent()
            self._committed(group)
            self._hand_over()  # what came while this group committed: the next group, at once

    def _outcome(self, b: _Batch, fenced: bool, failed: bool) -> Any:
        if fenced:
            return ClaimLost(f"stream {b.key} is captured by another gateway process now")
        if failed:
            return StorageError(f"commit failed: {self.failure or 'the stream stopped at a failed commit'}")
        return b.result

    def _fenced(self, key: str) -> None:
        """Another process captures ``key`` now (a shared log only)."""

    def _committed(self, group: list[_Batch]) -> None:
        """A group is committed and its futures resolved (a shared log tells the other processes)."""

    def _apply_committed(self, b: _Batch) -> None:
        for key, meta in b.metas.items():
            old = self._metas.get(key)
            if meta is None:
                continue  # dropped: already gone from the snapshots
            if old is None and not b.revive:
                continue  # evicted meanwhile
            self._size += meta.size - (old.size if old is not None else 0)
            self._metas[key] = meta
            if key == b.key and b.result:  # the stream's own events: its followers get them now
                self._feeds.deliver(key, Batch("events", b.result, old.head if old is not None else 0, b.nbytes))
            ended = key == b.key and not meta.open and (old is None or old.open)
            if ended:
                self._feeds.deliver(key, Batch("end", prev=meta.head))
            if self._announcing and key == b.key and (b.result or ended):
                self._announce(key, old.head if old is not None else 0, meta.head, b.nbytes, ended)

    def _announce(self, key: str, prev: int, head: int, nbytes: int, ended: bool) -> None:
        """A stream's commit, for the other processes sharing the log (a shared log only)."""

    def _fail_batch(self, b: _Batch, error: BaseException | None) -> None:
        if b.trimmed:
            self._undo_trims(b.trimmed)
        for meta in b.dropped:  # still on disk: held, counted and evicted again at the next sweep
            if meta.key not in self._metas:
                self._metas[meta.key] = meta
                self._size += meta.size
        if b.key is None or b.trimmed:
            return  # retention's write: the stream lost nothing, and may take its next batches
        self._broken.add(b.key)
        # Nothing of this batch (or of later ones for the stream) is stored: back to what is.
        committed = self._metas.get(b.key)
        if committed is None:
            self._staged.pop(b.key, None)
        else:
            self._staged[b.key] = committed

    def _undo_trims(self, trimmed: dict[str, tuple[int, int, str | None, str | None]]) -> None:
        """A trim did not commit: the records it dropped are still there. The stream's staged metadata
        and the batches waiting to commit after it (staged on the trimmed metadata) count them again,
        or the next append would commit a size and first seq without them, and the next sweep would
        drop their bytes from the size a second time. A session's trim marks go back to what they were
        (marks of events still held would hide the trimmed ones from its next re-join)."""
        def undone(meta: StreamMeta, size: int, first: int, marks: tuple[str | None, str | None]) -> StreamMeta:
            return replace(meta, size=meta.size + size, first_seq=min(meta.first_seq, first),
                           trimmed_from=marks[0], trimmed_to=marks[1])

        for key, (size, first, *was) in trimmed.items():
            marks = (was[0], was[1])
            staged = self._staged.get(key)
            if staged is not None:
                self._staged[key] = undone(staged, size, first, marks)
            for later in self._outbox:
                meta = later.metas.get(key)
                if meta is not None:
                    later.metas[key] = undone(meta, size, first, marks)

    # --- reads -------------------------------------------------------------------------------

    async def read(self, key: str, after: int, upto: int, limit: int,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Entry]:
        if after >= upto or not self._holds(key):
            return []
        if self._hot(key, after, max_bytes):
            # What a live stream just committed (a new stream's first client reads its first
            # events so; a client back after a short drop, the few it missed) is in the page
            # cache: read here, not on the executor, whose round trip is two loop turns, tens of
            # ms each at saturation, on every new stream's first event.
            return self._read_sync(key, after, upto, limit, max_bytes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._read_sync, key, after, upto, limit, max_bytes)

    def _hot(self, key: str, after: int, max_bytes: int) -> bool:
        """Whether the records after ``after`` are among the last a live stream wrote lately."""
        meta = self._metas.get(key)
        if meta is None or not meta.open:
            return False
        if max_bytes <= _HOT_PAGE_BYTES and key in self._staged:
            now = time.monotonic()
            for at, seq in self._recent:  # every record after ``after`` was staged here since then
                if after >= seq and now - at <= _HOT_SECONDS:
                    return True
        # Seqs are the log's, shared by every stream: the events after ``after`` are at most as
        # many as the seqs after it, and at most as many as the stream holds.
        return (min(meta.count, meta.head - after) <= _HOT_EVENTS
                and time.time() - meta.updated_at < _HOT_SECONDS)

    def _mark_recent(self) -> None:
        """After a commit, at most every _HOT_SECONDS / 2: the seq staged by then, so that while the
        log is written one of the two marks kept is between _HOT_SECONDS / 2 and _HOT_SECONDS old."""
        now = time.monotonic()
        older, newer = self._recent
        if now - newer[0] >= _HOT_SECONDS / 2:
            self._recent = (newer, (now, self._seq))

    def _read_sync(self, key: str, after: int, upto: int, limit: int,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Entry]:
        """At most ``limit`` events, whose bodies come to at most ``max_bytes`` (one at least)."""
        prefix = _prefix(key)
        plen = len(prefix)
        out: list[Entry] = []
        room = max_bytes
        start = prefix + (after + 1).to_bytes(8, "big")
        with self._snapshot(db=self._events_db, buffers=False) as txn:
            cur = txn.cursor()
            found = _seek_holding(cur, prefix, start)
            while found:
                k, v = cur.item()
                if not k.startswith(prefix):
                    break
                first = int.from_bytes(k[plen:], "big")
                if first > upto:
                    break
                got, used, full = record_page(first, v, after, upto, limit - len(out), room, not out)
                out += got
                room -= used
                if full or len(out) >= limit:
                    break
                found = cur.next()
        return out

    async def tail(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        if not self._holds(key):
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._tail_sync, key, limit)

    def _tail_sync(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        prefix = _prefix(key)
        out: list[tuple[str | None, bytes]] = []
        budget = _TAIL_BYTES
        with self._snapshot(db=self._events_db) as txn:
            cur = txn.cursor()
            # Position just past the stream's last record, then walk backwards.
            ok = cur.prev() if cur.set_range(prefix + b"\xff" * 8) else cur.last()
            while ok and len(out) < limit and budget > 0:
                k, v = cur.item()
                if not k.startswith(prefix):
                    break
                batch = [(uid, body) for _seq, uid, body in decode(0, v)]
                out.extend(reversed(batch))
                budget -= len(v)
                ok = cur.prev()
        out = out[:limit]
        out.reverse()
        return out

    # --- retention ---------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - self._cfg.retention
        batch = _Batch()
        removed = self._evict(batch, cutoff)
        for meta in list(self._metas.values()):
            if meta.open and meta.endless:
                await self._trim(batch, meta.key, cutoff)
        if batch.metas or batch.drop_prefixes or batch.drop_keys:
            await self._submit(batch)
        if removed:
            log.info("retention removed %d streams; %d bytes held", removed, self._size)
        return removed

    def _evict(self, batch: _Batch, cutoff: float, exclude: str | None = None) -> int:
        """Drop what retention says goes (``to_evict``): gone from the snapshots at once."""
        doomed = to_evict(self._metas.values(), self._size, self._cfg.max_bytes, cutoff, exclude)
        for meta in doomed:
            self._drop(batch, meta)
        return len(doomed)

    def _make_room(self, key: str) -> bool:
        """At the budget as ``key`` begins: the oldest closed streams go now, whatever their age;
        whether ``key`` may begin."""
        batch = _Batch()
        if self._evict(batch, float("-inf"), key):
            self._submit(batch).add_done_callback(_log_failure)
        return self._size < self._cfg.max_bytes

    async def _trim(self, batch: _Batch, key: str, cutoff: float) -> None:
        """Drop the batches of an open stream appended before ``cutoff`` (a thread stream never closes)."""
        loop = asyncio.get_running_loop()
        session = (meta := self._staged.get(key)) is not None and meta.kind == "session"
        keys, size, next_seq, uids = await loop.run_in_executor(None, self._old_records, key, cutoff, session)
        staged = self._staged.get(key)
        if not keys or staged is None or key in self._broken:
            return
        batch.drop_keys.extend(keys)
        batch.size_delta -= size
        batch.trimmed[key] = (size, staged.first_seq, staged.trimmed_from, staged.trimmed_to)
        trimmed = trim_marks(staged, uids) if session else staged
        self._staged[key] = batch.metas[key] = replace(trimmed, size=staged.size - size, first_seq=next_seq)

    def _old_records(self, key: str, cutoff: float,
                     session: bool = False) -> tuple[list[bytes], int, int, list[str | None]]:
        """The records of ``key`` appended before ``cutoff``: their keys, bytes, the seq after them, and
        (``session``) the upstream ids of their events, oldest first (``trim_marks``)."""
        prefix = _prefix(key)
        limit_ms = int(cutoff * 1000)
        keys: list[bytes] = []
        size = 0
        uids: list[str | None] = []
        last: tuple[bytes, bytes] | None = None
        if self._env is None:
            return [], 0, 0, []
        with self._snapshot(db=self._events_db, buffers=False) as txn:
            cur = txn.cursor()
            found = cur.set_range(prefix)
            while found:
                k, v = cur.item()
                if not k.startswith(prefix) or record_time_ms(v) >= limit_ms:
                    break
                keys.append(k)
                size += len(k) + len(v)
                last = (k, v)
                if session:
                    uids.extend(uid for _seq, uid, _body in decode(int.from_bytes(k[len(prefix):], "big"), v))
                found = cur.next()
        if last is None:
            return [], 0, 0, []
        # Only the newest dropped record says where the stream now starts.
        next_seq = decode(int.from_bytes(last[0][len(prefix):], "big"), last[1])[-1][0] + 1
        return keys, size, next_seq, uids

    def _drop(self, batch: _Batch, meta: StreamMeta) -> None:
        # Gone from the snapshots at once: nobody starts reading a stream that is being deleted.
        del self._metas[meta.key]
        self._staged.pop(meta.key, None)
        self._size -= meta.size
        batch.drop_prefixes.append(_prefix(meta.key))
        batch.metas[meta.key] = None
        batch.dropped.append(meta)


def caught_up(txn: lmdb.Transaction, events_db: Any, meta: StreamMeta) -> StreamMeta:
    """``meta`` as the stream's last commit left it: the counters of the records past its head
    added (an open stream's metadata lags them, see the module's doc); ``meta`` itself when none."""
    if not meta.open:
        return meta
    prefix = _prefix(meta.key)
    cur = txn.cursor(db=events_db)
    if not cur.set_range(prefix + (meta.head + 1).to_bytes(8, "big")):
        return meta
    head, count, size, uid, at = meta.head, meta.count, meta.size, meta.last_upstream_id, 0.0
    name = meta.last_event or ""
    try:
        for k, v in cur.iternext():
            k, v = bytes(k), bytes(v)
            if not k.startswith(prefix):
                break
            events = decode(int.from_bytes(k[len(prefix):], "big"), v)
            head, count, size = events[-1][0], count + len(events), size + len(k) + len(v)
            uid = next((u for _s, u, _b in reversed(events) if u), None) or uid
            name, at = event_name(events[-1][2]).decode("utf-8", "replace"), record_time_ms(v) / 1000
    except (StorageDamaged, *_DAMAGE):  # as far as the records can be read: reading the stream says the rest
        pass
    if not at:
        return meta
    return meta.advanced(head, count, size, uid, name, at)


def _seek_holding(cur: lmdb.Cursor, prefix: bytes, start: bytes) -> bool:
    """Put ``cur`` on the record of the stream ``prefix`` that holds the seq ``start`` names (a
    record's key is its first seq, so it may start before it), or on the first one after it."""
    found = cur.set_range(start)
    if found and cur.key() == start:
        return True
    found = cur.prev() if found else cur.last()
    if found and bytes(cur.key()).startswith(prefix):
        return True
    return bool(cur.set_range(start))


def _tell(settled: Settled, outcome: list[Entry] | BaseException) -> None:
    try:
        settled(outcome)
    except Exception:  # a caller's bug: the rest of the group is still told
        log.exception("a commit's settled callback raised")


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background event log write failed: %s", fut.exception())


class LmdbView:
    """A data directory read-only (LMDB gives readers a consistent snapshot while a gateway writes).

    Whatever goes wrong reading it is a ``StorageError`` naming the file (``StorageDamaged`` when
    what is on disk is not what the gateway wrote): an operator reads one line, never LMDB's own
    exception, and a listing the file cannot give whole is an error, never a short one.
    """

    def __init__(self, path: Path) -> None:
        self.where = str(path / "data.mdb")
        try:
            verify_file(path)
            if not (path / "data.mdb").exists():
                raise StorageError(f"{path}: no event log here (no data.mdb)")
        except OSError as exc:  # not a directory, not readable: one line, as every other failure
            raise StorageError(f"{path}: cannot read the event log here ({exc.strerror})") from None
        with self._reading("the databases"):
            self._env = lmdb.open(str(path), readonly=True, max_dbs=4, lock=True, readahead=False)
            self._events = self._env.open_db(b"events", create=False)
            self._streams = self._env.open_db(b"streams", create=False)
            self._meta = self._env.open_db(b"meta", create=False)
        self._path = path

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        try:
            yield
        except (*_DAMAGE, StorageDamaged) as exc:  # LMDB's pages, or a record that does not decode
            raise StorageDamaged(f"{self.where}: damaged, reading {what}: {exc}") from None
        except lmdb.Error as exc:
            raise StorageError(f"{self.where}: cannot read {what}: {exc}") from None

    def metas(self) -> list[StreamMeta]:
        """Every stream's metadata, in key order; all of them or StorageDamaged."""
        out = []
        with self._reading("the stream list"), self._env.begin(db=self._streams) as txn:
            for k, v in txn.cursor():
                try:
                    meta = StreamMeta.from_bytes(v)
                except StorageDamaged as exc:
                    raise StorageDamaged(f"stream record {bytes(k)[:80]!r}: {exc}") from None
                out.append(caught_up(txn, self._events, meta))  # a running gateway's may lag its records
            held = txn.stat(self._streams)["entries"]
            if len(out) != held:  # a damaged page can end a cursor early without an error
                raise StorageDamaged(f"{held} streams recorded, {len(out)} readable")
        return out

    def meta(self, key: str) -> StreamMeta | None:
        with self._reading(f"stream {key}"), self._env.begin(db=self._streams) as txn:
            raw = txn.get(key.encode())
            return caught_up(txn, self._events, StreamMeta.from_bytes(raw)) if raw is not None else None

    def records(self, key: str, upto: int | None = None, after: int = 0) -> Iterator[Record]:
        prefix = key.encode() + b"\x00"
        start = prefix + (after + 1).to_bytes(8, "big") if after > 0 else prefix
        with self._reading(f"the events of {key}"), self._env.begin(db=self._events, buffers=False) as txn:
            cur = txn.cursor()
            found = _seek_holding(cur, prefix, start) if after > 0 else cur.set_range(start)
            while found:
                k, v = cur.item()
                if not k.startswith(prefix):
                    break
                first = int.from_bytes(k[len(prefix):], "big")
                if upto is not None and first > upto:
                    break
                events = decode(first, v)
                if events[-1][0] > after:  # the seek may land on the record before: it holds none of these
                    yield Record(first, record_time_ms(v), events, len(k) + len(v))
                found = cur.next()

    def counter(self) -> int:
        with self._reading("the id counter"), self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"seq")
        if raw is None or not raw.isdigit():
            raise StorageDamaged(f"{self.where}: the seq record is missing or damaged")
        return int(raw)

    def orphan_keys(self) -> set[str]:
        """Stream keys that have records but no metadata (one snapshot: a writer beside it cannot
        make a stream look half-written)."""
        keys: set[str] = set()
        with self._reading("the event keys"), self._env.begin() as txn:
            for k in txn.cursor(db=self._events).iternext(keys=True, values=False):
                keys.add(bytes(k).split(b"\x00", 1)[0].decode("utf-8", "replace"))
            known = {bytes(k).decode() for k in txn.cursor(db=self._streams).iternext(keys=True, values=False)}
        return keys - known

    def close(self) -> None:
        self._env.close()


# LMDB's errors for pages that are not what it wrote.
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError, lmdb.BadValsizeError)
