"""Looking at a log from outside the serving path: what operators use when a user says "my chat
lost half an answer".

``LogView`` reads a log read-only: an LMDB data directory (while a gateway writes it: LMDB
gives readers a consistent snapshot) or the shared Redis log. ``describe`` and ``check``
are used by the command line (``agent-gateway streams ...``, ``agent-gateway check``) and
``describe`` also by the admin listener (``GET /streams``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import lmdb
import orjson

from gateway.config import Storage
from gateway.eventlog import EventLog, StorageDamaged, StorageError, StreamMeta
from gateway.eventlog.lmdb import verify_file
from gateway.eventlog.records import decode, record_time_ms
from gateway.rejoin import GAP_EVENT
from gateway.sse import event_name


@dataclass(frozen=True, slots=True)
class Record:
    """One stored batch: its first seq, the time it was appended (unix ms), its events."""

    first: int
    time_ms: int
    events: list[tuple[int, str | None, bytes]]  # (seq, upstream id, body)
    size: int


class LogView(Protocol):
    """A log, read-only."""

    def metas(self) -> list[StreamMeta]: ...
    def meta(self, key: str) -> StreamMeta | None: ...
    def records(self, key: str, upto: int | None = None) -> Iterator[Record]: ...
    def counter(self) -> int: ...
    def orphan_keys(self) -> set[str]: ...
    def close(self) -> None: ...


class LmdbView:
    def __init__(self, path: Path) -> None:
        verify_file(path)
        if not (path / "data.mdb").exists():
            raise StorageError(f"{path}: no event log here (no data.mdb)")
        try:
            self._env = lmdb.open(str(path), readonly=True, max_dbs=4, lock=True, readahead=False)
            self._events = self._env.open_db(b"events", create=False)
            self._streams = self._env.open_db(b"streams", create=False)
            self._meta = self._env.open_db(b"meta", create=False)
        except lmdb.Error as exc:
            raise StorageError(f"{path}: cannot open the event log read-only: {exc}") from exc
        self._path = path

    def metas(self) -> list[StreamMeta]:
        out = []
        with self._env.begin(db=self._streams) as txn:
            for k, v in txn.cursor():
                try:
                    out.append(StreamMeta.from_bytes(v))
                except StorageDamaged as exc:
                    raise StorageDamaged(f"stream record {bytes(k)[:80]!r}: {exc}") from None
        return out

    def meta(self, key: str) -> StreamMeta | None:
        with self._env.begin(db=self._streams) as txn:
            raw = txn.get(key.encode())
        return StreamMeta.from_bytes(raw) if raw is not None else None

    def records(self, key: str, upto: int | None = None) -> Iterator[Record]:
        prefix = key.encode() + b"\x00"
        with self._env.begin(db=self._events, buffers=False) as txn:
            cur = txn.cursor()
            found = cur.set_range(prefix)
            while found:
                k, v = cur.item()
                if not k.startswith(prefix):
                    break
                first = int.from_bytes(k[len(prefix):], "big")
                if upto is not None and first > upto:
                    break
                yield Record(first, record_time_ms(v), decode(first, v), len(k) + len(v))
                found = cur.next()

    def counter(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"seq")
        if raw is None or not raw.isdigit():
            raise StorageDamaged(f"{self._path}/data.mdb: the seq record is missing or damaged")
        return int(raw)

    def orphan_keys(self) -> set[str]:
        """Stream keys that have records but no metadata (one snapshot: a writer beside it cannot
        make a stream look half-written)."""
        keys: set[str] = set()
        with self._env.begin() as txn:
            for k in txn.cursor(db=self._events).iternext(keys=True, values=False):
                keys.add(bytes(k).split(b"\x00", 1)[0].decode("utf-8", "replace"))
            known = {bytes(k).decode() for k in txn.cursor(db=self._streams).iternext(keys=True, values=False)}
        return keys - known

    def close(self) -> None:
        self._env.close()


class RedisView:
    def __init__(self, cfg: Storage) -> None:
        import redis  # only here: the LMDB tools need nothing of it

        from gateway.eventlog.redis import _meta_from_hash, _rows

        self._r: Any = redis.Redis.from_url(cfg.redis_url, socket_timeout=10.0)
        self._p = "{" + cfg.redis_prefix + "}:"
        self._meta_from_hash = _meta_from_hash
        self._rows = _rows
        try:
            self._r.ping()
        except redis.RedisError as exc:
            raise StorageError(f"redis: {exc}") from exc

    def metas(self) -> list[StreamMeta]:
        keys = sorted(self._index())
        return [m for m in (self.meta(k) for k in keys) if m is not None]

    def meta(self, key: str) -> StreamMeta | None:
        meta: StreamMeta | None = self._meta_from_hash(self._r.hgetall(self._p + "m:" + key))
        return meta

    def records(self, key: str, upto: int | None = None) -> Iterator[Record]:
        start = "-"
        top = "+" if upto is None else f"{upto}-0"
        while True:
            rows = self._rows(self._r.xrange(self._p + "s:" + key, min=start, max=top, count=500))
            for first, record in rows:
                yield Record(first, record_time_ms(record), decode(first, record), len(record) + 24)
            if len(rows) < 500:
                return
            start = f"({rows[-1][0]}-0"

    def _index(self) -> list[str]:
        """Every stream key (a sorted set; a plain set in a log no gateway of this version opened yet)."""
        index = self._p + "all"
        raw = self._r.smembers(index) if self._r.type(index) == b"set" else self._r.zrange(index, 0, -1)
        return [k.decode() for k in raw]

    def counter(self) -> int:
        return int(self._r.get(self._p + "seq") or 0)

    def orphan_keys(self) -> set[str]:
        found = {k.decode().removeprefix(self._p + "s:") for k in self._r.scan_iter(match=self._p + "s:*")}
        known = set(self._index())  # after: streams begun meanwhile count
        # Each suspect looked at once more: one dropped between the two reads is gone from both now.
        return {k for k in found - known if self._r.exists(self._p + "s:" + k)
                and k not in self._index()}

    def close(self) -> None:
        self._r.close()


def open_view(cfg: Storage) -> LogView:
    return RedisView(cfg) if cfg.backend == "redis" else LmdbView(Path(cfg.path))


def resolve(view: LogView, key_or_id: str) -> StreamMeta | None:
    """A stream by its key (``default/run/<id>``) or by a run or thread id."""
    meta = view.meta(key_or_id)
    if meta is not None:
        return meta
    matches = [m for m in view.metas() if key_or_id in (m.run_id, m.thread_id) and
               (m.kind == "run" or m.run_id is None)]
    runs = [m for m in matches if m.run_id == key_or_id]
    pick = runs or matches
    return pick[0] if len(pick) == 1 else None


@dataclass
class Details:
    """What ``streams show`` says about one stream."""

    meta: dict[str, Any]
    events: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)  # the gap markers: id and reason
    errors: list[dict[str, Any]] = field(default_factory=list)  # error events (a failed run, CaptureInterrupted)


def details(view: LogView, meta: StreamMeta) -> Details:
    out = Details(meta=public(meta))
    for rec in view.records(meta.key):
        t = rec.time_ms / 1000
        out.first_event_at = t if out.first_event_at is None else out.first_event_at
        out.last_event_at = t
        for seq, _uid, body in rec.events:
            out.events += 1
            name = event_name(body)
            if name == GAP_EVENT.encode() or name == b"error":
                data = _data(body)
                (out.gaps if name != b"error" else out.errors).append({"id": seq, **data})
    return out


def public(meta: StreamMeta) -> dict[str, Any]:
    """A stream's metadata as tools show it: never the credential hash."""
    doc = asdict(meta)
    doc.pop("auth_salt", None)
    doc.pop("auth_digest", None)
    doc["state"] = "live" if meta.open else (meta.end or "released")
    return doc


