"""A shared event log on Redis Streams: any number of gateway replicas, one log.

Layout, every key under one hash tag (``{prefix}``, so a cluster keeps them in one slot):
- ``{p}:seq``: the seq counter for every stream. Created at the current time in
  microseconds when missing, so after Redis lost its data new ids stay above every
  id ever handed out.
- ``{p}:s:<key>``: a Redis Stream per captured stream, **one entry per committed
  batch**, its id the batch's first seq, field ``d`` the record (``records.py``),
  ``b`` its batch number and ``p`` the head before it (a retried append answers from them).
- ``{p}:m:<key>``: the stream's metadata, a hash of StreamMeta fields plus the
  owner's fencing token (``fence``) and its last applied batch number (``bno``).
- ``{p}:l:<key>``: the lease of the replica capturing it (``replica:token``), set
  NX with a TTL and renewed at a third of it. ``{p}:fence`` counts tokens.
- ``{p}:c:<key>``: the pub/sub channel its batches are published on.
- ``{p}:f:<key>``: which replicas have followers of it; ``{p}:r:<replica>`` says a
  replica is alive. ``{p}:open``: the open stream keys (a set). ``{p}:all``: every
  stream key, a sorted set with one score, so pages of it come in key order (``ZRANGE
  BYLEX``); a log from before holds a plain set, converted at start.
  ``{p}:size``: bytes held. ``{p}:sweeper``: the lease of the one replica sweeping.

Every append is one Lua script (``_APPEND``): it refuses a caller whose token is
not the stream's (a stalled former owner), ignores a batch number already applied
(a retry after a timeout never duplicates), refuses one that does not follow the
last applied (an earlier batch was lost: applying it would leave a hole), assigns seqs, adds the entry, updates
the metadata and publishes the batch with the head before it, so a follower that
missed one sees a gap and reads it from the stream. One writer task sends every
queued batch of every stream in one pipeline: one round trip per commit group.
``durability: fsync`` needs ``appendonly yes`` with ``appendfsync always`` (Redis
then writes and fsyncs before it answers); eviction must be off.
"""

from __future__ import annotations

import contextlib
import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import Storage, shown_url
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
    StorageDamaged,
    StorageError,
    StorageFull,
    StreamMeta,
    accepting,
    stop_tasks,
    to_evict,
    trim_marks,
)
from gateway.eventlog.records import decode, encode, entries_in, record_page, record_time_ms
from gateway.metrics import LeaseLoss
from gateway.sse import Event

log = logging.getLogger("gateway.eventlog.redis")

PROBE_INTERVAL = 1.0
# A replica's presence write Redis refused is tried again every PROBE_INTERVAL: for this long after
# Redis takes writes again, "nobody follows it elsewhere" may only mean a record not retried yet.
_PRESENCE_DOUBT = 2 * PROBE_INTERVAL
POOL_SIZE = 64  # connections to Redis per process: the writer, the feed, and reads share them
POOL_WAIT = 10.0  # seconds a read may wait for a free connection
_READ_PAGE_ENTRIES = 256  # stream entries (batches) per XRANGE call, at most
# A tail (a re-join's de-duplication window) stops after this many bytes of records, as a read does
# after its own budget (base.READ_PAGE_BYTES), as LMDB's do: of large state snapshots, thousands of
# events would be gigabytes in memory. Entries are asked for a few at a time until their size is known.
_TAIL_BYTES = 8 << 20
_FIRST_ENTRIES = 4
# Every key expires this long after its last write: a stream nobody touches for so long is
# gone even if retention never ran (a safety net, not the retention rule).
_SAFETY_TTL_MS = 7 * 24 * 3600 * 1000

# KEYS: seq, stream, meta, channel, size, open-set
# ARGV: token, bno, n, record, last_uid ("" none), last_event, now, end ("" | "done" | "interrupted" | "-"), writer, key
# Returns {first seq, the head before, bytes the log holds after (-1: nothing appended)}.
_APPEND = """
local fence = redis.call('HGET', KEYS[3], 'fence')
if not fence then return redis.error_reply('GONE stream not in the log') end
if fence ~= ARGV[1] then return redis.error_reply('FENCED another replica owns the stream') end
local bno = tonumber(ARGV[2])
local applied = tonumber(redis.call('HGET', KEYS[3], 'bno') or '0')
local n = tonumber(ARGV[3])
local head = redis.call('HGET', KEYS[3], 'head') or '0'
if bno <= applied then
  -- Applied by an earlier try whose reply was lost: answer as that try did. Its entry is among
  -- the newest (batches after it are this claim's, and there are applied - bno of them at most).
  if n == 0 then return {0, tonumber(head)} end
  for _, row in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', applied - bno + 1)) do
    local f, b, p = row[2], nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'b' then b = f[i + 1] elseif f[i] == 'p' then p = f[i + 1] end
    end
    if b == ARGV[2] then return {string.match(row[1], '^(%d+)'), p} end
  end
  return {-1, -1}
end
if bno ~= applied + 1 then return redis.error_reply('GAP batch ' .. bno .. ' follows ' .. applied) end
local first = 0
local total = -1
if n > 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', KEYS[1], string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  local last = redis.call('INCRBY', KEYS[1], n)
  first = last - n + 1
  redis.call('XADD', KEYS[2], string.format('%.0f', first) .. '-0', 'd', ARGV[4], 'b', ARGV[2], 'p', head)
  local added = string.len(ARGV[4]) + 24
  redis.call('HSET', KEYS[3], 'head', string.format('%.0f', last), 'updated_at', ARGV[7], 'last_event', ARGV[6])
  redis.call('HINCRBY', KEYS[3], 'count', n)
  redis.call('HINCRBY', KEYS[3], 'size', added)
  total = redis.call('INCRBY', KEYS[5], added)
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'last_upstream_id', ARGV[5]) end
end
redis.call('HSET', KEYS[3], 'bno', ARGV[2])
local kind = 'v'
if ARGV[8] ~= '' then
  local ending = ARGV[8]
  if ending == '-' then ending = '' end
  redis.call('HSET', KEYS[3], 'open', '0', 'end', ending, 'updated_at', ARGV[7])
  redis.call('SREM', KEYS[6], ARGV[10])
  kind = 'e'
end
redis.call('PEXPIRE', KEYS[2], __TTL__)
redis.call('PEXPIRE', KEYS[3], __TTL__)
if n > 0 or kind == 'e' then
  redis.call('PUBLISH', KEYS[4], kind .. '|' .. ARGV[9] .. '|' .. head .. '|' .. string.format('%.0f', first) .. '|' .. (n > 0 and ARGV[4] or ''))
end
return {first, tonumber(head), total}
""".replace("__TTL__", str(_SAFETY_TTL_MS))

# KEYS: lease, fence counter, meta.  ARGV: replica, ttl ms, nonce.  Returns the token, or nil when
# another holds it. The lease's value is "replica:nonce:token": a retry whose first try took the
# lease (its reply lost) gets that token back instead of a refusal.
_CLAIM = """
local mine = ARGV[1] .. ':' .. ARGV[3] .. ':'
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, #mine) == mine then return string.sub(cur, #mine + 1) end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], mine .. token, 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], 'fence', token, 'bno', '0') end
return token
"""

