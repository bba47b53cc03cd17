"""A deliberately naive SSE reader for assertions, independent of the gateway's own parser."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True)
class Ev:
    event: str
    data: str
    id: str | None

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


def parse_all(text: str) -> list[Ev]:
    out: list[Ev] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data, eid = "message", [], None
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                eid = value
        if data:
            out.append(Ev(event, "\n".join(data), eid))
    return out


# Bytes read past the last event returned, per response, so a later call goes on from there.
_LEFTOVER: "weakref.WeakKeyDictionary[aiohttp.ClientResponse, tuple[list[Ev], str]]" = weakref.WeakKeyDictionary()


async def read_events(resp: aiohttp.ClientResponse, limit: int | None = None) -> list[Ev]:
    """Read events until the body ends, or until `limit` events arrived.

    Events that arrived in the same chunk beyond `limit` are kept for the next
    call on the same response (a client that closes instead never saw them).
    """
    pending, buf = _LEFTOVER.pop(resp, ([], ""))
    got: list[Ev] = list(pending)

    def done() -> bool:
        return limit is not None and len(got) >= limit

    if not done():
        async for chunk in resp.content.iter_any():
            buf += chunk.decode()
            *blocks, buf = buf.replace("\r\n", "\n").split("\n\n")
            for block in blocks:
                got.extend(parse_all(block + "\n\n"))
            if done():
                break
        else:
            got.extend(parse_all(buf))
            buf = ""
    if limit is not None and len(got) > limit:
        _LEFTOVER[resp] = (got[limit:], buf)
        return got[:limit]
    if buf:
        _LEFTOVER[resp] = ([], buf)
    return got


async def read_until_cut(resp: aiohttp.ClientResponse) -> tuple[list[Ev], bool]:
    """Every whole event up to the end of the body, and whether the body was cut (no clean end).

    A cut is how the gateway says "this stream is not complete": the client must reconnect.
    """
    raw = b""
    try:
        async for chunk in resp.content.iter_any():
            raw += chunk
    except aiohttp.ClientError:  # a cut body, or a reset connection: what came whole counts
        whole = raw.decode().replace("\r\n", "\n").rsplit("\n\n", 1)[0]
        return parse_all(whole + "\n\n"), True
    return parse_all(raw.decode()), False


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked HTTP/1.1 body as read off a socket: its data, and whether the terminating
    zero-size chunk came (a clean end) rather than the connection being cut."""
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            return bytes(out), True
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out), False