def _data(body: bytes) -> dict[str, Any]:
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                doc = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                return {}
            return doc if isinstance(doc, dict) else {}
    return {}


def event_record(seq: int, body: bytes, time_ms: int) -> dict[str, Any]:
    """One event as a JSON line of ``streams export``."""
    name = event_name(body).decode("utf-8", "replace")
    data = b"\n".join(line[6:] for line in body.split(b"\n") if line.startswith(b"data: "))
    return {"id": seq, "time": time_ms / 1000, "event": name, "data": data.decode("utf-8", "replace")}


def matches(meta: StreamMeta, *, state: str | None, upstream: str | None, thread: str | None,
            older: float | None, newer: float | None, now: float | None = None) -> bool:
    """The filters of ``streams list`` (ages in seconds since the last update)."""
    now = time.time() if now is None else now
    age = now - meta.updated_at
    return ((state is None or (state == "live") == meta.open)
            and (upstream is None or meta.upstream == upstream)
            and (thread is None or meta.thread_id == thread)
            and (older is None or age >= older)
            and (newer is None or age <= newer))


def check(view: LogView) -> list[str]:
    """Every inconsistency in the log, one line each (an empty list: the log is sound).

    Sound beside a gateway that writes it: each stream's records are read up to the head its
    metadata had, a stream trimmed or removed meanwhile is read again, and the id counter is
    read last (it only grows, so every head read before it is at or below it).
    """
    problems: list[str] = []
    try:
        metas = view.metas()
    except StorageError as exc:
        return [str(exc)]
    held: list[StreamMeta] = []
    for meta in metas:
        found, now = _check_stream(view, meta)
        problems += found
        if now is not None:
            held.append(now)
    try:
        counter = view.counter()
    except StorageError as exc:
        return problems + [str(exc)]
    for meta in held:
        if meta.head > counter:
            problems.append(f"{meta.key}: head {meta.head} is above the stored counter {counter}: ids could be reused")
    for key in sorted(view.orphan_keys()):
        problems.append(f"{key}: records without metadata")
    return problems


