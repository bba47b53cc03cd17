"""Server-sent events: a sans-IO incremental parser and the gateway's framing.

The parser takes whatever bytes the socket delivered (any chunking, CR, LF or
CRLF line ends, multi-line data, comments) and returns the complete events in
that chunk, so the hot path handles one chunk per call, not one line.

An event is kept as its *body*: the ``event:``, ``retry:`` and ``data:`` lines
re-framed with LF, without the ``id:`` line. The gateway adds its own id when it sends
the event (``frame``), so a stored body never needs to be re-parsed.
"""

from __future__ import annotations

from typing import Iterable, Optional

from gateway import native

# Agent state snapshots can be large; an event bigger than this is a broken upstream.
DEFAULT_MAX_EVENT = 32 << 20
# Upstream event ids are short ("1733400000000-0"); the log stores one in a 16-bit length, and
# a longer one is a broken upstream too.
MAX_ID_BYTES = 4096

HEARTBEAT = b": heartbeat\n\n"
# A reconnection time is milliseconds; more digits than this is no time a client could wait.
_MAX_RETRY_DIGITS = 12
# A UTF-8 byte order mark: one at the very start of a stream is not part of it (WHATWG).
BOM = b"\xef\xbb\xbf"
# Every framed event and comment ends with it, and nothing inside one does (lines end in a single LF).
EVENT_END = b"\n\n"


# One parsed event: (body ready to frame, the upstream's id or None). A plain tuple on
# purpose: the parser makes one per event, and a class instance costs several times more.
Event = tuple[bytes, Optional[str]]


