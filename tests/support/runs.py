"""Runs through a gateway as a client starts and reads them: threads, streamed runs, joins, and what
their events say (the custom event indexes, the gateway ids)."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from tests.support.sse import Ev, read_events


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


def _url(where: str | HasUrl) -> str:
    return where if isinstance(where, str) else where.url


async def new_thread(http: aiohttp.ClientSession, where: str | HasUrl,
                     headers: dict[str, str] | None = None) -> str:
    async with http.post(f"{_url(where)}/threads", json={}, headers=headers) as r:
        return str((await r.json())["thread_id"])


async def stream_run(http: aiohttp.ClientSession, where: str | HasUrl, tid: str, **inp: Any) -> aiohttp.ClientResponse:
    """A run streamed on thread ``tid``; ``assistant`` (default the real server's ``ticker``) and the
    rest are its input. The response is open."""
    return await http.post(f"{_url(where)}/threads/{tid}/runs/stream",
                           json={"assistant_id": inp.pop("assistant", "ticker"), "input": inp})


async def start_run(http: aiohttp.ClientSession, where: str | HasUrl, n: int, *, delay: float = 0.02,
                    assistant: str = "a", headers: dict[str, str] | None = None, **body: Any) -> aiohttp.ClientResponse:
    """A new thread and a run of ``n`` custom events ``delay`` apart streamed on it (the fake's
    assistant ``a`` by default; ``body`` adds to the request). The response is open, and 200."""
    tid = await new_thread(http, where, headers)
    resp = await http.post(f"{_url(where)}/threads/{tid}/runs/stream", headers=headers,
                           json={"assistant_id": assistant, "input": {"n": n, "delay": delay}, **body})
    assert resp.status == 200, await resp.text()
    return resp


async def join(http: aiohttp.ClientSession, url: str, last: str | None = None, **params: str) -> list[Ev]:
    """Join ``url`` with ``last`` as Last-Event-ID (None: no header) and read to the end."""
    headers = {"Last-Event-ID": last} if last is not None else {}
    async with http.get(url, headers=headers, params=params) as r:
        assert r.status == 200, await r.text()
        return await read_events(r)


def customs(events: list[Ev]) -> list[int]:
    return [e.json["i"] for e in events if e.event == "custom"]


def assert_ids_increase(events: list[Ev]) -> None:
    ids = [int(e.id) for e in events if e.id is not None]
    assert len(ids) == len(events), "every event carries a gateway id"
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
