"""The sans-IO SSE parser, fed the same bytes split at every offset."""

from __future__ import annotations

import pytest

from gateway.sse import (
    MAX_ID_BYTES,
    Event,
    Parser,
    SSEProtocolError,
    event,
    event_name,
    frame,
    make_body,
)

STREAM_CRLF = (
    b"event: metadata\r\ndata: {\"run_id\":\"r1\",\"attempt\":1}\r\nid: 1795-0\r\n\r\n"
    b": heartbeat\r\n\r\n"
    b"event: custom\r\ndata: {\"i\":0}\r\n\r\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"event: error\r\ndata: {\"error\":\"ValueError\"}\r\nid: 1796-0\r\n\r\n"
)
EXPECTED = [
    event(b"event: metadata\ndata: {\"run_id\":\"r1\",\"attempt\":1}\n", "1795-0"),
    event(b"event: custom\ndata: {\"i\":0}\n", None),
    event(b"data: line one\ndata: line two\n", None),
    event(b"event: error\ndata: {\"error\":\"ValueError\"}\n", "1796-0"),
]


def feed_split(data: bytes, *cuts: int, max_event: int | None = None) -> tuple[list[Event], Parser]:
    p = Parser() if max_event is None else Parser(max_event)
    out: list[Event] = []
    prev = 0
    for c in (*cuts, len(data)):
        out.extend(p.feed(data[prev:c]))
        prev = c
    return out, p


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_every_single_split_gives_the_same_events(eol: bytes) -> None:
    data = STREAM_CRLF.replace(b"\r\n", eol)
    for cut in range(len(data) + 1):
        events, p = feed_split(data, cut)
        assert events == EXPECTED, f"split at {cut}"
        assert p.comments == 1
        assert not p.pending()


def test_every_pair_of_splits_crlf() -> None:
    data = STREAM_CRLF
    for a in range(0, len(data) + 1, 3):
        for b in range(a, len(data) + 1, 7):
            events, _ = feed_split(data, a, b)
            assert events == EXPECTED, (a, b)


def test_byte_by_byte() -> None:
    events, _ = feed_split(STREAM_CRLF, *range(1, len(STREAM_CRLF)))
    assert events == EXPECTED


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    p = Parser()
    assert p.feed(b"data: a\r") == []
    # The LF completes CRLF (not a blank line); the CR after it is the blank line.
    assert [body for body, _ in p.feed(b"\n\r")] == [b"data: a\n"]
    assert p.feed(b"\n") == []  # the LF of that CRLF, again split across chunks
    assert not p.pending()


def test_field_without_space_and_unknown_fields() -> None:
    p = Parser()
    out = p.feed(b"event:x\ndata:1\nfoo: bar\n\n")
    assert out == [event(b"event: x\ndata: 1\n", None)]


def test_a_retry_field_goes_with_its_event_and_one_alone_with_the_next() -> None:
    # WHATWG: `retry:` (ASCII digits only) sets the client's reconnection time wherever it comes,
    # also in a block that dispatches no event. Dropped, a client of the gateway never learnt the
    # upstream's. Kept in the stored body (after the event line, so the event's name and data read
    # as before), it reaches live and replaying clients alike.
    p = Parser()
    assert p.feed(b"retry: 2500\n\n") == []
    assert p.feed(b"event: a\ndata: 1\n\n") == [(b"event: a\nretry: 2500\ndata: 1\n", None)]
    assert p.feed(b"event: b\ndata: 2\nretry: 3000\nretry: 5x\nid: 7-0\n\n") == [
        (b"event: b\nretry: 3000\ndata: 2\n", "7-0")]  # a value that is not digits is ignored
    assert p.feed(b"data: 3\n\n") == [(b"data: 3\n", None)], "said once"
    assert p.feed(b"retry:10\rdata: 4\r\r") == [(b"retry: 10\ndata: 4\n", None)]
    for eol in (b"\n", b"\r\n"):  # in one read with the events after it (the fast path's input)
        assert Parser().feed(b"retry: 9\n\nevent: a\ndata: 1\n\nevent: b\ndata: 2\nid: 1-0\n\n".replace(b"\n", eol)) == [
            (b"event: a\nretry: 9\ndata: 1\n", None), (b"event: b\ndata: 2\n", "1-0")]
    assert not p.pending()


def test_event_without_data_is_not_dispatched() -> None:
    assert Parser().feed(b"event: lonely\n\n") == []


def test_incomplete_event_is_pending() -> None:
    p = Parser()
    p.feed(b"event: custom\ndata: {\"i\"")
    assert p.pending()


def test_overlong_line_is_a_protocol_error() -> None:
    p = Parser(16)
    with pytest.raises(SSEProtocolError):
        p.feed(b"data: " + b"x" * 64)


@pytest.mark.parametrize("eol", [b"\r", b"\n", b"\r\n"])
def test_event_size_limit_holds_on_every_path(eol: bytes) -> None:
    # Many lines, each well under the limit, that add up to an event over it.
    p = Parser(1 << 20)
    p.feed(b"data: a" + eol)  # a lone CR sends the parser down its general path
    with pytest.raises(SSEProtocolError):
        for _ in range(40):
            p.feed(b"data: " + b"x" * (64 << 10) + eol)


def test_events_under_the_limit_in_many_lines_pass() -> None:
    p = Parser(1 << 20)
    got = p.feed(b"data: a\r" + b"data: bb\r" * 1000 + b"\r")
    assert len(got) == 1 and got[0][0].count(b"\n") == 1001


def test_frame_adds_gateway_ids_and_blank_lines() -> None:
    wire = frame([(7, b"event: custom\ndata: 1\n"), (9, b"data: 2\n")])
    assert wire == b"event: custom\ndata: 1\nid: 7\n\ndata: 2\nid: 9\n\n"


def test_event_name_and_make_body() -> None:
    body = make_body("error", b'{"a":1}\n{"b":2}')
    assert body == b'event: error\ndata: {"a":1}\ndata: {"b":2}\n'
    assert event_name(body) == b"error"
    assert event_name(b"data: x\n") == b"message"


def test_fast_and_general_paths_agree_on_random_splits() -> None:
    import random

    rng = random.Random(7)
    parts = []
    for i in range(300):
        kind = rng.randrange(6)
        if kind == 0:
            parts.append(b"event: custom\ndata: {\"i\":%d}\n\n" % i)
        elif kind == 1:
            parts.append(b"event: values\ndata: {\"i\":%d}\nid: %d-0\n\n" % (i, i))
        elif kind == 2:
            parts.append(b"data: plain %d\n\n\n" % i)  # an extra blank line
        elif kind == 3:
            parts.append(b": heartbeat\n\n")
        elif kind == 4:
            parts.append(b"id: %d-1\nevent:odd\ndata: a\ndata: b\n\n" % i)  # field order and spacing vary
        else:
            parts.append(b"event: e\ndata: x\nretry: 5\n\n")
    lf = b"".join(parts)
    reference, _ = feed_split(lf.replace(b"\n", b"\r"))  # lone CRs: the general path only
    for eol in (b"\n", b"\r\n"):
        data = lf.replace(b"\n", eol)
        cuts = sorted(rng.sample(range(1, len(data)), 120))
        got, p = feed_split(data, *cuts)
        assert got == reference
        assert not p.pending()


def test_an_event_at_the_limit_is_taken_wherever_the_reads_split_it() -> None:
    # The pending part of an event was bounded with its last line's LF counted: a read ending right
    # after that LF refused the event that any other split of the same bytes took.
    limit = 1 << 10
    body = b"event: x\ndata: " + b"a" * (limit - 15)
    assert len(body) == limit
    for eol in (b"\n", b"\r\n"):
        data = (body + b"\n\ndata: next\n\n").replace(b"\n", eol)
        for cut in range(1, len(data)):
            got, p = feed_split(data, cut, max_event=limit)
            assert [b[-5:] for b, _ in got] == [b"aaaa\n", b"next\n"], (eol, cut)
        with pytest.raises(SSEProtocolError):
            feed_split((b"event: x\ndata: " + b"a" * (limit - 14) + b"\n\n").replace(b"\n", eol), len(body) + 2,
                       max_event=limit)


def test_a_whole_event_over_the_limit_in_one_chunk_is_refused_too() -> None:
    p = Parser(1 << 10)
    with pytest.raises(SSEProtocolError):
        p.feed(b"event: custom\ndata: " + b"x" * 4096 + b"\n\n")


@pytest.mark.parametrize("frame", [b"event: custom\ndata: 1\nid: %s\n\n",  # the fast path's canonical frame
                                   b"id: %s\nevent: custom\ndata: 1\n\n",  # the line-by-line rules
                                   b"event: custom\rdata: 1\rid: %s\r\r"])
def test_an_event_id_longer_than_a_record_holds_is_a_protocol_error(frame: bytes) -> None:
    assert Parser().feed(frame % (b"7" * MAX_ID_BYTES)) == [(b"event: custom\ndata: 1\n", "7" * MAX_ID_BYTES)]
    with pytest.raises(SSEProtocolError, match="id"):
        Parser().feed(frame % (b"7" * (MAX_ID_BYTES + 1)))


@pytest.mark.parametrize("frame", [b"event: custom\ndata: 1\nid: %s\n\n",  # the fast path's canonical frame
                                   b"id: %s\nevent: custom\ndata: 1\n\n",  # the line-by-line rules
                                   b"event: custom\rdata: 1\rid: %s\r\r"])
def test_an_event_id_that_is_not_utf8_is_refused_not_stored_altered(frame: bytes) -> None:
    # The id goes back to the upstream as Last-Event-ID on a re-join: decoded with replacement
    # characters it was stored as other bytes than the upstream sent, so the upstream was asked to
    # resume from an id it never gave. Refused, with the reason, instead of altered.
    uid = "1795399126916-0\u00e9"
    assert Parser().feed(frame % uid.encode()) == [(b"event: custom\ndata: 1\n", uid)]
    for bad in (b"\xff\xfe-0", b"1795399126916-0\xc3", b"\xed\xa0\x80-0"):
        p = Parser()
        with pytest.raises(SSEProtocolError, match="not UTF-8") as caught:
            p.feed(b"event: custom\ndata: 0\n\n" + frame % bad)
        assert caught.value.events == [(b"event: custom\ndata: 0\n", None)], "what came whole before is kept"


def test_a_byte_order_mark_starting_the_stream_is_not_part_of_its_first_field() -> None:
    # WHATWG (and the SDKs' decoders) drop one BOM at the start of a stream; kept, it made the first
    # event's "event:" line an unknown field, and the event a "message" in the log.
    bom = b"\xef\xbb\xbf"
    for eol in (b"\r\n", b"\n", b"\r"):
        data = bom + STREAM_CRLF.replace(b"\r\n", eol)
        for cut in range(8):
            events, p = feed_split(data, cut)
            assert events == EXPECTED, (eol, cut)
        events, _ = feed_split(data, *range(1, len(data)))
        assert events == EXPECTED, (eol, "byte by byte")
    # Only at the start: a later one is part of its line, as for any reader (here an unknown field).
    events, _ = feed_split(STREAM_CRLF + bom + b"data: x\r\n\r\n")
    assert events == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
@pytest.mark.parametrize("where", ["whole", "tail"])
def test_the_events_before_an_oversized_one_in_the_same_read_come_with_the_error(eol: bytes, where: str) -> None:
    # A reader of the upstream had them: the capture stores them before the stream ends with the
    # error, instead of losing the whole read.
    small = [b"event: a\ndata: 1\n\n", b"data: 2\nid: 7\n\n"]
    big = b"event: b\ndata: " + b"x" * 300 + (b"\n\n" if where == "whole" else b"")
    p = Parser(max_event=200)
    with pytest.raises(SSEProtocolError) as raised:
        p.feed(b"".join(small).replace(b"\n", eol) + big.replace(b"\n", eol))
    assert raised.value.events == [event(b"event: a\ndata: 1\n"), event(b"data: 2\n", "7")]
