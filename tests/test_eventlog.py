"""The event log contract, run against the LMDB backend (a shared-log backend must pass it too)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import Storage
from gateway.eventlog import EventLog, LmdbEventLog, StorageFull, StreamMeta
from gateway.sse import Event, event

Opener = Callable[..., Awaitable[EventLog]]


@pytest.fixture
async def open_log(tmp_path: Path) -> AsyncIterator[Opener]:
    """Open (and reopen) an LMDB log in tmp_path; every log opened is closed at teardown."""
    opened: list[EventLog] = []

    async def opener(**storage: object) -> EventLog:
        for old in opened:
            await old.close()
        opened.clear()
        cfg = replace(Storage(path=tmp_path / "log"), **storage)  # type: ignore[arg-type]
        log = LmdbEventLog(cfg)
        await log.open()
        opened.append(log)
        return log

    yield opener
    for log in opened:
        await log.close()


def meta(key: str, **kw: object) -> StreamMeta:
    return StreamMeta(key=key, kind="run", upstream="u", path=f"/threads/t/runs/{key}/stream", **kw)  # type: ignore[arg-type]


def evs(*bodies: str, uid: str | None = None) -> list[Event]:
    return [event(f"event: custom\ndata: {b}\n".encode(), uid) for b in bodies]


async def test_append_then_read_in_order(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("a"))
    first = await log.append("a", evs("1", "2"))
    second = await log.append("a", evs("3"))
    seqs = [s for s, _ in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    got = await log.read("a", 0, log.get("a").head, 100)
    assert got == first + second
    assert await log.read("a", seqs[0], seqs[-1], 100) == first[1:] + second
    assert await log.read("a", seqs[0], seqs[1], 100) == first[1:]
    assert await log.read("a", 0, seqs[-1], 2) == first


async def test_streams_do_not_mix_and_ids_are_global(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("a"))
    await log.begin(meta("ab"))  # a key that is a prefix of another must not leak into it
    a = await log.append("a", evs("a1"))
    ab = await log.append("ab", evs("ab1"))
    a2 = await log.append("a", evs("a2"))
    assert a[0][0] < ab[0][0] < a2[0][0]
    assert [b for _, b in await log.read("a", 0, 10**18, 100)] == [a[0][1], a2[0][1]]
    assert [b for _, b in await log.read("ab", 0, 10**18, 100)] == [ab[0][1]]


async def test_reopen_keeps_events_metadata_and_never_reuses_ids(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("a"))
    before = await log.append("a", evs("1", "2", uid="99-0"))
    await log.finish("a", "done", evs("last"))
    log = await open_log()
    m = log.get("a")
    assert m is not None and m.end == "done" and not m.open and m.count == 3
    assert m.last_upstream_id == "99-0"
    got = await log.read("a", 0, m.head, 100)
    assert got[:2] == before and len(got) == 3
    await log.begin(meta("b"))
    after = await log.append("b", evs("x"))
    assert after[0][0] > m.head


async def test_ids_not_reused_after_the_newest_stream_is_evicted(open_log: Opener) -> None:
    log = await open_log(retention=1.0)
    await log.begin(meta("a"))
    top = (await log.append("a", evs("1")))[-1][0]
    await log.finish("a", "done")
    assert await log.sweep(now=time.time() + 10) == 1
    log = await open_log()
    assert log.get("a") is None
    await log.begin(meta("a"))
    assert (await log.append("a", evs("again")))[0][0] > top


async def test_open_stream_survives_reopen_as_open(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("live", resumable=True))
    await log.append("live", evs("1", uid="5-0"))
    log = await open_log()
    m = log.get("live")
    assert m is not None and m.open and m.resumable and m.end is None


async def test_tail_returns_upstream_ids_newest_last(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("a"))
    await log.begin(meta("b"))
    await log.append("a", evs("1", uid="1-0") + evs("2", uid="2-0") + evs("3"))
    await log.append("b", evs("other", uid="9-0"))
    tail = await log.tail("a", 2)
    assert [uid for uid, _ in tail] == ["2-0", None]
    assert tail[0][1].endswith(b"data: 2\n")


async def test_retention_ttl_removes_finished_streams_whole_and_keeps_live(open_log: Opener) -> None:
    log = await open_log(retention=60.0)
    for k in ("old", "live"):
        await log.begin(meta(k))
        await log.append(k, evs("1", "2"))
    await log.finish("old", "done")
    assert await log.sweep(now=time.time() + 30) == 0
    assert await log.sweep(now=time.time() + 3600) == 1
    assert log.get("old") is None and log.get("live") is not None
    assert await log.read("old", 0, 10**18, 10) == []
    log = await open_log(retention=60.0)
    assert log.get("old") is None and len(await log.read("live", 0, 10**18, 10)) == 2


async def test_size_budget_evicts_oldest_finished_first_never_live(open_log: Opener) -> None:
    log = await open_log(max_bytes=3000)
    payload = "x" * 400
    for k in ("f1", "f2", "live"):
        await log.begin(meta(k))
        await log.append(k, evs(payload, payload))
        if k != "live":
            await log.finish(k, "done")
        time.sleep(0.01)  # distinct finish times
    assert log.size > 0
    await log.begin(meta("live2"))
    await log.append("live2", evs(payload, payload, payload))
    await log.sweep()
    assert log.get("f1") is None, "oldest finished goes first"
    assert log.get("live") is not None and log.get("live2") is not None


async def test_full_budget_with_only_live_streams_refuses_new_captures(open_log: Opener) -> None:
    log = await open_log(max_bytes=1000)
    await log.begin(meta("live"))
    await log.append("live", evs("y" * 1200))
    assert not log.accepting()
    with pytest.raises(StorageFull):
        await log.begin(meta("new"))
    # Nothing stored is lost, and the live stream can still append.
    more = await log.append("live", evs("z"))
    assert len(await log.read("live", 0, more[-1][0], 10)) == 2


async def test_map_grows_instead_of_failing(open_log: Opener) -> None:
    log = await open_log(map_size=64 * 1024)
    await log.begin(meta("big"))
    total = 0
    for _ in range(40):
        got = await log.append("big", evs(*["p" * 1000] * 10))
        total += len(got)
    assert total == 400
    assert len(await log.read("big", 0, 10**18, 1000)) == 400


async def test_group_commit_many_streams_concurrently(open_log: Opener) -> None:
    import asyncio

    log = await open_log()
    for i in range(50):
        await log.begin(meta(f"s{i}"))
    results = await asyncio.gather(*(log.append(f"s{i}", evs(str(i))) for i in range(50)))
    seqs = [r[0][0] for r in results]
    assert len(set(seqs)) == 50
    for i in range(50):
        assert len(await log.read(f"s{i}", 0, 10**18, 10)) == 1


async def test_reads_from_any_position_across_batches(open_log: Opener) -> None:
    import random

    rng = random.Random(3)
    log = await open_log()
    for k in ("s", "s2", "r"):  # neighbours in key order on both sides
        await log.begin(meta(k))
    everything: list[tuple[int, bytes]] = []
    for i in range(40):
        await log.append("r", evs("noise"))
        batch = await log.append("s", evs(*[f"{i}.{j}" for j in range(rng.randrange(1, 7))]))
        await log.append("s2", evs("noise"))
        everything += batch
    seqs = [s for s, _ in everything]
    for _ in range(300):
        after = rng.choice([0, *seqs, seqs[-1] + 5])
        upto = rng.choice([*seqs, seqs[-1] + 5])
        want = [e for e in everything if after < e[0] <= upto]
        assert await log.read("s", after, upto, 10_000) == want, (after, upto)
    tail = await log.tail("s", 5)
    assert [b for _, b in tail] == [b for _, b in everything[-5:]]


async def test_commit_observer_counts_events_not_records(tmp_path: Path) -> None:
    seen: list[tuple[int, bool]] = []
    log = LmdbEventLog(Storage(path=tmp_path / "obs"), on_commit=lambda n, secs, ok: seen.append((n, ok)))
    await log.open()
    try:
        await log.begin(meta("a"))
        await log.append("a", evs("1", "2", "3"))
        assert sum(n for n, _ in seen) == 3 and all(ok for _, ok in seen)
    finally:
        await log.close()


async def test_open_thread_stream_loses_only_batches_older_than_retention(open_log: Opener) -> None:
    log = await open_log(retention=60.0)
    await log.begin(StreamMeta(key="t", kind="thread", upstream="u", path="/threads/t/stream"))
    await log.begin(meta("run-live"))
    old = await log.append("t", evs("old1", "old2"))
    await log.append("run-live", evs("r"))
    size_before = log.size
    # Pretend an hour passed for what is held now, then append something fresh.
    assert await log.sweep(now=time.time() + 3600 - 1) == 0
    fresh = await log.append("t", evs("fresh"))
    m = log.get("t")
    assert m is not None and m.open and m.first_seq == old[-1][0] + 1
    assert log.size < size_before + 100
    assert await log.read("t", 0, m.head, 100) == fresh
    assert len(await log.read("run-live", 0, 10**18, 10)) == 1, "a live run is never trimmed"
    log = await open_log(retention=60.0)
    m = log.get("t")
    assert m is not None and m.first_seq == old[-1][0] + 1


async def test_read_never_returns_more_than_limit_even_mid_batch(open_log: Opener) -> None:
    log = await open_log()
    await log.begin(meta("a"))
    batch = await log.append("a", evs(*[str(i) for i in range(10)]))
    assert await log.read("a", 0, batch[-1][0], 3) == batch[:3]
    assert await log.read("a", batch[2][0], batch[-1][0], 3) == batch[3:6]
