#!/usr/bin/env python3
"""What a new capture costs the loop when the embedded log is at its byte budget.

    .venv/bin/python bench/budget_begin.py --streams 50000 --begins 200 [--shared]

Fills an LMDB log (``--shared``: as ``--workers N`` opens it; durability none, in a temporary directory) with ``--streams`` finished
streams of one small event each, sets the budget to what they hold, then begins ``--begins``
new streams one after the other, each with one event and finished. Prints, over those begins,
how long ``begin_staged`` held the loop (median, p99, max), and how many old streams were evicted.
Run it on a quiet machine; the figure that matters is the ratio between two builds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gateway import eventlog
from gateway.config import Storage
from gateway.eventlog import LmdbEventLog, StreamMeta
from gateway.sse import event


def _meta(key: str) -> StreamMeta:
    return StreamMeta(key=key, kind="run", upstream="u", path=f"/threads/t/runs/{key}/stream")


async def _finished(log: LmdbEventLog, key: str) -> float:
    assert await log.claim(key)
    started = time.perf_counter()
    _staged, committed = log.begin_staged(_meta(key))
    held = time.perf_counter() - started
    await committed
    await log.append(key, [event(b"event: custom\ndata: x\n", None)])
    await log.finish(key, "done")
    return held


async def _count(log: LmdbEventLog, streams: int) -> int:
    """How many of the old streams are gone."""
    return sum([await log.lookup(f"old{i:07d}") is None for i in range(streams)])


async def main(streams: int, begins: int, shared: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = eventlog.open_log(Storage(path=Path(tmp) / "log", durability="none", max_bytes=1 << 40,
                                         shared=shared))
        assert isinstance(log, LmdbEventLog)
        await log.open()
        try:
            for start in range(0, streams, 500):
                await asyncio.gather(*(_finished(log, f"old{i:07d}") for i in range(start, min(streams, start + 500))))
            log._cfg = replace(log._cfg, max_bytes=log.size)  # at the budget from here on
            held: list[float] = []
            for i in range(begins):
                held.append(await _finished(log, f"new{i:07d}"))
            await asyncio.sleep(2)  # a shared log's eviction for the budget lands after the begin
            evicted = await _count(log, streams)
            held.sort()
            ms = [1000 * h for h in held]
            print(f"{streams} streams held, {begins} begins at the budget: begin_staged held the loop "
                  f"median {statistics.median(ms):.2f} ms, p99 {ms[int(0.99 * (len(ms) - 1))]:.2f} ms, "
                  f"max {ms[-1]:.2f} ms; {evicted} old streams evicted in all")
        finally:
            await log.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=50_000)
    p.add_argument("--begins", type=int, default=200)
    p.add_argument("--shared", action="store_true", help="the log as several workers share it")
    a = p.parse_args()
    asyncio.run(main(a.streams, a.begins, a.shared))
