"""The promise as assertions: what a client got over all its connections is every event exactly
once, or says in-band where events are missing; and a reader that follows a stream to its end
over however many cuts it takes, as an SDK does."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.sse import Ev, read_until_cut


def assert_whole_or_marked(events: list[Ev], n: int) -> list[int]:
    """``events`` are one run of ``n`` custom events (``i`` = 0..n-1): nothing repeated, in order,
    ids strictly increasing, and every stretch of missing events preceded by a gap marker.
    Returns the custom indexes that are missing (each covered by a marker)."""
    names = {e.event for e in events}
    assert names <= {"metadata", "custom", "gap"}, f"unexpected events: {names}"
    ids = [int(e.id or 0) for e in events]
    assert all(e.id is not None for e in events) and ids == sorted(ids) and len(set(ids)) == len(ids), \
        "every event has a gateway id, strictly increasing"
    missing: list[int] = []
    expected, marked = 0, False
    for e in events:
        if e.event == "gap":
            marked = True
        elif e.event == "custom":
            i = e.json["i"]
            assert i >= expected, f"custom {i} repeated (expected {expected} next)"
            if i > expected:
                assert marked, f"customs {expected}..{i - 1} missing without a gap marker"
                missing += range(expected, i)
            expected, marked = i + 1, False
    if expected < n:
        assert marked, f"customs {expected}..{n - 1} missing at the end without a gap marker"
        missing += range(expected, n)
    return missing


def assert_exactly_once(events: list[Ev], n: int) -> None:
    """Every one of the ``n`` custom events exactly once, in order, and no marker: nothing was lost."""
    assert assert_whole_or_marked(events, n) == [] and all(e.event != "gap" for e in events), \
        "nothing lost, nothing marked"


async def follow_to_end(http: aiohttp.ClientSession, url: str, first: aiohttp.ClientResponse | None = None,
                        got: list[Ev] | None = None, timeout: float = 60.0,
                        resumes: list[tuple[str, int]] | None = None) -> list[Ev]:
    """Read a run stream until it ends cleanly, reconnecting with the last id after every cut,
    refusal or connection error, as an SDK does; ``first`` is a response already open. ``resumes``
    gets each reconnect's ``X-Gateway-Resume`` ("hit" when none) and how many events it had then."""
    got = list(got or [])

    async def loop() -> None:
        resp = first
        while True:
            if resp is None:
                try:
                    resp = await http.get(url, headers={"Last-Event-ID": got[-1].id or "" if got else "-1"})
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
                    continue
                if resp.status != 200:
                    resp.release()
                    resp = None
                    await asyncio.sleep(0.1)
                    continue
                if resumes is not None:
                    resumes.append((resp.headers.get("X-Gateway-Resume", "hit"), len(got)))
            try:
                more, cut = await read_until_cut(resp)
            finally:
                resp.close()
            got.extend(more)
            if not cut:
                return
            resp = None
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)
    return got
