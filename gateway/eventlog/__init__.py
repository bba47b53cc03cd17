"""Durable event storage behind a small interface (``base``); LMDB is the embedded default."""

from __future__ import annotations

from gateway.eventlog.base import Entry, EventLog, StorageError, StorageFull, StreamMeta
from gateway.eventlog.lmdb import CommitObserver, LmdbEventLog

__all__ = ["Entry", "EventLog", "StorageError", "StorageFull", "StreamMeta", "LmdbEventLog", "CommitObserver"]
