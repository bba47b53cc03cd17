"""A deliberately naive SSE reader for assertions, independent of the gateway's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson


@dataclass(frozen=True)
class Ev:
    event: str
    data: str
    id: str | None

    @property
    def json(self) -> object:
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


async def read_events(resp: aiohttp.ClientResponse, limit: int | None = None) -> list[Ev]:
    """Read events until the body ends, or until `limit` events arrived (then stop reading)."""
    buf = ""
    got: list[Ev] = []
    async for chunk in resp.content.iter_any():
        buf += chunk.decode()
        *blocks, buf = buf.replace("\r\n", "\n").split("\n\n")
        for block in blocks:
            got.extend(parse_all(block + "\n\n"))
            if limit is not None and len(got) >= limit:
                return got[:limit]
    got.extend(parse_all(buf))
    return got
