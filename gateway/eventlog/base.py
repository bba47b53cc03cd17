"""The event log contract: what the hub needs from durable storage, and nothing of HTTP.

LMDB (``gateway.eventlog.lmdb``) is the embedded default. A shared log on a
distributed engine (Redis Streams) can implement the same interface so several
gateway replicas serve each other's resumes; ``tests/test_eventlog.py`` is the
contract suite such a backend must pass.

Positions ("seq") are integers from one counter for the whole log, so they
strictly increase within every stream, are never reused (not even after a
stream is evicted and captured again), and can be sent to clients as SSE ids.
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import orjson

from gateway.sse import Event

# (seq, body): a committed event as the hub and the handlers see it.
Entry = tuple[int, bytes]


class StorageError(RuntimeError):
    """The log could not commit or read."""


class StorageFull(StorageError):
    """The disk budget is spent and nothing finished is left to evict."""


@dataclass(slots=True)
class StreamMeta:
    """Everything the gateway knows about one captured stream, committed with its events."""

    key: str
    kind: str  # "run" | "thread"
    upstream: str
    path: str  # upstream path that re-joins this stream with GET
    thread_id: str | None = None
    run_id: str | None = None
    # The upstream keeps a replay buffer for it, so a lost upstream leg can be
    # re-joined with last_upstream_id instead of losing events.
    resumable: bool = False
    open: bool = True  # an ingest is (or should be) attached
    end: str | None = None  # "done" | "interrupted"; None while open or for thread streams
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    head: int = 0  # seq of the last event, 0 when empty
    count: int = 0
    size: int = 0  # bytes held in the log
    last_upstream_id: str | None = None
    # Lowest seq still held when retention trimmed the start of an open stream (0: nothing trimmed).
    first_seq: int = 0
    # Salted hash of the credentials that started the capture (gateway.access); never the secret.
    auth_salt: str | None = None
    auth_digest: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, raw: bytes) -> StreamMeta:
        data = orjson.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def finished(self) -> bool:
        return self.end is not None


class EventLog(abc.ABC):
    """Append-only, per-stream event log with group commit and retention."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Open storage and load stream metadata (streams left open by a crash stay open)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit what is queued and release storage."""

    @abc.abstractmethod
    def get(self, key: str) -> StreamMeta | None:
        """Metadata of a stream held in the log (cheap: no I/O)."""

    @abc.abstractmethod
    def streams(self) -> Iterable[StreamMeta]:
        """Every stream held in the log."""

    @abc.abstractmethod
    def begin(self, meta: StreamMeta) -> StreamMeta:
        """Start (or restart) capturing a stream; raises StorageFull when over budget.

        Made durable by the next commit. Restarting keeps the events already held.
        """

    @abc.abstractmethod
    def submit(self, key: str, events: Sequence[Event]) -> asyncio.Future[list[Entry]]:
        """Queue events for the next commit without waiting for it.

        The future gives the events with their seqs once committed. Futures
        resolve in submission order, so callbacks on them publish in order
        while the caller already parses the next chunk.
        """

    async def append(self, key: str, events: Sequence[Event]) -> list[Entry]:
        """Append events in order; returns them with their seqs once committed."""
        return await self.submit(key, events)

    @abc.abstractmethod
    async def finish(self, key: str, end: str | None, events: Sequence[Event] = ()) -> list[Entry]:
        """Append final events and close the stream in one commit.

        ``end`` is None for a stream that may be captured again later (a thread
        stream whose last client left).
        """

    @abc.abstractmethod
    async def read(self, key: str, after: int, upto: int, limit: int) -> list[Entry]:
        """Committed events with ``after < seq <= upto``, oldest first, at most ``limit``."""

    @abc.abstractmethod
    async def tail(self, key: str, limit: int) -> list[tuple[str | None, bytes]]:
        """Upstream ids and bodies of the last ``limit`` events (de-duplication on re-join)."""

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
        """False when a capture of ``key`` must be refused: over budget with nothing else finished to evict."""

    @property
    @abc.abstractmethod
    def last_seq(self) -> int:
        """The highest seq handed out so far, over all streams."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes held."""
