"""The C extension (gateway/_native.c) gives exactly what its Python twins give.

Every stream a capture parses, every record it stores and every byte a client gets goes through
these functions, so each is checked against the Python code on generated input: canonical
token streams (what the C path takes) mixed with everything it must hand back to Python (CR line
ends, multi-line data, odd fields, comments, oversized events, damaged records).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import native
from gateway.eventlog.base import StorageDamaged
from gateway.eventlog.records import (decode, decode_py, encode, encode_py, entries_in, entries_in_py, record_page,
                                      record_page_py)
from gateway.sse import Event, Parser, SSEProtocolError, frame, frame_py
from gateway.streamclient import LegConnection
from tests.support.procs import tree_env

needs_c = pytest.mark.skipif(not native.ON, reason="the C extension is not built here (or GATEWAY_PURE_PYTHON)")

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=12)
_word = st.text("abcxyz_0", min_size=1, max_size=8)

# One block of an event stream, as upstreams send them: mostly canonical, sometimes not.
_block = st.one_of(
    st.builds(lambda n, d: f"event: {n}\ndata: {d}\n\n", _word, _text),
    st.builds(lambda n, d, i: f"event: {n}\ndata: {d}\nid: {i}\n\n", _word, _text, _text),
    st.builds(lambda d: f"data: {d}\n\n", _text),
    st.just(": heartbeat\n\n"),
    st.just("\n"),  # an extra blank line between events
    st.builds(lambda d, e: f"data: {d}\ndata: {e}\n\n", _text, _text),
    st.builds(lambda d: f"retry: 10\ndata: {d}\n\n", _text),
    st.builds(lambda n, d: f"event: {n}\r\ndata: {d}\r\n\r\n", _word, _text),
    st.builds(lambda d: f"data:{d}\rid: x\r\r", _text),
    st.builds(lambda n, d: f"event: {n}\ndata: {d}\nid: a\x00b\n\n", _word, _text),
    st.builds(lambda d: f"id: 7\ndata: {d}\n\n", _text),
    st.builds(lambda d: f"event: big\ndata: {d * 40}\n\n", _text),
)


def _parse(chunks: list[bytes], max_event: int) -> tuple[list[Event], int, bool, str | None]:
    parser = Parser(max_event)
    events: list[Event] = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
    except SSEProtocolError as exc:
        return events, parser.comments, parser.pending(), str(exc)
    return events, parser.comments, parser.pending(), None


@needs_c
@settings(max_examples=400, deadline=None)
@given(blocks=st.lists(_block, max_size=30), cuts=st.lists(st.integers(0, 4000), max_size=6),
       raw=st.binary(max_size=8), max_event=st.sampled_from([64, 1 << 20]))
def test_the_parser_gives_the_same_events_in_c_and_in_python(
        blocks: list[str], cuts: list[int], raw: bytes, max_event: int) -> None:
    data = "".join(blocks).encode() + raw  # raw: a tail that may be any bytes, even invalid UTF-8
    edges = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(edges, edges[1:])]
    in_c = _parse(chunks, max_event)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "ON", False)
        in_python = _parse(chunks, max_event)
    assert in_c == in_python


@needs_c
def test_the_fast_path_takes_canonical_blocks_and_hands_back_anything_else() -> None:
    took = native.split_events(b"event: a\ndata: 1\nid: 9\n\n: hb\n\ndata: 2\n\nevent: b\nda", 1 << 20)
    assert took == ([(b"event: a\ndata: 1\n", "9"), (b"data: 2\n", None)], 39, 1)
    assert native.split_events(b"data: 1\ndata: 2\n\n", 1 << 20) is None
    assert native.split_events(b"data: 1\r\n\r\n", 1 << 20) is None
    assert native.split_events(b"data: " + b"x" * 100 + b"\n\n", 64) is None  # Python raises it


_event = st.tuples(st.one_of(st.builds(lambda n, d: f"event: {n}\ndata: {d}\n".encode(), _text, _text),
                             st.binary(max_size=40).map(lambda b: b"data: " + b + b"\n")),
                   st.one_of(st.none(), _text))


@needs_c
@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=12), now=st.integers(0, 2**63), first=st.integers(0, 2**62))
def test_records_are_the_same_bytes_and_read_back_the_same(
        events: list[Event], now: int, first: int) -> None:
    in_c = encode(events, now, first)
    assert in_c == encode_py(events, now, first)
    if events:  # a record holds at least one event
        assert decode(first, in_c.record) == decode_py(first, in_c.record) == [
            (first + i, uid or None, body) for i, (body, uid) in enumerate(events)]  # an empty id is none


@needs_c
@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, min_size=1, max_size=12), first=st.integers(0, 2**40),
       after=st.integers(-2, 16), upto=st.integers(-2, 16))
def test_a_range_of_a_record_is_the_same(events: list[Event], first: int, after: int, upto: int) -> None:
    record = encode(events, 0, first).record
    assert entries_in(first, record, first + after, first + upto) == entries_in_py(
        first, record, first + after, first + upto)
    assert entries_in(first, record) == [(first + i, body) for i, (body, _uid) in enumerate(events)]


@needs_c
@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, min_size=1, max_size=12), first=st.integers(0, 2**40),
       after=st.integers(-2, 16), upto=st.integers(-2, 16), most=st.integers(0, 14), room=st.integers(0, 400),
       anyway=st.booleans())
def test_a_records_part_of_a_page_is_the_same(events: list[Event], first: int, after: int, upto: int, most: int,
                                              room: int, anyway: bool) -> None:
    record = encode(events, 0, first).record
    got = record_page(first, record, first + after, first + upto, most, room, anyway)
    assert got == record_page_py(first, record, first + after, first + upto, most, room, anyway)
    # What a page takes of the range: its first events, within the count and the bytes (one anyway).
    page, used, full = got
    wanted = entries_in(first, record, first + after, first + upto)
    assert page == wanted[:len(page)] and used == sum(len(body) for _, body in page)
    assert len(page) <= most and (used <= room or (anyway and len(page) == 1))
    assert full == (len(page) < len(wanted))
    if full:  # it stopped only because the next one did not fit
        nxt = len(wanted[len(page)][1])
        assert len(page) == most or (used + nxt > room and not (anyway and not page))


def _told(read: Callable[[int, bytes], object], first: int, record: bytes) -> object:
    try:
        return read(first, record)
    except StorageDamaged as exc:
        return str(exc)


@needs_c
@settings(max_examples=300, deadline=None)
@given(record=st.binary(max_size=60), first=st.integers(0, 2**40))
def test_a_damaged_record_is_told_the_same_way(record: bytes, first: int) -> None:
    assert _told(decode, first, record) == _told(decode_py, first, record)
    assert _told(entries_in, first, record) == _told(entries_in_py, first, record)
    for most, room in ((1, 0), (100, 10**6)):  # a part of it, and all of it
        assert _told(partial(record_page, after=-1, upto=2**62, most=most, room=room, anyway=True), first, record) == \
            _told(partial(record_page_py, after=-1, upto=2**62, most=most, room=room, anyway=True), first, record)


@needs_c
def test_a_truncated_record_is_damaged_in_c_too() -> None:
    good = encode([(b"data: x\n", "7"), (b"data: y\n", None)], 5, 1).record
    whole = {8 + 6 + 1 + 8, len(good)}  # where a record of one or two events ends
    for cut in range(len(good)):
        assert (native.decode_record(1, good[:cut]) is None) == (cut not in whole)
    head = struct.pack(">QIH", 0, 99, 0) + b"short"
    with pytest.raises(StorageDamaged, match="ends inside an event"):
        decode(1, head)


@needs_c
@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.binary(max_size=300)), max_size=20))
def test_the_wire_framing_is_the_same(entries: list[tuple[int, bytes]]) -> None:
    assert frame(entries) == frame_py(entries)
    data = frame_py(entries)
    assert native.frame_entries(entries, True) == (b"%x\r\n%s\r\n" % (len(data), data) if entries else b"")


# One chunk of a chunked body as upstreams (and broken upstreams) write them.
_chunk = st.one_of(
    st.builds(lambda p: b"%x\r\n%s\r\n" % (len(p), p), st.binary(min_size=1, max_size=40)),
    st.builds(lambda p: b"%X;ext=1 \r\n%s\r\n" % (len(p), p), st.binary(min_size=1, max_size=40)),
    st.builds(lambda p: b"  000%x \r\n%s\r\n" % (len(p), p), st.binary(min_size=1, max_size=40)),
    st.just(b"1\r\nab\r\n"),  # longer than announced: no CRLF where due
    st.just(b"zz\r\n"),  # not a size
    st.just(b"\r\n"),  # an empty size line
    st.just(b"1_0\r\n"),  # int() would take it, HTTP does not
    st.just(b"10000000000000000\r\n"),  # more hex digits than C takes: Python says it
    st.just(b"5" * 1100),  # a size line without an end
)
_last = st.sampled_from([b"", b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"0\r\n\r\nextra"])


def _dechunked(reads: list[bytes]) -> tuple[list[tuple[bytes, bool]], str | None, tuple[object, ...]]:
    conn = LegConnection.__new__(LegConnection)
    conn._reset()
    out: list[tuple[bytes, bool]] = []
    error = None
    for data in reads:
        try:
            payload, ended = conn._dechunk(data)
        except ValueError as exc:
            error = str(exc)
            break
        out.append((payload, ended))
        if ended:
            break
    return out, error, (conn._buf, conn._left, conn._crlf, conn._trailers, conn.reusable)


@needs_c
@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(_chunk, max_size=12), last=_last, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_a_chunked_body_reads_the_same_in_c_and_in_python(chunks: list[bytes], last: bytes, cuts: list[int]) -> None:
    data = b"".join(chunks) + last
    edges = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    reads = [data[a:b] for a, b in zip(edges, edges[1:])]
    in_c = _dechunked(reads)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "ON", False)
        in_python = _dechunked(reads)
    assert in_c == in_python


@needs_c
def test_a_token_s_chunk_is_read_in_c() -> None:
    """Guards the speed-up itself: a canonical chunk never falls back to the Python twin."""
    assert native.dechunk(b"5\r\nhello\r\n3\r\nabc", 0, False, False, 1024) == (b"helloabc", 16, 0, True, False, False)
    assert native.dechunk(b"\r\n0\r\n\r\n", 0, True, False, 1024) == (b"", 7, 0, False, True, True)


@needs_c
def test_a_slotted_object_is_cloned_whole_and_anything_else_is_refused() -> None:
    class Slotted:
        __slots__ = ("a", "b", "unset")
        a: object
        b: str

    class Plain:
        pass

    held = object()
    obj = Slotted()
    obj.a, obj.b = held, "b"
    before = sys.getrefcount(held)
    copy = native.clone(obj)
    assert sys.getrefcount(held) == before + 1  # the copy holds its own reference
    assert isinstance(copy, Slotted) and copy is not obj
    assert copy.a is held and copy.b == "b" and not hasattr(copy, "unset")

    class Derived(Slotted):
        __slots__ = ("c",)

    assert native.clone(Plain()) is None and native.clone(Derived()) is None
    assert native.clone([1]) is None and native.clone("s") is None and native.clone(1.5) is None


def test_the_extension_is_built_where_a_compiler_is() -> None:
    """Guards the build: `pip install` must not have fallen back to Python silently here."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    from gateway import _native

    assert _native.__file__ is not None and _native.__file__.endswith(".so")


def test_the_python_twins_can_be_forced() -> None:
    """``GATEWAY_PURE_PYTHON=1`` runs the Python code even where the extension is built (to compare)."""
    probe = "from gateway import native; print(native.ON)"
    env = tree_env(dict(os.environ, GATEWAY_PURE_PYTHON="1"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
