"""The embedded event log: LMDB, one writer thread, group commit.

Layout (named databases in one environment):
- ``events``: one record per appended batch (a chunk's events):
  ``<stream key> NUL <first seq: 8 bytes big-endian>`` -> ``<u64 unix ms>`` then for
  each event ``<u32 body length><u16 id length><upstream id><body>``; seqs in a
  batch are consecutive, so one LMDB put carries a whole chunk. The time lets
  retention trim the old part of a thread stream that never closes.
- ``streams``: ``<stream key>`` -> StreamMeta as JSON
- ``meta``: ``seq`` -> the last seq handed out (so seqs are never reused)

Seqs and metadata are assigned on the event loop, in call order; the writer
thread only applies staged batches. It drains everything queued into one write
transaction and commits once, so one fsync covers every stream that had events
waiting (group commit). Futures resolve after the commit: nothing reaches a
client before it is on disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import lmdb

from gateway.config import Storage
from gateway.eventlog.base import Entry, EventLog, StorageError, StorageFull, StreamMeta
from gateway.sse import Event

log = logging.getLogger("gateway.eventlog")

_EVENT_HEAD = struct.Struct(">IH")  # body length, upstream id length
_RECORD_TIME = struct.Struct(">Q")  # unix ms the batch was appended
_SEQ_KEY = b"seq"
_READ_PAGE_BYTES = 4 << 20

# Called on the loop after each commit group: (events, seconds, ok). Metrics hook.
CommitObserver = Callable[[int, float, bool], None]


@dataclass(slots=True)
class _Batch:
    """Writes staged on the loop for one commit group."""

    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    metas: dict[bytes, bytes | None] = field(default_factory=dict)  # None deletes
    drop_prefixes: list[bytes] = field(default_factory=list)
    drop_keys: list[bytes] = field(default_factory=list)
    seq: int = 0
    count: int = 0  # events in the records above (metrics)


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


def _decode(first: int, value: bytes) -> list[tuple[int, str | None, bytes]]:
    """The events of one batch record: (seq, upstream id, body)."""
    out: list[tuple[int, str | None, bytes]] = []
    unpack = _EVENT_HEAD.unpack_from
    i, n, seq = _RECORD_TIME.size, len(value), first
    while i < n:
        blen, ulen = unpack(value, i)
        i += 6
        uid = value[i:i + ulen].decode() if ulen else None
        i += ulen
        out.append((seq, uid, value[i:i + blen]))
        i += blen
        seq += 1
    return out


class LmdbEventLog(EventLog):
    def __init__(self, cfg: Storage, *, on_commit: CommitObserver | None = None) -> None:
        self._cfg = cfg
        self._env: lmdb.Environment | None = None
        self._events_db: Any = None
        self._streams_db: Any = None
        self._meta_db: Any = None
        self._metas: dict[str, StreamMeta] = {}
        self._seq = 0
        self._size = 0
        self._queue: queue.SimpleQueue[tuple[_Batch, asyncio.Future[Any], Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rw = _RWLock()
        self._on_commit = on_commit
        self._lock_fd: int | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._open_sync)
        self._writer = threading.Thread(target=self._write_loop, name="eventlog-writer", daemon=True)
        self._writer.start()

    def _open_sync(self) -> None:
        path = self._cfg.path
        try:
            os.makedirs(path, exist_ok=True)
            self._take_dir_lock(path)
            sync = self._cfg.durability == "fsync"
            self._env = lmdb.open(
                str(path), map_size=self._cfg.map_size, max_dbs=4, max_readers=512,
                sync=sync, metasync=sync, readahead=False, lock=True,
            )
            self._events_db = self._env.open_db(b"events")
            self._streams_db = self._env.open_db(b"streams")
            self._meta_db = self._env.open_db(b"meta")
            with self._env.begin() as txn:
                raw = txn.get(_SEQ_KEY, db=self._meta_db)
                self._seq = int(raw) if raw else 0
                for k, v in txn.cursor(db=self._streams_db):
                    meta = StreamMeta.from_bytes(v)
                    self._metas[meta.key] = meta
                    self._size += meta.size
                    self._seq = max(self._seq, meta.head)
        except (lmdb.Error, OSError) as exc:
            raise StorageError(f"open event log at {path}: {exc}") from exc
        log.info("event log open at %s: %d streams, %d bytes, next seq %d",
                 path, len(self._metas), self._size, self._seq + 1)

    def _take_dir_lock(self, path: os.PathLike[str] | str) -> None:
        # LMDB itself allows several processes; two gateways on one log would both hand out
        # the same seqs and both re-attach the same streams. One owner per data directory.
        fd = os.open(os.path.join(path, "gateway.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"data directory {path} is in use by another gateway process") from None
        self._lock_fd = fd

    async def close(self) -> None:
        if self._writer is not None:
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- metadata ----------------------------------------------------------------------------

    def get(self, key: str) -> StreamMeta | None:
        return self._metas.get(key)

    def streams(self) -> Iterable[StreamMeta]:
        return list(self._metas.values())

    @property
    def size(self) -> int:
        return self._size

    @property
    def last_seq(self) -> int:
        return self._seq

    def accepting(self, key: str | None = None) -> bool:
        # Same rule as begin(): the stream being (re)started is never evicted to make room for itself.
        return self._size < self._cfg.max_bytes or any(not m.open and m.key != key for m in self._metas.values())

    def begin(self, meta: StreamMeta) -> StreamMeta:
        existing = self._metas.get(meta.key)
        if self._size >= self._cfg.max_bytes:
            self._evict_to_budget(exclude=meta.key)
            if self._size >= self._cfg.max_bytes:
                raise StorageFull(
                    f"event log is at its budget ({self._size} of {self._cfg.max_bytes} bytes) "
                    "and every stream held is still live")
        if existing is not None:
            existing.open = True
            existing.end = None
            existing.path = meta.path
            existing.resumable = existing.resumable or meta.resumable
            if meta.auth_digest is not None:
                existing.auth_salt, existing.auth_digest = meta.auth_salt, meta.auth_digest
            existing.updated_at = time.time()
            meta = existing
        self._metas[meta.key] = meta
        # Queued now, so it commits before (or with) the stream's first events.
        self._submit_background(_Batch(metas={meta.key.encode(): meta.to_bytes()}, seq=0))
        return meta

    def _submit_background(self, batch: _Batch) -> None:
        fut = self._submit(batch)
        fut.add_done_callback(_log_failure)

    # --- writes ------------------------------------------------------------------------------

    def _stage_events(self, batch: _Batch, meta: StreamMeta, events: Sequence[Event]) -> list[Entry]:
        if not events:
            return []
        first = self._seq + 1
        entries: list[Entry] = []
        parts: list[bytes] = []
        pack = _EVENT_HEAD.pack
        last_uid = meta.last_upstream_id
        seq = first
        for body, uid in events:
            if uid is None:
                parts += (pack(len(body), 0), body)
            else:
                ub = uid.encode()
                parts += (pack(len(body), len(ub)), ub, body)
                last_uid = uid
            entries.append((seq, body))
            seq += 1
        key = _prefix(meta.key) + first.to_bytes(8, "big")
        now = time.time()
        value = _RECORD_TIME.pack(int(now * 1000)) + b"".join(parts)
        batch.events.append((key, value))
        batch.count += len(entries)
        added = len(key) + len(value)
        self._seq = batch.seq = seq - 1
        meta.head = seq - 1
        meta.count += len(entries)
        meta.size += added
        meta.last_upstream_id = last_uid
        meta.updated_at = now
        self._size += added
        return entries

    def submit(self, key: str, events: Sequence[Event]) -> asyncio.Future[list[Entry]]:
        return self._stage_and_submit(key, events, end=False, end_reason=None)

    async def finish(self, key: str, end: str | None, events: Sequence[Event] = ()) -> list[Entry]:
        return await self._stage_and_submit(key, events, end=True, end_reason=end)

    def _stage_and_submit(self, key: str, events: Sequence[Event], *, end: bool,
                          end_reason: str | None) -> asyncio.Future[list[Entry]]:
        meta = self._metas.get(key)
        if meta is None:
            raise StorageError(f"stream {key} is not held (evicted or never begun)")
        batch = _Batch()
        entries = self._stage_events(batch, meta, events)
        if end:
            meta.open = False
            meta.end = end_reason
            meta.updated_at = time.time()
        batch.metas[key.encode()] = meta.to_bytes()
        return self._submit(batch, entries)

    def _submit(self, batch: _Batch, result: Any = None) -> asyncio.Future[Any]:
        if self._writer is None or self._loop is None:
            raise StorageError("event log is closed")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((batch, fut, result))
        return fut

    def _write_loop(self) -> None:
        q = self._queue
        stopping = False
        while not stopping:
            item = q.get()
            group: list[tuple[_Batch, asyncio.Future[Any], Any]] = []
            if item is None:
                stopping = True
            else:
                group.append(item)
            while True:  # drain: everything queued now shares one commit
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    group.append(item)
            if not group:
                continue
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                self._commit_group([item[0] for item in group])
            except BaseException as exc:  # reported to every waiter; the thread lives on
                log.exception("event log commit failed")
                error = exc
            elapsed = time.perf_counter() - started
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._resolve, [(f, r) for _, f, r in group], error,
                                                sum(item[0].count for item in group), elapsed)
            except RuntimeError:  # loop already closed at shutdown
                pass

    def _commit_group(self, batches: list[_Batch]) -> None:
        assert self._env is not None
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    self._apply(txn, batches)
                return
            except lmdb.MapFullError:
                self._grow_map()

    def _apply(self, txn: lmdb.Transaction, batches: list[_Batch]) -> None:
        top = 0
        for b in batches:
            for k in b.drop_keys:
                txn.delete(k, db=self._events_db)
            for prefix in b.drop_prefixes:
                cur = txn.cursor(db=self._events_db)
                if cur.set_range(prefix):
                    while bytes(cur.key()).startswith(prefix):
                        if not cur.delete():
                            break
            if b.events:
                txn.cursor(db=self._events_db).putmulti(b.events, dupdata=False, overwrite=True)
            for k, v in b.metas.items():
                if v is None:
                    txn.delete(k, db=self._streams_db)
                else:
                    txn.put(k, v, db=self._streams_db)
            top = max(top, b.seq)
        if top:
            txn.put(_SEQ_KEY, str(top).encode(), db=self._meta_db)

    def _grow_map(self) -> None:
        assert self._env is not None
        new_size = self._env.info()["map_size"] * 2
        self._rw.acquire_write()
        try:
            self._env.set_mapsize(new_size)
        finally:
            self._rw.release_write()
        log.info("event log map grown to %d bytes", new_size)

    def _resolve(self, futures: list[tuple[asyncio.Future[Any], Any]], error: BaseException | None,
                 events: int, seconds: float) -> None:
        # In submission order: a stream's commits resolve (and publish) in the order they were made.
        if self._on_commit is not None:
            self._on_commit(events, seconds, error is None)
        for f, result in futures:
            if f.done():
                continue
            if error is None:
                f.set_result(result)
            else:
                f.set_exception(StorageError(f"commit failed: {error}"))

    # --- reads -------------------------------------------------------------------------------

    async def read(self, key: str, after: int, upto: int, limit: int) -> list[Entry]:
        if after >= upto or key not in self._metas:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._read_sync, key, after, upto, limit)

    def _read_sync(self, key: str, after: int, upto: int, limit: int) -> list[Entry]:
        prefix = _prefix(key)
        plen = len(prefix)
        out: list[Entry] = []
        budget = _READ_PAGE_BYTES
        self._rw.acquire_read()
        try:
            env = self._env
            if env is None:
                raise StorageError("event log is closed")
            with env.begin(db=self._events_db, buffers=False) as txn:
                cur = txn.cursor()
                # The batch holding seq after+1 may start before it: step back one record.
                found = cur.set_range(prefix + (after + 1).to_bytes(8, "big"))
                if not (found and cur.key() == prefix + (after + 1).to_bytes(8, "big")):
                    found = cur.prev() if found else cur.last()
                    if not (found and cur.key().startswith(prefix)):
                        found = cur.set_range(prefix + (after + 1).to_bytes(8, "big"))
                while found:
                    k, v = cur.item()
                    if not k.startswith(prefix):
                        break
                    first = int.from_bytes(k[plen:], "big")
                    if first > upto:
                        break
                    for seq, _uid, body in _decode(first, v):
                        if after < seq <= upto:
                            out.append((seq, body))
                    budget -= len(v)
                    if len(out) >= limit:
                        del out[limit:]
                        break
                    if budget <= 0:
                        break
                    found = cur.next()
        finally:
            self._rw.release_read()
        return out

    async def tail(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        if key not in self._metas:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._tail_sync, key, limit)

    def _tail_sync(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        prefix = _prefix(key)
        out: list[tuple[str | None, bytes]] = []
        self._rw.acquire_read()
        try:
            if self._env is None:
                raise StorageError("event log is closed")
            with self._env.begin(db=self._events_db) as txn:
                cur = txn.cursor()
                # Position just past the stream's last record, then walk backwards.
                ok = cur.prev() if cur.set_range(prefix + b"\xff" * 8) else cur.last()
                while ok and len(out) < limit:
                    k, v = cur.item()
                    if not k.startswith(prefix):
                        break
                    batch = [(uid, body) for _seq, uid, body in _decode(0, v)]
                    out.extend(reversed(batch))
                    ok = cur.prev()
        finally:
            self._rw.release_read()
        out = out[:limit]
        out.reverse()
        return out

    # --- retention ---------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - self._cfg.retention
        batch = _Batch()
        removed = 0
        for meta in list(self._metas.values()):
            if not meta.open and meta.updated_at < cutoff:
                self._drop(batch, meta)
                removed += 1
        removed += self._evict_to_budget(batch=batch)
        for meta in list(self._metas.values()):
            if meta.open and meta.kind == "thread":
                await self._trim(batch, meta, cutoff)
        if batch.metas or batch.drop_prefixes or batch.drop_keys:
            await self._submit(batch)
        if removed:
            log.info("retention removed %d streams; %d bytes held", removed, self._size)
        return removed

    def _evict_to_budget(self, *, batch: _Batch | None = None, exclude: str | None = None) -> int:
        """Drop the oldest closed streams until under budget; live ones are never touched."""
        if self._size < self._cfg.max_bytes:
            return 0
        own = batch is None
        batch = batch or _Batch()
        closed = sorted((m for m in self._metas.values() if not m.open and m.key != exclude),
                        key=lambda m: m.updated_at)
        removed = 0
        for meta in closed:
            if self._size < self._cfg.max_bytes:
                break
            self._drop(batch, meta)
            removed += 1
        if own and removed:
            self._submit_background(batch)
        return removed

    async def _trim(self, batch: _Batch, meta: StreamMeta, cutoff: float) -> None:
        """Drop the batches of an open stream appended before ``cutoff`` (a thread stream never closes)."""
        loop = asyncio.get_running_loop()
        keys, size, next_seq = await loop.run_in_executor(None, self._old_records, meta.key, cutoff)
        if not keys or self._metas.get(meta.key) is not meta:
            return
        batch.drop_keys.extend(keys)
        meta.size -= size
        self._size -= size
        meta.first_seq = next_seq
        batch.metas[meta.key.encode()] = meta.to_bytes()

    def _old_records(self, key: str, cutoff: float) -> tuple[list[bytes], int, int]:
        prefix = _prefix(key)
        limit_ms = int(cutoff * 1000)
        keys: list[bytes] = []
        size = 0
        last: tuple[bytes, bytes] | None = None
        self._rw.acquire_read()
        try:
            if self._env is None:
                return [], 0, 0
            with self._env.begin(db=self._events_db, buffers=False) as txn:
                cur = txn.cursor()
                found = cur.set_range(prefix)
                while found:
                    k, v = cur.item()
                    if not k.startswith(prefix) or _RECORD_TIME.unpack_from(v)[0] >= limit_ms:
                        break
                    keys.append(k)
                    size += len(k) + len(v)
                    last = (k, v)
                    found = cur.next()
        finally:
            self._rw.release_read()
        if last is None:
            return [], 0, 0
        # Only the newest dropped record says where the stream now starts.
        next_seq = _decode(int.from_bytes(last[0][len(prefix):], "big"), last[1])[-1][0] + 1
        return keys, size, next_seq

    def _drop(self, batch: _Batch, meta: StreamMeta) -> None:
        del self._metas[meta.key]
        self._size -= meta.size
        batch.drop_prefixes.append(_prefix(meta.key))
        batch.metas[meta.key.encode()] = None


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background event log write failed: %s", fut.exception())
