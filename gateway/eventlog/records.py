"""The stored form of one appended batch, shared by every backend.

A record holds a chunk's events with consecutive seqs, so one write (an LMDB
put, a Redis stream entry) carries a whole chunk:
``<u64 unix ms>`` then for each event ``<u32 body length><u16 id length><upstream id><body>``.
The first seq is the record's key (LMDB) or entry id (Redis); the time lets
retention trim the old part of a thread stream that never closes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

from gateway import native
from gateway.eventlog.base import Entry, StorageDamaged
from gateway.sse import Event, event_name

_EVENT_HEAD = struct.Struct(">IH")  # body length, upstream id length
RECORD_TIME = struct.Struct(">Q")  # unix ms the batch was appended


@dataclass(slots=True)  # not frozen: made once per chunk, and a frozen dataclass's __init__ costs twice as much
class Encoded:
    """A batch of events ready to store: the record, and what it changes in the stream's metadata."""

    record: bytes
    count: int
    nbytes: int  # bodies only: what followers queue
    last_upstream_id: str | None  # the newest id in the batch (None: none had one)
    last_event: str  # the SSE name of the batch's last event
    # The events with their seqs, numbered from encode's ``first`` (LMDB numbers them itself;
    # Redis learns them from the server and ignores these).
    entries: list[Entry]


_ONE_EVENT = struct.Struct(">QIH")  # RECORD_TIME then _EVENT_HEAD: a record of one event in one pack


def encode(events: Sequence[Event], now_ms: int, first: int = 0) -> Encoded:
    """The record of ``events``, the first of them numbered ``first`` in ``Encoded.entries``."""
    if native.ON:
        record, entries, nbytes, last_uid, name = native.encode_events(events, now_ms, first)
        return Encoded(record, len(events), nbytes, last_uid, name, entries)
    return encode_py(events, now_ms, first)


def encode_py(events: Sequence[Event], now_ms: int, first: int = 0) -> Encoded:
    """``encode`` in Python (the C twin must give the same record)."""
    if len(events) == 1:  # one token per chunk: the common case, in one pack and one concatenation
        body, uid = events[0]
        name = event_name(body).decode("utf-8", "replace")
        if uid is None:
            return Encoded(_ONE_EVENT.pack(now_ms, len(body), 0) + body, 1, len(body), None, name, [(first, body)])
        ub = uid.encode()
        return Encoded(_ONE_EVENT.pack(now_ms, len(body), len(ub)) + ub + body, 1, len(body), uid, name,
                       [(first, body)])
    parts: list[bytes] = [RECORD_TIME.pack(now_ms)]
    pack = _EVENT_HEAD.pack
    last_uid: str | None = None
    nbytes = 0
    for body, uid in events:
        if uid is None:
            parts += (pack(len(body), 0), body)
        else:
            ub = uid.encode()
            parts += (pack(len(body), len(ub)), ub, body)
            last_uid = uid
        nbytes += len(body)
    return Encoded(b"".join(parts), len(events), nbytes, last_uid,
                   event_name(events[-1][0]).decode("utf-8", "replace") if events else "",
                   [(first + i, body) for i, (body, _uid) in enumerate(events)])


def decode(first: int, value: bytes) -> list[tuple[int, str | None, bytes]]:
    """The events of one record: (seq, upstream id, body); StorageDamaged if it is not one."""
    if native.ON:
        out = native.decode_record(first, value)
        if out is not None:
            return out
    return decode_py(first, value)  # also what says how a damaged record is damaged


def decode_py(first: int, value: bytes) -> list[tuple[int, str | None, bytes]]:
    """``decode`` in Python (the C twin must give the same events)."""
    return [(seq, value[i:i + ulen].decode("utf-8", "replace") if ulen else None, value[i + ulen:i + ulen + blen])
            for seq, i, ulen, blen in _events_of(first, value)]


def _events_of(first: int, value: bytes, upto: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Each event of a record (up to seq ``upto``), in order, as (seq, where its upstream id begins,
    the id's length, the body's length; the body follows the id), each found whole before it is
    given; StorageDamaged where the record is not one."""
    n = len(value)
    if n < RECORD_TIME.size + _EVENT_HEAD.size:
        raise StorageDamaged(f"record at seq {first} is {n} bytes, too short to hold an event")
    unpack = _EVENT_HEAD.unpack_from
    i, seq = RECORD_TIME.size, first
    while i < n and (upto is None or seq <= upto):
        if i + 6 > n:
            raise StorageDamaged(f"record at seq {first} ends inside an event header")
        blen, ulen = unpack(value, i)
        i += 6
        if i + ulen + blen > n:
            raise StorageDamaged(f"record at seq {first} ends inside an event ({blen} bytes announced)")
        yield seq, i, ulen, blen
        i += ulen + blen
        seq += 1


_LAST_SEQ = 2**63 - 1


def entries_in(first: int, value: bytes, after: int = -1, upto: int = _LAST_SEQ) -> list[Entry]:
    """The (seq, body) of a record's events with ``after < seq <= upto`` (by default all of them):
    a page without bounds; StorageDamaged if the part read is not a record."""
    return record_page(first, value, after, upto, _LAST_SEQ, _LAST_SEQ, True)[0]


def entries_in_py(first: int, value: bytes, after: int = -1, upto: int = _LAST_SEQ) -> list[Entry]:
    """``entries_in`` in Python (the C twin must give the same entries)."""
    return record_page_py(first, value, after, upto, _LAST_SEQ, _LAST_SEQ, True)[0]


def record_page(first: int, value: bytes, after: int, upto: int, most: int, room: int,
                anyway: bool) -> tuple[list[Entry], int, bool]:
    """A record's part of a page being read: its (seq, body) with ``after < seq <= upto``, at most
    ``most`` of them, and none whose body takes their bytes past ``room`` unless it is the first
    taken and ``anyway`` (a page holds one event at least); with the bodies' bytes, and whether it
    stopped with more of the range left. The record is read only as far as the page takes it: a
    64 KiB replay page of a 256 KiB record made every event of the record, and threw most away.
    StorageDamaged if the part read is not a record."""
    if native.ON:
        out = native.record_page(first, value, after, upto, most, room, anyway)
        if out is not None:
            return out
    return record_page_py(first, value, after, upto, most, room, anyway)


def record_page_py(first: int, value: bytes, after: int, upto: int, most: int, room: int,
                   anyway: bool) -> tuple[list[Entry], int, bool]:
    """``record_page`` in Python (the C twin must give the same page)."""
    out: list[Entry] = []
    used = 0
    for seq, i, ulen, blen in _events_of(first, value, upto):
        if after < seq:
            if len(out) >= most or (used + blen > room and not (anyway and not out)):
                return out, used, True
            out.append((seq, value[i + ulen:i + ulen + blen]))
            used += blen
    return out, used, False


def record_time_ms(value: bytes) -> int:
    return int(RECORD_TIME.unpack_from(value)[0])
