"""Durable event storage behind a small interface (``base``); LMDB is the embedded default."""

from __future__ import annotations

from gateway.eventlog.base import (
    EndReason,
    Entry,
    EventLog,
    StorageDamaged,
    StorageError,
    StorageFull,
    StreamKind,
    StreamMeta,
)
from gateway.eventlog.lmdb import CommitObserver, LmdbEventLog

__all__ = ["EndReason", "Entry", "EventLog", "StorageDamaged", "StorageError", "StorageFull", "StreamKind",
           "StreamMeta", "LmdbEventLog", "CommitObserver"]