def _check_stream(view: LogView, meta: StreamMeta, tries: int = 3) -> tuple[list[str], StreamMeta | None]:
    """One stream's problems, and its metadata as checked (None: it left the log meanwhile). What
    is found is reported only if the stream did not change under the read (retention trimmed or
    removed it, or it was captured anew)."""
    for _ in range(tries):
        found = _stream_problems(view, meta)
        if not found:
            return [], meta
        again = view.meta(meta.key)
        if again is None:
            return [], None
        if (again.first_seq, again.base, again.created_at) == (meta.first_seq, meta.base, meta.created_at):
            return found, meta
        meta = again
    return found, meta


def _stream_problems(view: LogView, meta: StreamMeta) -> list[str]:
    prefix = f"{meta.key}:"
    problems: list[str] = []
    last = 0
    count = 0
    try:
        for rec in view.records(meta.key, upto=meta.head):  # what commits after the metadata was read is not
            seqs = [seq for seq, _u, _b in rec.events]
            if seqs != list(range(rec.first, rec.first + len(seqs))):
                problems.append(f"{prefix} the record at {rec.first} does not hold consecutive seqs")
            if rec.first <= last:
                problems.append(f"{prefix} seq {rec.first} does not come after {last}")
            last = max(last, seqs[-1] if seqs else rec.first)
            count += len(seqs)
    except StorageDamaged as exc:
        return [f"{prefix} {exc}"]
    if last and last != meta.head:
        problems.append(f"{prefix} its metadata says head {meta.head}, its records end at {last}")
    if not meta.first_seq and count != meta.count:  # trimmed streams keep their total count
        problems.append(f"{prefix} its metadata counts {meta.count} events, its records hold {count}")
    if meta.base > meta.head and meta.head:
        problems.append(f"{prefix} base {meta.base} is above its head {meta.head}")
    return problems


async def served_details(log: EventLog, meta: StreamMeta, page: int = 2000) -> dict[str, Any]:
    """``details`` for the admin listener, read through the serving log (its gap and error events)."""
    gaps: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    pos, held = (meta.first_seq - 1 if meta.first_seq else 0), 0
    while pos < meta.head:
        entries = await log.read(meta.key, pos, meta.head, page)
        if not entries:
            break
        for seq, body in entries:
            held += 1
            name = event_name(body)
            if name == GAP_EVENT.encode():
                gaps.append({"id": seq, **_data(body)})
            elif name == b"error":
                errors.append({"id": seq, **_data(body)})
        pos = entries[-1][0]
    return {**public(meta), "events_held": held, "gap_markers": gaps, "error_events": errors}