# KEYS: lease.  ARGV: value, ttl ms.  1 when still ours (renewed), 0 when lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: the replica's liveness key.  ARGV: ttl ms.  Returns 1, or the error Redis refused the SET
# with (maxmemory): the heartbeat is then kept by PEXPIRE, which Redis at maxmemory still takes, so a
# replica alive is never taken for dead because Redis is full, and its caller learns that Redis
# refuses writes (the one write an idle gateway makes: readiness says so before a client is refused).
_ALIVE = """
local ok = redis.pcall('SET', KEYS[1], '1', 'PX', ARGV[1])
if type(ok) == 'table' and ok.err then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return ok.err
end
return 1
"""

# KEYS: lease.  ARGV: value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Lua, with ``seq`` the counter as raised and KEYS[1] the stream's metadata: ids up to ``seq`` are not
# held but the ones the stream holds. Those appended since the last ``base`` become the held ones
# (``held_after`` to ``lost_after``); with none appended since, the held ones stay as they were.
_REBASE = """
local head_n = tonumber(redis.call('HGET', KEYS[1], 'head') or '0')
local base_n = tonumber(redis.call('HGET', KEYS[1], 'base') or '0')
if head_n > base_n then
  redis.call('HSET', KEYS[1], 'held_after', string.format('%.0f', base_n), 'lost_after', string.format('%.0f', head_n))
end
redis.call('HSET', KEYS[1], 'base', string.format('%.0f', seq))
"""

# KEYS: meta, lease, seq, open-set, all-set.  ARGV: lease value, token, now, ttl ms, then field/value
# pairs of a new stream. Starts (or restarts) a capture; refuses a caller whose lease another holds
# (one that vanished with nobody else holding it, say after Redis lost its data, is taken again).
_BEGIN = """
local PROGRESS = {head = true, count = true, size = true, first_seq = true, last_upstream_id = true,
                  last_event = true, lost_after = true, held_after = true, ['end'] = true, trimmed_from = true,
                  trimmed_to = true}
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return redis.error_reply('FENCED the claim on this stream was lost') end
if not cur then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4]) end
local key = redis.call('HGET', KEYS[1], 'key')
if key then
  redis.call('HSET', KEYS[1], 'open', '1', 'end', '', 'updated_at', ARGV[3], 'fence', ARGV[2], 'bno', '0')
  -- Begun again, maybe by a replica that never captured it: after Redis came back from an older
  -- snapshot only the replica that did knows which ids it handed out (``_MEND``). So every capture
  -- begun again draws its ids from above the current time in microseconds (above every id ever
  -- handed out, as a new counter starts), and ids above the head as held now, up to there, are
  -- not this stream's (``StreamMeta.lost``): a client holding one was sent an event Redis lost.
  local t = redis.call('TIME')
  local seq = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[3], string.format('%.0f', seq))
  __REBASE__
  for i = 5, #ARGV, 2 do
    local f = ARGV[i]
    if f == 'path' or f == 'auth_salt' or f == 'auth_digest' or (f == 'resumable' and ARGV[i + 1] == '1') then
      redis.call('HSET', KEYS[1], f, ARGV[i + 1])
    end
  end
else
  if redis.call('EXISTS', KEYS[3]) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', KEYS[3], string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  -- What the stream is, not how far it got: a capture begun again after Redis lost its data
  -- passes the stream as it stood; the log holds none of that now.
  for i = 5, #ARGV, 2 do
    if not PROGRESS[ARGV[i]] then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  end
  redis.call('HSET', KEYS[1], 'base', redis.call('GET', KEYS[3]), 'lost_after', '0', 'held_after', '0', 'fence',
             ARGV[2], 'bno', '0', 'created_at', ARGV[3], 'updated_at', ARGV[3], 'open', '1')
end
redis.call('SADD', KEYS[4], redis.call('HGET', KEYS[1], 'key'))
redis.call('ZADD', KEYS[5], 0, redis.call('HGET', KEYS[1], 'key'))
return redis.call('HGETALL', KEYS[1])
""".replace("__REBASE__", _REBASE.strip())

# KEYS: stream, meta, followers, all-set, open-set, size.  ARGV: key.  Removes a closed stream whole;
# one that is open again (re-captured since the sweep looked) is kept, and a retry after a lost
# reply finds nothing left to count twice (and says removed: it is).
_DROP = """
local size = redis.call('HGET', KEYS[2], 'size')
if size and redis.call('HGET', KEYS[2], 'open') == '1' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
if size then redis.call('DECRBY', KEYS[6], size) end
return 1
"""

# KEYS: stream, meta, size.  ARGV: min id kept, first seq kept, bytes the older entries hold, the
# trim marks (StreamMeta.trimmed_from, trimmed_to; '' for none), then what they were worked out from:
# the stream's first entry id and the marks as the caller read them. Trims an open thread stream; the
# bytes are uncounted only by the call that removed the entries. Another trim since the caller read
# (replicas sweep at once when Redis at maxmemory refuses the sweeper lease) makes it a no-op: the
# marks would leave out what that one trimmed, and the bytes be uncounted twice.
_TRIM = """
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if not head or head[1] ~= ARGV[6] then return 0 end
if (redis.call('HGET', KEYS[2], 'trimmed_from') or '') ~= ARGV[7]
   or (redis.call('HGET', KEYS[2], 'trimmed_to') or '') ~= ARGV[8] then return 0 end
if redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'first_seq', ARGV[2], 'trimmed_from', ARGV[4], 'trimmed_to', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'size', -tonumber(ARGV[3]))
redis.call('DECRBY', KEYS[3], ARGV[3])
return 1
"""

# KEYS: meta.  ARGV: field, value.  Sets a field of a stream still held (never creates a stray hash).
_FLAG = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# KEYS: meta, seq.  ARGV: the head this replica had acknowledged appends of the stream up to (0: none),
# the highest id it has seen.  Mends what Redis coming back from an older snapshot (or empty) broke:
# the counter, below ids handed out already, is raised above them (to the current time in
# microseconds, as a new counter starts); a stream whose head is below what was acknowledged lost
# those events, and the ids a client may hold of them are marked not held (``StreamMeta.lost``).
# Returns 1 when the stream was marked.
_MEND = """
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq < tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  seq = math.max(tonumber(ARGV[2]), tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[2], string.format('%.0f', seq))
end
local head = redis.call('HGET', KEYS[1], 'head')
if head and tonumber(ARGV[1]) > tonumber(head) then
  __REBASE__
  return 1
end
return 0
""".replace("__REBASE__", _REBASE.strip())

# KEYS: all.  Converts the stream index of a log from before (a plain set) to the sorted set.
_INDEX_SORTED = """
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then return 0 end
local keys = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
for _, k in ipairs(keys) do redis.call('ZADD', KEYS[1], 0, k) end
return #keys
"""

_INT_FIELDS = {"head", "count", "size", "first_seq", "base", "lost_after", "held_after"}
_FLOAT_FIELDS = {"created_at", "updated_at"}
_BOOL_FIELDS = {"resumable", "open", "cancel_on_orphan", "begun_partway"}
_META_FIELDS = {f.name for f in fields(StreamMeta)}