class SSEProtocolError(ValueError):
    """The upstream sent something that cannot be an event stream."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # The whole events the read held before what broke the stream (``Parser.feed``): a reader of
        # the upstream had them, so they are the stream's as much as the ones of earlier reads. Each
        # error's own list: a class-level one would be shared by every error that never set it.
        self.events: list[Event] = []


def event(body: bytes, upstream_id: str | None = None) -> Event:
    return (body, upstream_id)


def event_name(body: bytes) -> bytes:
    """The ``event:`` name of a stored body (``message`` when it has none)."""
    if body.startswith(b"event: "):
        return body[7 : body.index(b"\n")]
    return b"message"


def without_retry(body: bytes) -> bytes:
    """A stored body without its ``retry:`` line: the event as an upstream's replay re-sends it, which
    need not repeat a reconnection time the live stream set (one in a block of its own goes with the
    next event's body). Every line of a body begins with its field's name, so a line that begins with
    ``retry: `` is that field, never data."""
    if body.startswith(b"retry: "):
        at = 0
    else:
        at = body.find(b"\nretry: ") + 1
        if not at:
            return body
    return body[:at] + body[body.index(b"\n", at) + 1:]


def make_body(event: str | bytes | None, data: bytes) -> bytes:
    """Frame an event of our own (e.g. a synthetic error) as a stored body."""
    if isinstance(event, str):
        event = event.encode()
    head = b"event: " + event + b"\n" if event else b""
    return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n"))


def frame(entries: Iterable[tuple[int, bytes]]) -> bytes:
    """Wire bytes for many stored events at once, each with its gateway id."""
    if native.ON and isinstance(entries, list):
        return native.frame_entries(entries)
    return frame_py(entries)


def frame_py(entries: Iterable[tuple[int, bytes]]) -> bytes:
    """``frame`` in Python (the C twin must give the same bytes)."""
    return b"".join([b"%sid: %d\n\n" % (body, seq) for seq, body in entries])


class Parser:
    """Incremental SSE parser following the WHATWG event-stream rules."""

    __slots__ = ("_tail", "_skip_lf", "_event", "_data", "_size", "_id", "_max", "comments", "_head", "_retry")

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._tail = b""
        self._skip_lf = False  # last chunk ended in CR: a leading LF belongs to it
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._size = 0  # bytes of the event being assembled line by line (bounded like the rest)
        self._id: str | None = None
        self._max = max_event
        self.comments = 0  # comment lines seen (heartbeats), reset by the caller
        self._head: bytes | None = b""  # the stream's first bytes while they may be a BOM; None after
        # The last valid ``retry:`` not yet passed on: it goes with the event of its block, or (a block
        # without data dispatches nothing) with the next event.
        self._retry: bytes | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                self._head = chunk  # split across reads: wait for the rest
                return []
            self._head = None
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
                if not chunk:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._tail + chunk if self._tail else chunk
        if not buf:
            return []
        events: list[Event] = []
        try:
            if self._event is None and not self._data and self._id is None and self._retry is None:
                if self._feed_blocks(buf, events):
                    return events
            self._feed_lines(buf, events)
        except SSEProtocolError as exc:
            exc.events = events  # what came whole before the broken part
            raise
        return events

    def _feed_blocks(self, buf: bytes, events: list[Event]) -> bool:
        """Fast path: whole events at a time when every line end is LF or CRLF.

        Canonical frames (``event:``/``data:``/``id:`` lines, one data line)
        become bodies with a few slices; any other block goes line by line.
        Returns False when the buffer needs the general path (a lone CR), having
        parsed nothing; else the events went to ``events`` as they were parsed.
        """
        if native.ON:  # C takes the buffer when all of it is canonical blocks; else None, and on here
            done = native.split_events(buf, self._max)
            if done is not None:
                self.comments += done[2]
                events.extend(done[0])
                self._tail = self._bounded(buf[done[1]:])
                return True
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
            if b"\r" in buf:
                return False
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._tail = self._bounded(buf)
            return True
        tail = buf[end + 2:]
        append = events.append
        max_event = self._max
        for block in buf[:end].split(b"\n\n"):
            if len(block) > max_event:
                raise SSEProtocolError(f"SSE event larger than {max_event} bytes")
            if block[:1] == b"\n":
                block = block.lstrip(b"\n")  # extra blank lines between events
                if not block:
                    continue
            # A retry: still to pass on goes with the next event: the general rules take that one.
            nl = block.count(b"\n") if self._retry is None else -1
            if nl == 1:
                if block.startswith(b"event: ") and block.find(b"\ndata: ") > 0:
                    append((block + b"\n", None))
                    continue
            elif nl == 2:
                i = block.find(b"\n")
                j = block.rfind(b"\n")
                if (block.startswith(b"event: ") and block.startswith(b"data: ", i + 1)
                        and block.startswith(b"id: ", j + 1) and b"\x00" not in block[j:]):
                    append((block[:j + 1], _event_id(block[j + 5:])))
                    continue
            elif nl == 0:
                if block.startswith(b"data: "):
                    append((block + b"\n", None))
                    continue
                if block[:1] == b":":
                    self.comments += 1
                    continue
            for line in block.split(b"\n"):  # anything else: the general rules
                self._line(line, events)
            self._dispatch(events)
        self._tail = self._bounded(tail)
        return True

    def _feed_lines(self, buf: bytes, events: list[Event]) -> None:
        lines = buf.splitlines(keepends=True)
        last = lines[-1]
        tail = b""
        if last[-1:] not in (b"\n", b"\r"):
            tail = lines.pop()
        elif last[-1:] == b"\r":
            self._skip_lf = True
        for line in lines:
            self._line(line.rstrip(b"\r\n"), events)
        self._tail = self._bounded(tail)

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
        elif line[0] == 58:  # b":" comment
            self.comments += 1
        else:
            self._field(line)

    def _bounded(self, pending: bytes) -> bytes:
        # A pending block's final LF is no part of its event (it may begin the blank line that ends
        # it): counted, the same event was refused or not depending on where a read ended.
        if len(pending) - (pending[-1:] == b"\n") + self._size > self._max:
            raise SSEProtocolError(f"SSE event larger than {self._max} bytes")
        return pending

    def _field(self, line: bytes) -> None:
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value) + 7
            if self._size > self._max:
                raise SSEProtocolError(f"SSE event larger than {self._max} bytes")
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\x00" not in value:
                self._id = _event_id(value)
        elif name == b"retry":
            # The client's reconnection time (WHATWG: ASCII digits only, anything else is ignored).
            if value.isdigit() and value.isascii() and len(value) <= _MAX_RETRY_DIGITS:
                self._retry = value
        # Unknown fields are ignored, as a browser would.

    def _dispatch(self, out: list[Event]) -> None:
        if self._data:
            head = b"event: " + self._event + b"\n" if self._event else b""
            if self._retry is not None:
                # After the event line, before the data: a stored body's name and data read as ever.
                head += b"retry: " + self._retry + b"\n"
                self._retry = None
            body = head + b"".join([b"data: " + d + b"\n" for d in self._data])
            out.append((body, self._id))
        # An event's upstream id is the id line of its own block: that is what the
        # upstream accepts back as Last-Event-ID for this event.
        self._event = None
        self._data = []
        self._size = 0
        self._id = None

    def pending(self) -> bool:
        """True when an incomplete event is buffered (the stream was cut mid-event)."""
        return bool(self._tail or self._data or self._event is not None or self._head)


def _event_id(raw: bytes) -> str:
    if len(raw) > MAX_ID_BYTES:
        raise SSEProtocolError(f"SSE event id of {len(raw)} bytes (more than {MAX_ID_BYTES})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # An id goes back to the upstream as Last-Event-ID: decoded with replacement characters it
        # would be other bytes than the upstream sent, a resume point it never gave.
        shown = raw if len(raw) <= 64 else raw[:64] + b"..."
        raise SSEProtocolError(f"SSE event id {shown!r} is not UTF-8: it could not be sent back to the "
                               "upstream as it sent it") from None
