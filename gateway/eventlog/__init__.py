"""Durable event storage behind a small interface (``base``); LMDB is the embedded default, Redis the
shared log of several replicas. ``open_log`` and ``open_view`` are the one place a backend is chosen."""

from __future__ import annotations

from pathlib import Path

from gateway.config import Storage
from gateway.eventlog.base import (
    CommitObserver,
    EndReason,
    Entry,
    EventLog,
    LogView,
    Record,
    StorageDamaged,
    StorageError,
    StorageFull,
    StreamKind,
    StreamMeta,
)
from gateway.eventlog.lmdb import LmdbEventLog, LmdbView


def open_log(cfg: Storage, *, on_commit: CommitObserver | None = None) -> EventLog:
    """The log the config names, not yet opened (``await log.open()``)."""
    if cfg.backend == "redis":
        from gateway.eventlog.redis import RedisEventLog  # only here: the embedded log needs nothing of it

        return RedisEventLog(cfg, on_commit=on_commit)
    if cfg.shared:
        from gateway.eventlog.lmdb_shared import SharedLmdbEventLog

        return SharedLmdbEventLog(cfg, on_commit=on_commit)
    return LmdbEventLog(cfg, on_commit=on_commit)


def open_view(cfg: Storage) -> LogView:
    """The log the config names, read-only, for the operator commands."""
    if cfg.backend == "redis":
        from gateway.eventlog.redis import RedisView

        return RedisView(cfg)
    return LmdbView(Path(cfg.path))


__all__ = ["CommitObserver", "EndReason", "Entry", "EventLog", "LogView", "Record", "StorageDamaged",
           "StorageError", "StorageFull", "StreamKind", "StreamMeta", "LmdbEventLog", "open_log", "open_view"]