def _meta_from_hash(raw: dict[bytes, bytes]) -> StreamMeta | None:
    if not raw or b"key" not in raw:
        return None
    values: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        if name not in _META_FIELDS:
            continue
        text = v.decode("utf-8", "surrogateescape")
        if name in _INT_FIELDS:
            values[name] = int(text or 0)
        elif name in _FLOAT_FIELDS:
            values[name] = float(text or 0)
        elif name in _BOOL_FIELDS:
            values[name] = text == "1"
        else:
            values[name] = text or None
    return StreamMeta(**values)


def _meta_to_pairs(meta: StreamMeta) -> list[str]:
    out: list[str] = []
    for f in fields(StreamMeta):
        v = getattr(meta, f.name)
        if v is None:
            continue
        out += [f.name, ("1" if v else "0") if isinstance(v, bool) else (repr(v) if isinstance(v, float) else str(v))]
    return out


@dataclass(eq=False)
class _Claim:
    value: str  # "replica:token", the lease's value
    token: str
    bno: int = 0  # batch numbers this claim has handed out


@dataclass(eq=False)
class _Pending:
    key: str
    claim: _Claim
    bno: int
    n: int
    record: bytes
    last_uid: str | None
    last_event: str
    end: str  # "" (not ending), "done", "interrupted", "-" (thread stream released)
    bodies: list[bytes]
    nbytes: int
    future: asyncio.Future[list[Entry]]


