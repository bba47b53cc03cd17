"""The stored forms every backend shares: records of events, and metadata snapshots."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from gateway.eventlog import StreamMeta
from gateway.eventlog.records import decode, encode, record_time_ms
from gateway.sse import Event


def test_a_snapshot_advanced_by_a_chunk_keeps_every_other_field() -> None:
    # Every field gets a value unlike its default, so a field the copy dropped or reset shows.
    values: dict[str, Any] = {}
    for i, f in enumerate(fields(StreamMeta)):
        if f.type in ("int",):
            values[f.name] = 1000 + i
        elif f.type in ("float",):
            values[f.name] = 1000.5 + i
        elif f.type in ("bool",):
            values[f.name] = not f.default
        elif f.name == "kind":
            values[f.name] = "thread"
        elif f.name == "end":
            values[f.name] = "interrupted"
        else:
            values[f.name] = f"{f.name}-{i}"
    meta = StreamMeta(**values)
    moved = meta.advanced(7, 8, 9, "up-9", "messages", 123.25)
    assert moved == replace(meta, head=7, count=8, size=9, last_upstream_id="up-9", last_event="messages",
                            updated_at=123.25)
    assert {f.name: getattr(moved, f.name) for f in fields(StreamMeta)} != values  # it did change


@pytest.mark.parametrize("events", [
    [(b"event: messages\ndata: {\"t\": 1}\n", None)],  # one token per chunk: the common case
    [(b"event: messages\ndata: {\"t\": 1}\n", "1700000000000-0")],
    [(b"data: a\n", None), (b"event: end\ndata: b\n", "7-0")],
    [(b"data: " + b"x" * 70_000 + b"\n", None)],
], ids=["one", "one-with-id", "two", "big"])
def test_records_decode_to_what_was_encoded(events: list[Event]) -> None:
    enc = encode(events, 1_700_000_000_123)
    assert decode(41, enc.record) == [(41 + i, uid, body) for i, (body, uid) in enumerate(events)]
    assert record_time_ms(enc.record) == 1_700_000_000_123
    assert enc.count == len(events)
    assert enc.nbytes == sum(len(b) for b, _ in events)
    assert enc.last_upstream_id == next((u for _, u in reversed(events) if u is not None), None)
    assert enc.last_event == ("end" if len(events) == 2 else "messages" if events[0][0].startswith(b"event:") else
                              "message")