class RedisEventLog(EventLog):
    def __init__(self, cfg: Storage, *, on_commit: CommitObserver | None = None, replica: str | None = None) -> None:
        self._cfg = cfg
        self._on_commit = on_commit
        self.replica = replica or uuid.uuid4().hex[:12]
        p = "{" + cfg.redis_prefix + "}:"
        self._p = p
        self._redis: aioredis.Redis | None = None
        self._feeds = LocalFeeds()
        self._claims: dict[str, _Claim] = {}
        # Releases on their way to Redis: a claim of the same stream here waits for its release, or
        # it would meet this process's own lease and be refused (the stream then captured by nobody).
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._queue: list[_Pending] = []
        # Streams a failed commit stopped: their later batches are refused until begin() (as on
        # LMDB), so a batch queued behind a lost one never lands after the hole it leaves.
        self._broken: set[str] = set()
        # Commit groups whose every try lost its connection (with the seconds they took): Redis may
        # have applied them. Their events are counted once Redis answers and says it did.
        self._unsure: list[tuple[list[_Pending], float]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.health = Health()
        self._closed = 0  # streams held that are closed (evictable), as of the last sweep
        self._probing: asyncio.Task[None] | None = None  # while commits fail: a write every PROBE_INTERVAL
        self._lost_callbacks: list[Callable[[str, LeaseLoss], None]] = []
        self._followed_here: dict[str, int] = {}  # presence to publish: key -> followers here
        self._presence_dirty: set[str] = set()
        self._presence_wake = asyncio.Event()
        self._presence_doubt_until = 0.0  # time.monotonic() until which presence elsewhere may be unrecorded
        self._pubsub: Any = None
        self._channels: dict[bytes, str] = {}  # subscribed channel -> stream key
        self._subscribed = asyncio.Event()
        self._live_channels: set[bytes] = set()  # subscriptions Redis has confirmed
        self._rejoin: set[bytes] = set()  # channels whose next confirmation follows a possible loss
        self._size = 0
        # What Redis must still hold, as this replica learnt it: the highest id it has seen, and per
        # stream the head its own appends were acknowledged up to (kept past a lost claim, until the
        # stream is released here). Redis below them came back from an older snapshot (``_MEND``).
        self._high = 0
        self._acked: dict[str, int] = {}
        self.takeover_interval = cfg.lease_ttl / 2
        self._append: Any = None
        self._claim_script: Any = None
        self._renew: Any = None
        self._release_script: Any = None
        self._begin: Any = None
        self._drop_script: Any = None
        self._trim_script: Any = None
        self._flag_script: Any = None
        self._mend_script: Any = None
        self._alive: Any = None

    # --- keys ------------------------------------------------------------------------------

    def _k(self, kind: str, key: str = "") -> str:
        return f"{self._p}{kind}:{key}" if key else f"{self._p}{kind}"

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        # Retries cover a connection that broke under the pool (a Redis restart): reads are
        # idempotent, and so are appends (their batch numbers).
        # A blocking pool: a thousand streams' reads wait for one of POOL_SIZE connections instead
        # of failing when the pool is spent (redis-py's default pool raises past 100).
        pool = aioredis.BlockingConnectionPool.from_url(
            self._cfg.redis_url, max_connections=POOL_SIZE, timeout=POOL_WAIT, socket_timeout=10.0,
            socket_connect_timeout=5.0, health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError])
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: closing the client closes it
        try:
            await self._redis.ping()
            await self._check_server()
            r = self._redis
            self._append = r.register_script(_APPEND)
            self._claim_script = r.register_script(_CLAIM)
            self._renew = r.register_script(_RENEW)
            self._release_script = r.register_script(_RELEASE)
            self._begin = r.register_script(_BEGIN)
            self._drop_script = r.register_script(_DROP)
            self._trim_script = r.register_script(_TRIM)
            self._flag_script = r.register_script(_FLAG)
            self._mend_script = r.register_script(_MEND)
            self._alive = r.register_script(_ALIVE)
            if converted := await r.eval(_INDEX_SORTED, 1, self._k("all")):
                log.info("indexed %d streams of a log from before in key order", converted)
            await r.set(self._k("r", self.replica), "1", px=int(self._cfg.lease_ttl * 1000))
            self._size = int(await r.get(self._k("size")) or 0)
            self._closed = int(await r.zcard(self._k("all"))) - int(await r.scard(self._k("open")))
        except RedisError as exc:
            await self._redis.aclose()
            raise StorageError(f"redis at {shown_url(self._cfg.redis_url)}: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_loop(), name="redis-writer"),
                       loop.create_task(self._renew_loop(), name="redis-leases"),
                       loop.create_task(self._pubsub_loop(), name="redis-feed"),
                       loop.create_task(self._presence_loop(), name="redis-presence")]
        log.info("shared event log on redis %s (prefix %s) as replica %s", shown_url(self._cfg.redis_url),
                 self._cfg.redis_prefix, self.replica)

    async def _check_server(self) -> None:
        """Refuse settings that break the log's promises; warn where they cannot be read."""
        assert self._redis is not None
        try:
            conf = await self._redis.config_get("appendonly")
            conf.update(await self._redis.config_get("appendfsync"))
            conf.update(await self._redis.config_get("maxmemory-policy"))
        except ResponseError as exc:  # managed services often forbid CONFIG
            log.warning("cannot verify the redis server's persistence and eviction settings (%s): make sure "
                        "appendonly is yes, appendfsync is %s and maxmemory-policy is noeviction", exc,
                        "always" if self._cfg.durability == "fsync" else "everysec or always")
            return
        if conf.get("maxmemory-policy") != "noeviction":
            raise StorageError(f"redis maxmemory-policy is {conf.get('maxmemory-policy')!r}: it may evict the "
                               "log's keys; set it to noeviction")
        if self._cfg.durability == "fsync" and (conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always"):
            raise StorageError(
                f"storage.durability is fsync but redis has appendonly={conf.get('appendonly')} "
                f"appendfsync={conf.get('appendfsync')}: set appendonly yes and appendfsync always "
                "(or durability: none, which accepts appendfsync everysec)")
        if self._cfg.durability == "none" and conf.get("appendonly") != "yes":
            log.warning("redis has appendonly=%s: a redis restart loses the log", conf.get("appendonly"))

    async def close(self) -> None:
        self._feeds.stop()
        await stop_tasks(self._tasks + ([self._probing] if self._probing is not None else []), "redis log")
        self._tasks.clear()
        for fut in [p.future for p in self._queue]:
            if not fut.done():
                fut.set_exception(StorageError("event log is closed"))
        self._queue.clear()
        if self._redis is not None:
            try:
                for key in list(self._claims):
                    await self.release(key)
                await self._redis.delete(self._k("r", self.replica))
            except RedisError:
                pass
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self._redis.aclose()
            self._redis = None

    @property
    def _r(self) -> Any:
        # Any: redis-py types replies as unions of every shape a command may take; what comes
        # back is turned into precise types right here (_rows, _meta_from_hash).
        if self._redis is None:
            raise StorageError("event log is closed")
        return self._redis

    # --- metadata ----------------------------------------------------------------------------

    async def lookup(self, key: str) -> StreamMeta | None:
        try:
            return _meta_from_hash(await self._r.hgetall(self._k("m", key)))
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc

    async def streams(self) -> list[StreamMeta]:
        try:
            keys = [k.decode() for k in await self._r.zrange(self._k("all"), 0, -1)]
            async with self._r.pipeline(transaction=False) as p:
                for k in keys:
                    p.hgetall(self._k("m", k))
                raws = await p.execute()
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        return [m for m in (_meta_from_hash(raw) for raw in raws) if m is not None]

    async def list_streams(self, after: str, limit: int, keep: Callable[[StreamMeta], bool],
                           scan: int = LIST_SCAN) -> tuple[list[StreamMeta], str | None]:
        out: list[StreamMeta] = []
        last = after
        chunk = limit  # a page of what keep accepts reads no more than it needs; a filtered one reads on
        try:
            while scan > 0:
                keys = await self._r.zrangebylex(self._k("all"), f"({last}" if last else "-", "+", 0,
                                                 min(scan, chunk, 500))
                chunk = 500
                if not keys:
                    return out, None
                async with self._r.pipeline(transaction=False) as p:
                    for k in keys:
                        p.hgetall(self._k("m", k.decode()))
                    raws = await p.execute()
                for k, raw in zip(keys, raws):
                    last, scan = k.decode(), scan - 1
                    meta = _meta_from_hash(raw)
                    if meta is not None and keep(meta):
                        out.append(meta)
                        if len(out) == limit:
                            return out, last
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        return out, last

    async def last_seq(self) -> int:
        try:
            seq = int(await self._r.get(self._k("seq")) or 0)
            if seq < self._high:
                # Below an id this replica has seen: Redis lost data. Mended before the caller
                # (a resume) compares a client's id with it, or the id would be taken for one not
                # sent yet, and the events this replica captured of it for some still held.
                for key in list(self._acked):
                    await self._mend(key)
                    if key not in self._claims:  # mended once: not this replica's to vouch for again
                        self._acked.pop(key, None)
                seq = int(await self._r.get(self._k("seq")) or 0)
            return seq
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc

    async def _mend(self, key: str) -> None:
        """Mend what a Redis rollback broke of ``key`` and of the counter (``_MEND``); raises RedisError."""
        if await self._mend_script(keys=[self._k("m", key), self._k("seq")],
                                   args=[self._acked.get(key, 0), self._high]):
            log.error("redis lost events of %s it had acknowledged (it came back from an older snapshot?): "
                      "clients holding their ids are told they are not held", key)

    @property
    def size(self) -> int:
        return self._size

    def accepting(self, key: str | None = None) -> bool:
        # The budget is shared: this replica's view of it is refreshed by every sweep (bytes and closed
        # streams) and by every append of its own (bytes).
        return accepting(self.failure, self._size, self._cfg.max_bytes, self._closed > 0)

    # --- ownership ---------------------------------------------------------------------------

    async def claim(self, key: str) -> bool:
        if key in self._claims:
            return True
        releasing = self._releasing.get(key)
        if releasing is not None:
            await asyncio.shield(releasing)
            if key in self._claims:  # claimed by another caller here meanwhile
                return True
        nonce = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        try:
            token = await self._claim_script(keys=[self._k("l", key), self._k("fence"), self._k("m", key)],
                                             args=[self.replica, int(self._cfg.lease_ttl * 1000), nonce])
        except RedisError as exc:
            self._write_failed(exc, started)
            raise StorageError(f"redis: {exc}") from exc
        if token is None:
            return False
        tok = str(int(token))
        if key in self._acked:  # captured here before: what it appended must still be there
            try:
                await self._mend(key)
            except RedisError as exc:
                await self._release_script(keys=[self._k("l", key)], args=[f"{self.replica}:{nonce}:{tok}"])
                raise StorageError(f"redis: {exc}") from exc
        self._claims[key] = _Claim(f"{self.replica}:{nonce}:{tok}", tok)
        # A new claim writes from what the log holds (its fence and batch numbers start anew): a
        # failed append of an earlier claim of this process no longer stands between it and the
        # log. Without this, a takeover that only ends the stream (a stateless run's interruption)
        # was refused forever, the stream left open and every client of it cut again and again.
        self._broken.discard(key)
        return True

    async def release(self, key: str) -> None:
        claim = self._claims.pop(key, None)
        self._acked.pop(key, None)
        if claim is None:
            return
        done = self._releasing[key] = asyncio.get_running_loop().create_future()
        try:
            await self._release_script(keys=[self._k("l", key)], args=[claim.value])
        except RedisError as exc:
            log.warning("could not release %s (its lease runs out by itself): %s", key, exc)
        finally:
            if self._releasing.get(key) is done:
                del self._releasing[key]
            done.set_result(None)

    async def unowned(self) -> list[StreamMeta]:
        try:
            keys = [k.decode() for k in await self._r.smembers(self._k("open"))]
            if not keys:
                return []
            async with self._r.pipeline(transaction=False) as p:
                for k in keys:
                    p.exists(self._k("l", k))
                held = await p.execute()
            free = [k for k, h in zip(keys, held) if not h and k not in self._claims]
            metas = [await self.lookup(k) for k in free]
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        return [m for m in metas if m is not None and m.open]

    def on_lost(self, callback: Callable[[str, LeaseLoss], None]) -> None:
        self._lost_callbacks.append(callback)

    def _lost(self, key: str, how: LeaseLoss) -> None:
        if how == "fenced":  # another replica writes it now: what it holds is no longer ours to vouch for
            self._acked.pop(key, None)
        if self._claims.pop(key, None) is not None:
            for cb in self._lost_callbacks:
                cb(key, how)

    async def _renew_loop(self) -> None:
        """Renew every lease at a third of its TTL; one found lost stops its capture here."""
        ttl_ms = int(self._cfg.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self._cfg.lease_ttl / 3)
            claims = list(self._claims.items())
            try:
                async with self._r.pipeline(transaction=False) as p:
                    await self._alive(keys=[self._k("r", self.replica)], args=[ttl_ms], client=p)
                    for key, claim in claims:
                        await self._renew(keys=[self._k("l", key)], args=[claim.value, ttl_ms], client=p)
                    # One refused reply (maxmemory) never hides the others: each lease is judged on its own.
                    results = await p.execute(raise_on_error=False)
            except RedisError as exc:
                log.warning("could not renew leases: %s", exc)
                # The heartbeat is the one write an idle gateway makes: Redis unreachable or refusing
                # it is storage failing (readiness, the failing gauge) before a client's run is
                # refused for it. Not a failed commit: nobody's events were refused.
                if _unwritable(exc):
                    self._fail(f"{exc.__class__.__name__}: {exc}")
                continue
            alive = results[0]
            if isinstance(alive, BaseException):
                log.warning("could not say this replica is alive: %s", alive)
            elif alive != 1:  # kept alive, but Redis refuses writes: storage fails, as above
                self._fail(f"redis refuses writes: {alive.decode(errors='replace') if isinstance(alive, bytes) else alive}")
            for (key, claim), ok in zip(claims, results[1:]):
                if isinstance(ok, BaseException):
                    log.warning("could not renew the lease on %s: %s", key, ok)
                elif not ok and self._claims.get(key) is claim:
                    log.warning("lease on %s was lost (this process stalled past %gs?)", key, self._cfg.lease_ttl)
                    self._lost(key, "renewal")

    async def request_cancel(self, key: str) -> None:
        try:
            await self._flag_script(keys=[self._k("m", key)], args=["cancel_on_orphan", "1"])
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc

    # --- presence -----------------------------------------------------------------------------

    def set_followers(self, key: str, here: int) -> None:
        self._followed_here[key] = here
        self._presence_dirty.add(key)
        self._presence_wake.set()

    async def followers(self, key: str, here: int) -> int:
        try:
            others = [r.decode() for r in await self._r.hkeys(self._k("f", key)) if r.decode() != self.replica]
            alive: list[Any] = []
            if others:
                async with self._r.pipeline(transaction=False) as p:
                    for r in others:
                        p.exists(self._k("r", r))
                    alive = await p.execute()
        except RedisError as exc:
            log.warning("cannot count followers of %s on other replicas (%s); assuming some", key, exc)
            return here + 1
        n = here + sum(1 for a in alive if a)
        if n == here and await self._presence_unsure():
            return here + 1
        return n

    async def _presence_unsure(self) -> bool:
        """Another replica's followers may be missing from the log: Redis refuses writes (maxmemory)
        or fails now, or did so lately, and a replica whose presence write it refused tries again
        only every PROBE_INTERVAL. Counted as some follower then: a run is not cancelled, a thread
        not released, on a record Redis would not take (those decisions are made again later)."""
        if self.failure is not None or time.monotonic() < self._presence_doubt_until:
            return True
        try:  # the write a presence record needs: Redis at maxmemory refuses it before this replica noticed
            await self._r.set(self._k("r", self.replica), "1", px=int(self._cfg.lease_ttl * 1000))
        except RedisError as exc:
            if _unwritable(exc):
                self._fail(f"{exc.__class__.__name__}: {exc}")
            return True
        return False

    async def _presence_loop(self) -> None:
        """Write this replica's followers per stream, latest state first, in order."""
        while True:
            await self._presence_wake.wait()
            self._presence_wake.clear()
            dirty, self._presence_dirty = self._presence_dirty, set()
            try:
                async with self._r.pipeline(transaction=False) as p:
                    for key in dirty:
                        n = self._followed_here.get(key, 0)
                        if n:
                            p.hset(self._k("f", key), self.replica, n)
                            p.pexpire(self._k("f", key), _SAFETY_TTL_MS)
                        else:
                            p.hdel(self._k("f", key), self.replica)
                            self._followed_here.pop(key, None)
                    await p.execute()
            except RedisError as exc:
                log.warning("could not record followers: %s", exc)
                if _unwritable(exc):  # Redis refuses writes (maxmemory) or is gone: storage fails, and says so
                    self._fail(f"{exc.__class__.__name__}: {exc}")
                self._presence_dirty |= dirty
                await asyncio.sleep(PROBE_INTERVAL)
                self._presence_wake.set()

    # --- the live feed --------------------------------------------------------------------------

    def subscribe(self, key: str, limit: int, byte_limit: int, on_overflow: Callable[[], None] | None = None) -> Feed:
        feed = self._feeds.subscribe(key, limit, byte_limit, on_overflow)
        channel = self._k("c", key).encode()
        if channel not in self._channels:
            self._channels[channel] = key
            self._subscribed.clear()
            self._wake_pubsub()
        return feed

    def beat(self, key: str) -> None:
        self._feeds.deliver(key, BEAT)

    def cut(self, key: str) -> None:
        self._feeds.deliver(key, CUT)

    def _wake_pubsub(self) -> None:
        if self._pubsub_wake is not None:
            self._pubsub_wake.set()

    _pubsub_wake: asyncio.Event | None = None

    async def _pubsub_loop(self) -> None:
        """One pub/sub connection: (un)subscribes to the channels of streams followed here, and
        hands other replicas' batches to this process's feeds.

        A channel is live once Redis has confirmed its subscription, not when the command was sent
        (register-then-replay needs the subscription in place before the head is read). Messages
        published while a channel was not subscribed are gone, so whenever one may have been lost
        (this loop saw the connection break, or redis-py reconnected and re-subscribed under it,
        which it does silently) the followers of that channel catch up from the log once it is
        confirmed again: catching up only at the break would miss what was published between the
        break and the new subscription, an end among it, and the follower would hear of it only at
        its idle heartbeat."""
        self._pubsub_wake = asyncio.Event()
        current: set[bytes] = set()
        while True:
            try:
                self._pubsub = self._r.pubsub(ignore_subscribe_messages=False)
                current = set()
                while True:
                    # Cleared before the channels are read, never after: a follower that subscribes
                    # while a (un)subscribe below is in flight sets it again, so the wait further
                    # down returns and its channel is taken up on the next turn.
                    self._pubsub_wake.clear()
                    wanted = {c for c, k in self._channels.items() if self._feeds.following(k)}
                    for c in list(self._channels):
                        if c not in wanted:
                            del self._channels[c]
                    self._rejoin &= wanted
                    if wanted - current:
                        await self._pubsub.subscribe(*(wanted - current))
                    gone = current - wanted
                    if gone:
                        # Not live from here on, before the await: a follower arriving meanwhile must
                        # wait for the new subscription, not trust the one being dropped.
                        self._live_channels -= gone
                        await self._pubsub.unsubscribe(*gone)
                    current = wanted
                    if not current:
                        await self._pubsub_wake.wait()
                        continue
                    msg = await self._pubsub.get_message(timeout=0.05)
                    if msg is None:
                        continue
                    if msg.get("type") == "message":
                        self._on_message(msg["channel"], msg["data"])
                    elif msg.get("type") == "subscribe" and msg["channel"] in current:
                        self._confirmed(msg["channel"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._rejoin |= set(self._channels)  # confirmed or not: all were cut off
                self._live_channels = set()
                log.warning("redis feed connection lost (%s); followers here catch up from the log", exc)
                for key in set(self._channels.values()):
                    self._feeds.resync(key)
                try:
                    await self._pubsub.aclose()
                except Exception:  # noqa: BLE001 - it is broken already
                    pass
                await asyncio.sleep(0.2)

    def _confirmed(self, channel: bytes) -> None:
        """Redis confirmed a subscription: the channel is live. A second confirmation of a live
        channel is redis-py re-subscribing after a reconnect it did not tell about."""
        if channel in self._live_channels or channel in self._rejoin:
            self._rejoin.discard(channel)
            key = self._channels.get(channel)
            if key is not None:
                self._feeds.resync(key)
        self._live_channels.add(channel)
        self._subscribed.set()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        key = self._channels.get(channel)
        if key is None:
            return
        kind, writer, head, first, record = data.split(b"|", 4)
        if writer == self.replica.encode():
            return  # committed here: delivered when the commit was acknowledged
        prev = int(head or 0)
        entries = entries_in(int(first), record) if record else []
        if entries:
            self._saw(entries[-1][0])
            self._feeds.deliver(key, Batch("events", entries, prev, sum(len(b) for _, b in entries)))
        if kind == b"e":  # an end may carry the stream's last events (an error event): they go first
            self._feeds.deliver(key, Batch("end", prev=entries[-1][0] if entries else prev))

    async def ready(self, feed: Feed) -> None:
        """Until the channel of ``feed`` is subscribed (register-then-replay across replicas); a broken
        feed connection does not hold followers up for long: the gaps show and are read from the log."""
        try:
            async with asyncio.timeout(2.0):
                while self._k("c", feed.key).encode() not in self._live_channels:
                    self._subscribed.clear()
                    await self._subscribed.wait()
        except TimeoutError:
            # The follower goes on without it; when the confirmation does come, it catches up then.
            self._rejoin.add(self._k("c", feed.key).encode())
            log.warning("feed subscription for %s not confirmed; relying on catch-up from the log", feed.key)

    # --- writes ----------------------------------------------------------------------------------

    async def begin(self, meta: StreamMeta) -> StreamMeta:
        if self.failure is not None:
            raise StorageError(f"storage is failing: {self.failure}")
        if self._size >= self._cfg.max_bytes:
            await self._sweep(float("-inf"), exclude=meta.key)  # over budget: the oldest closed go, whatever their age
            if self._size >= self._cfg.max_bytes:
                raise StorageFull(f"event log is at its budget ({self._size} of {self._cfg.max_bytes} bytes)")
        claim = self._claims.get(meta.key)
        if claim is None:
            raise ClaimLost(meta.key)
        claim.bno = 0
        self._broken.discard(meta.key)
        now = repr(time.time())
        started = time.perf_counter()
        try:
            if any(p.key == meta.key for group, _ in self._unsure for p in group):
                await self._settle()  # while its batch numbers still tell what the lost-reply commit applied
            if meta.key in self._acked:  # begun again (after a failed commit): Redis may have lost some
                await self._mend(meta.key)
            raw = await self._begin(keys=[self._k("m", meta.key), self._k("l", meta.key), self._k("seq"),
                                          self._k("open"), self._k("all")],
                                    args=[claim.value, claim.token, now, int(self._cfg.lease_ttl * 1000),
                                          *_meta_to_pairs(meta)])
        except RedisError as exc:
            if "FENCED" in str(exc):
                self._lost(meta.key, "fenced")
                raise ClaimLost(meta.key) from None
            self._write_failed(exc, started)
            raise StorageError(f"redis: {exc}") from exc
        begun = _meta_from_hash(dict(zip(raw[::2], raw[1::2])))
        assert begun is not None
        return begun

    def submit(self, key: str, events: Sequence[Event]) -> asyncio.Future[list[Entry]]:
        return self._enqueue(key, events, "")

    async def finish(self, key: str, end: EndReason | None, events: Sequence[Event] = ()) -> list[Entry]:
        return await self._enqueue(key, events, end or "-")

    def _enqueue(self, key: str, events: Sequence[Event], end: str) -> asyncio.Future[list[Entry]]:
        claim = self._claims.get(key)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Entry]] = loop.create_future()
        if claim is None:
            fut.set_exception(ClaimLost(key))
            return fut
        if self.failure is not None:
            fut.set_exception(StorageError(f"storage is failing: {self.failure}"))
            return fut
        if key in self._broken:
            fut.set_exception(StorageError(f"stream {key} stopped at a failed commit"))
            return fut
        claim.bno += 1
        enc = encode(events, int(time.time() * 1000)) if events else None
        self._queue.append(_Pending(
            key, claim, claim.bno, len(events), enc.record if enc else b"",
            enc.last_upstream_id if enc else None, enc.last_event if enc else "", end,
            [body for body, _ in events], enc.nbytes if enc else 0, fut))
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            group, self._queue = self._queue, []
            started = time.perf_counter()
            results = await self._commit(group)
            refused = results if isinstance(results, BaseException) else next(
                (res for res in results if _refusal(res)), None)
            if self._on_commit is not None:
                # The events the log took: not those of batches it refused (fenced, gone), as on LMDB.
                taken = 0 if isinstance(results, BaseException) else sum(
                    p.n for p, res in zip(group, results) if not isinstance(res, BaseException))
                self._on_commit(taken, time.perf_counter() - started, refused is None)
            if isinstance(results, BaseException):
                if isinstance(results, (RedisConnectionError, RedisTimeoutError, OSError)):
                    self._unsure.append((group, time.perf_counter() - started))
                self._fail(f"{results.__class__.__name__}: {results}")
                for p in group:
                    error = StorageError(f"commit failed: {results}")
                    self._break(p.key, error)  # refuses the batches queued behind it, not the batch itself:
                    if not p.future.done():  # unanswered, a capture would wait for it (its end) forever
                        p.future.set_exception(error)
                continue
            for p, res in zip(group, results):
                self._resolve(p, res)
            if refused is not None:
                self._fail(f"{refused.__class__.__name__}: {refused}")

    async def _commit(self, group: list[_Pending]) -> list[Any] | BaseException:
        """One pipeline for the whole group; once more after a broken connection (batch numbers
        make the retry idempotent: what was applied already is skipped, not applied twice)."""
        for attempt in range(2):
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    for p in group:
                        await self._append(
                            keys=[self._k("seq"), self._k("s", p.key), self._k("m", p.key), self._k("c", p.key),
                                  self._k("size"), self._k("open")],
                            args=[p.claim.token, p.bno, p.n, p.record, p.last_uid or "", p.last_event,
                                  repr(time.time()), p.end, self.replica, p.key], client=pipe)
                    return list(await pipe.execute(raise_on_error=False))
            except NoScriptError:
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if attempt:
                    return exc
                await asyncio.sleep(0.05)
            except RedisError as exc:
                return exc
        return StorageError("the append script could not be loaded")

    def _resolve(self, p: _Pending, res: Any) -> None:
        if isinstance(res, BaseException):
            text = str(res)
            if "FENCED" in text:
                self._lost(p.key, "fenced")
                p.future.set_exception(ClaimLost(p.key))
            else:
                self._break(p.key, StorageError(f"commit failed: {text}"))
            if not p.future.done():
                p.future.set_exception(StorageError(f"commit failed: {text}"))
            return
        first, prev = int(res[0]), int(res[1])
        if len(res) > 2 and int(res[2]) >= 0:
            # The bytes the shared log holds as of this append: gateway_log_bytes and the budget
            # follow every write, not only the last sweep (on a fresh replica, 0 until its first).
            self._size = int(res[2])
        if self.failure is not None:
            self._recovered()
        if first == -1:  # applied by an earlier try: followers find it in the log (a gap, or when idle)
            p.future.set_result([])
            return
        entries = [(first + i, body) for i, body in enumerate(p.bodies)]
        if entries:
            self._saw(entries[-1][0])
            self._acked[p.key] = entries[-1][0]
            self._feeds.deliver(p.key, Batch("events", entries, prev, p.nbytes))
        if p.end:
            self._feeds.deliver(p.key, Batch("end", prev=entries[-1][0] if entries else prev))
        p.future.set_result(entries)

    def _break(self, key: str, error: StorageError) -> None:
        """A batch of ``key`` was not (or may not have been) applied: refuse the batches queued
        behind it and every later one until the stream is begun again."""
        self._broken.add(key)
        for p in self._pending_of(key):
            if not p.future.done():
                p.future.set_exception(error)

    def _pending_of(self, key: str) -> list[_Pending]:
        mine = [p for p in self._queue if p.key == key]
        if mine:
            self._queue = [p for p in self._queue if p.key != key]
        return mine

    def _write_failed(self, exc: RedisError, started: float) -> None:
        """A write outside the commit loop (a new stream's claim or begin) that Redis could not be
        reached for, or refused (maxmemory): storage fails as when a commit group does, and is counted
        as one. With no stream live it is the only write there is: without this, Redis down would
        refuse every new run with 503 while readiness, the failing gauge and the alerts said nothing."""
        if not _unwritable(exc):
            return  # the log's own answer about one stream, or a bug: not storage failing
        if self._on_commit is not None:
            self._on_commit(0, time.perf_counter() - started, False)
        self._fail(f"{exc.__class__.__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        if self.health.fail(reason):
            log.error("redis commits fail: %s", reason)
            self._probing = asyncio.get_running_loop().create_task(self._probe(), name="redis-probe")

    def _recovered(self) -> None:
        if self.health.recovered():
            self._presence_doubt_until = time.monotonic() + _PRESENCE_DOUBT
            log.info("redis takes writes again")

    async def _probe(self) -> None:
        while self.failure is not None or self._unsure:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                if self.failure is not None:
                    await self._r.ping()
                    await self._r.set(self._k("r", self.replica), "1", px=int(self._cfg.lease_ttl * 1000))
                # Before recovery: until then no stream is begun again (which resets its batch numbers).
                await self._settle()
            except (RedisError, OSError):
                continue
            self._recovered()

    async def _settle(self) -> None:
        """Count the events of the groups whose commit lost its connection on every try that Redis
        applied all the same (the stream's fence is still their claim's, and its last applied batch
        number reached theirs): gateway_log_events_appended says what the log holds."""
        unsure = list(self._unsure)
        counts = []
        for group, seconds in unsure:
            taken = 0
            for p in group:
                fence, bno = await self._r.hmget(self._k("m", p.key), "fence", "bno")
                if fence is not None and fence.decode() == p.claim.token and int(bno or 0) >= p.bno:
                    taken += p.n
            counts.append((taken, seconds))
        del self._unsure[:len(unsure)]  # groups failing meanwhile were appended after these
        if self._on_commit is not None:
            for taken, seconds in counts:
                if taken:
                    self._on_commit(taken, seconds, True)

    # --- reads -----------------------------------------------------------------------------------

    async def read(self, key: str, after: int, upto: int, limit: int,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Entry]:
        if after >= upto:
            return []
        skey = self._k("s", key)
        out: list[Entry] = []
        try:
            # The batch holding seq after+1 may start before it: the last entry at or below it.
            before = _rows(await self._r.xrevrange(skey, max=f"{after + 1}-0", min="-", count=1))
            start = f"{before[0][0]}-0" if before else "-"
            budget = _Budget(max_bytes, before)
            room, full = max_bytes, False
            # Not empty-handed: the batch read first may end at ``after`` (seqs come from one counter).
            while not full and (budget.left > 0 or not out):
                count = budget.entries()
                rows = _rows(await self._r.xrange(skey, min=start, max=f"{upto}-0", count=count))
                if not rows:
                    break
                for first, record in rows:
                    got, used, full = record_page(first, record, after, upto, limit - len(out), room, not out)
                    out += got
                    room -= used
                    if full or len(out) >= limit:
                        full = True
                        break
                budget.spent(rows)
                if len(rows) < count:
                    break
                start = f"({rows[-1][0]}-0"
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        if out:
            self._saw(out[-1][0])
        return out

    def _saw(self, seq: int) -> None:
        if seq > self._high:
            self._high = seq

    async def tail(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        skey = self._k("s", key)
        out: list[tuple[str | None, bytes]] = []
        budget = _Budget(_TAIL_BYTES)
        end = "+"
        try:
            while len(out) < limit and budget.left > 0:
                count = budget.entries()
                rows = _rows(await self._r.xrevrange(skey, max=end, min="-", count=count))
                for first, record in rows:
                    batch = [(uid, body) for _seq, uid, body in decode(first, record)]
                    out.extend(reversed(batch))
                budget.spent(rows)
                if len(rows) < count:
                    break
                end = f"({rows[-1][0]}-0"
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        out = out[:limit]
        out.reverse()
        return out

    # --- retention ---------------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return await self._sweep(now - self._cfg.retention, trim=True)

    async def _sweep(self, cutoff: float, *, exclude: str | None = None, trim: bool = False) -> int:
        """Retention (``to_evict``), by one replica at a time: it holds the sweeper lease while it works.
        Returns the streams removed; every sweep refreshes this replica's view of the shared budget."""
        r = self._r
        removed = 0
        try:
            mine = f"{self.replica}:{uuid.uuid4().hex[:8]}"
            nonce: str | None = mine
            try:
                # A retried SET whose first try took the lease answers "not set": the value says whose it is.
                sweeping = bool(await r.set(self._k("sweeper"), mine, nx=True, px=60_000)) or \
                    await r.get(self._k("sweeper")) == mine.encode()
            except ResponseError as exc:
                if not _refusal(exc):
                    raise
                # Redis at maxmemory refuses the lease, but not deletes: retention is what frees its
                # memory, so it runs without the lease (every drop and trim is safe to run twice).
                sweeping, nonce = True, None
            if sweeping:
                try:
                    metas = await self.streams()
                    size = int(await r.get(self._k("size")) or 0)
                    for m in to_evict(metas, size, self._cfg.max_bytes, cutoff, exclude):
                        removed += await self._drop(m)
                    if trim:
                        for m in metas:
                            if m.open and m.endless:
                                await self._trim(m, cutoff)
                    self._closed = sum(1 for m in metas if not m.open) - removed
                finally:
                    if nonce is not None:
                        await self._release_script(keys=[self._k("sweeper")], args=[nonce])
            self._size = int(await r.get(self._k("size")) or 0)
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc
        if removed:
            log.info("retention removed %d streams; %d bytes held", removed, self._size)
        return removed

    async def _drop(self, m: StreamMeta) -> bool:
        return bool(await self._drop_script(
            keys=[self._k("s", m.key), self._k("m", m.key), self._k("f", m.key), self._k("all"), self._k("open"),
                  self._k("size")], args=[m.key]))

    async def _trim(self, m: StreamMeta, cutoff: float) -> None:
        """Drop an open thread stream's entries appended before ``cutoff`` (it never closes)."""
        limit_ms = int(cutoff * 1000)
        # The marks as they stand now, not as the sweep's list had them: another replica may have
        # trimmed meanwhile (the script refuses a trim worked out from what is no longer so).
        was = [v.decode() if v else "" for v in await self._r.hmget(self._k("m", m.key), "trimmed_from", "trimmed_to")]
        rows = _rows(await self._r.xrange(self._k("s", m.key), count=1000))
        old = [(first, record) for first, record in rows if record_time_ms(record) < limit_ms]
        if not old:
            return
        next_seq = decode(old[-1][0], old[-1][1])[-1][0] + 1
        size = sum(len(d) + 24 for _, d in old)
        held = replace(m, trimmed_from=was[0] or None, trimmed_to=was[1] or None)
        marks = trim_marks(held, [uid for first, record in old for _seq, uid, _body in decode(first, record)]) \
            if m.kind == "session" else held
        await self._trim_script(keys=[self._k("s", m.key), self._k("m", m.key), self._k("size")],
                                args=[f"{next_seq}-0", next_seq, size, marks.trimmed_from or "", marks.trimmed_to or "",
                                      f"{old[0][0]}-0", *was])


def _unwritable(exc: RedisError) -> bool:
    """Redis cannot take writes: unreachable, timing out, or refusing them (``_refusal``)."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or _refusal(exc)


def _refusal(res: Any) -> bool:
    """An error reply that is Redis refusing writes (maxmemory reached, a read-only replica, a disk
    it cannot persist to), not the log's own answer about one stream (FENCED, GAP, GONE): storage
    fails, as when Redis is unreachable (readiness, the failing gauge, new captures refused)."""
    return isinstance(res, ResponseError) and not any(word in str(res) for word in ("FENCED", "GAP", "GONE"))


class _Budget:
    """The bytes a read may still take, and how many stream entries to ask for next so as not to go
    far past them: as many as the entries seen so far say fit (``seen``: some already read)."""

    __slots__ = ("left", "_rows", "_bytes")

    def __init__(self, left: int, seen: Sequence[tuple[int, bytes]] = ()) -> None:
        self.left = left
        self._rows = len(seen)
        self._bytes = sum(len(record) for _, record in seen)

    def entries(self) -> int:
        if not self._rows:
            return _FIRST_ENTRIES
        return max(1, min(_READ_PAGE_ENTRIES, self.left * self._rows // max(1, self._bytes)))

    def spent(self, rows: list[tuple[int, bytes]]) -> None:
        size = sum(len(record) for _, record in rows)
        self.left -= size
        self._rows += len(rows)
        self._bytes += size


def _rows(raw: Any) -> list[tuple[int, bytes]]:
    """Stream entries as (first seq of the batch, record)."""
    return [(int(eid.split(b"-")[0]), fields_[b"d"]) for eid, fields_ in raw or ()]


class RedisView:
    """The shared log read-only, for the operator commands (a synchronous client).

    Whatever goes wrong reading it is a ``StorageError`` naming the Redis it reads (without its
    password): ``StorageDamaged`` when a key holds what no gateway writes."""

    def __init__(self, cfg: Storage) -> None:
        self._r: Any = redis.Redis.from_url(cfg.redis_url, socket_timeout=10.0)
        self._p = "{" + cfg.redis_prefix + "}:"
        self.where = f"redis {shown_url(cfg.redis_url)} (prefix {cfg.redis_prefix})"
        try:
            self._r.ping()
        except RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        try:
            yield
        except ResponseError as exc:  # WRONGTYPE and the like: a key that is not what a gateway wrote
            raise StorageDamaged(f"{self.where}: damaged, reading {what}: {exc}") from None
        except (StorageDamaged, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise StorageDamaged(f"{self.where}: damaged, reading {what}: {exc!s}") from None
        except RedisError as exc:
            raise StorageError(f"{self.where}: cannot read {what}: {exc}") from None

    def metas(self) -> list[StreamMeta]:
        with self._reading("the stream list"):
            keys = sorted(self._index())
        return [m for m in (self.meta(k) for k in keys) if m is not None]

    def meta(self, key: str) -> StreamMeta | None:
        with self._reading(f"stream {key}"):
            meta: StreamMeta | None = _meta_from_hash(self._r.hgetall(self._p + "m:" + key))
        return meta

    def records(self, key: str, upto: int | None = None, after: int = 0) -> Iterator[Record]:
        start = "-"
        top = "+" if upto is None else f"{upto}-0"
        with self._reading(f"the events of {key}"):
            if after > 0:  # from the record holding after+1, which may start before it
                before = _rows(self._r.xrevrange(self._p + "s:" + key, max=f"{after + 1}-0", min="-", count=1))
                start = f"{before[0][0]}-0" if before else "-"
            while True:
                rows = _rows(self._r.xrange(self._p + "s:" + key, min=start, max=top, count=500))
                for first, record in rows:
                    events = decode(first, record)
                    if events[-1][0] > after:  # the record before the one holding after+1: none of these
                        yield Record(first, record_time_ms(record), events, len(record) + 24)
                if len(rows) < 500:
                    return
                start = f"({rows[-1][0]}-0"

    def _index(self) -> list[str]:
        """Every stream key (a sorted set; a plain set in a log no gateway of this version opened yet)."""
        index = self._p + "all"
        raw = self._r.smembers(index) if self._r.type(index) == b"set" else self._r.zrange(index, 0, -1)
        return [k.decode() for k in raw]

    def counter(self) -> int:
        with self._reading("the id counter"):
            return int(self._r.get(self._p + "seq") or 0)

    def orphan_keys(self) -> set[str]:
        with self._reading("the event keys"):
            found = {k.decode().removeprefix(self._p + "s:") for k in self._r.scan_iter(match=self._p + "s:*")}
            known = set(self._index())  # after: streams begun meanwhile count
            # Each suspect looked at once more: one dropped between the two reads is gone from both now.
            return {k for k in found - known if self._r.exists(self._p + "s:" + k)
                    and k not in self._index()}

    def close(self) -> None:
        self._r.close()
