"""The event log contract, run against every backend: LMDB (embedded) and Redis (shared, a real
redis-server). Then the live-feed contract (what followers rely on) and the ownership contract
(what several gateway processes on one log rely on)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import lmdb
import pytest

from gateway.config import Storage
from gateway import eventlog
from gateway.eventlog import EventLog, LmdbEventLog, StorageError, StorageFull, StreamMeta
from gateway.eventlog.base import EVICT_DOWN_TO, Batch, ClaimLost, Feed, stop_tasks
from gateway.eventlog.redis import RedisEventLog
from gateway.eventlog.lmdb_shared import SharedLmdbEventLog
from gateway.eventlog.siblings import Siblings
from gateway.sse import Event, event
from tests.support.disk import fill
from tests.support.procs import tree_env
from tests.support.tcp_relay import TcpRelay

Opener = Callable[..., Awaitable[EventLog]]
# "redis-chaos": the same Redis behind a relay that resets the connection of one script call in
# ten after the script ran and before its reply (an append, a claim, a drop: the commit path), so
# each contract holds when the gateway cannot know whether its write happened.
# "lmdb-shared": one LMDB directory as several processes of a host share it (``workers: N``): the
# leases, the size and the id counter in the file, the followers of other processes told by message.
BACKENDS = ["lmdb", "lmdb-shared", "redis", "redis-chaos"]


def _storage(backend: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str,
             relay: TcpRelay | None = None, **kw: Any) -> Storage:
    if backend.startswith("redis"):
        server = request.getfixturevalue("redis_server")
        url = server.url if relay is None else f"redis://127.0.0.1:{relay.port}/0"
        base = Storage(backend="redis", redis_url=url, redis_prefix=prefix, lease_ttl=1.5)
    else:
        base = Storage(path=tmp_path / "log", shared=backend == "lmdb-shared", lease_ttl=1.5)
    return replace(base, **kw)


@pytest.fixture(params=BACKENDS)
async def open_log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Open (and reopen) a log of each backend; every log opened is closed at teardown."""
    opened: list[EventLog] = []
    prefix = f"c{uuid.uuid4().hex[:10]}"
    relay: TcpRelay | None = None
    if request.param == "redis-chaos":
        relay = await TcpRelay("127.0.0.1", request.getfixturevalue("redis_server").port, rng=random.Random(11),
                               lose_replies_to=b"EVALSHA", lose_share=0.1).start()

    async def opener(**storage: Any) -> EventLog:
        for old in opened:
            await old.close()
        opened.clear()
        log = eventlog.open_log(_storage(request.param, tmp_path, request, prefix, relay, **storage))
        await log.open()
        opened.append(log)
        return log

    yield opener
    for log in opened:
        await log.close()
    if relay is not None:
        await relay.stop()


@pytest.fixture
async def two_processes(redis_server: Any) -> AsyncIterator[tuple[EventLog, EventLog]]:
    """Two gateway processes' logs on one Redis (the same prefix)."""
    cfg = Storage(backend="redis", redis_url=redis_server.url, redis_prefix=f"p{uuid.uuid4().hex[:10]}",
                  lease_ttl=1.0)
    a, b = RedisEventLog(cfg, replica="a"), RedisEventLog(cfg, replica="b")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


def meta(key: str, **kw: Any) -> StreamMeta:
    return StreamMeta(key=key, kind="run", upstream="u", path=f"/threads/t/runs/{key}/stream", **kw)


async def begun(log: EventLog, m: StreamMeta) -> StreamMeta:
    assert await log.claim(m.key)
    return await log.begin(m)


def evs(*bodies: str, uid: str | None = None) -> list[Event]:
    return [event(f"event: custom\ndata: {b}\n".encode(), uid) for b in bodies]


async def head(log: EventLog, key: str) -> int:
    m = await log.lookup(key)
    assert m is not None
    return m.head


# --- storage -----------------------------------------------------------------------------------------

async def test_append_then_read_in_order(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    first = await log.append("a", evs("1", "2"))
    second = await log.append("a", evs("3"))
    seqs = [s for s, _ in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert await log.read("a", 0, await head(log, "a"), 100) == first + second
    assert await log.read("a", seqs[0], seqs[-1], 100) == first[1:] + second
    assert await log.read("a", seqs[0], seqs[1], 100) == first[1:]
    assert await log.read("a", 0, seqs[-1], 2) == first


async def test_a_write_that_comes_while_the_log_closes_is_refused_not_left_waiting(open_log: Opener) -> None:
    """A write that comes once close() has begun is committed or refused (StorageError); it never
    waits for a commit that will not come."""
    log = await open_log()
    await begun(log, meta("a"))
    closing = asyncio.ensure_future(log.close())
    await asyncio.sleep(0)  # close() has begun
    try:
        entries = await asyncio.wait_for(log.submit("a", evs("late")), 5)
    except StorageError:
        pass
    else:
        assert len(entries) == 1
    await closing


async def test_submitted_batches_are_told_in_order_and_a_stream_not_held_is_refused(open_log: Opener) -> None:
    """``submit_then`` (what a capture uses, once per chunk): each batch is told its entries in
    submission order, as ``submit``'s futures are, whatever the backend does underneath."""
    log = await open_log()
    await begun(log, meta("a"))
    told: list[list[tuple[int, bytes]] | BaseException] = []
    for i in range(20):
        log.submit_then("a", evs(str(i)), told.append)
    await log.append("a", evs("last"))  # settles after every batch before it
    assert all(isinstance(t, list) for t in told) and len(told) == 20
    seqs = [seq for t in told if isinstance(t, list) for seq, _ in t]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert [body for _, body in await log.read("a", 0, 10**18, 100)][:20] == [
        body for t in told if isinstance(t, list) for _, body in t]
    refused: list[list[tuple[int, bytes]] | BaseException] = []
    try:  # refused at once (LMDB), or told so (Redis)
        log.submit_then("never begun", evs("x"), refused.append)
        await log.append("a", evs("after"))
    except (StorageError, ClaimLost) as exc:
        refused.append(exc)
    assert len(refused) == 1 and isinstance(refused[0], (StorageError, ClaimLost))


async def test_streams_do_not_mix_and_ids_are_global(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    await begun(log, meta("ab"))  # a key that is a prefix of another must not leak into it
    a = await log.append("a", evs("a1"))
    ab = await log.append("ab", evs("ab1"))
    a2 = await log.append("a", evs("a2"))
    assert a[0][0] < ab[0][0] < a2[0][0]
    assert [b for _, b in await log.read("a", 0, 10**18, 100)] == [a[0][1], a2[0][1]]
    assert [b for _, b in await log.read("ab", 0, 10**18, 100)] == [ab[0][1]]


async def test_reopen_keeps_events_metadata_and_never_reuses_ids(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    before = await log.append("a", evs("1", "2", uid="99-0"))
    await log.finish("a", "done", evs("last"))
    log = await open_log()
    m = await log.lookup("a")
    assert m is not None and m.end == "done" and not m.open and m.count == 3
    assert m.last_upstream_id == "99-0" and m.last_event == "custom"
    got = await log.read("a", 0, m.head, 100)
    assert got[:2] == before and len(got) == 3
    await begun(log, meta("b"))
    after = await log.append("b", evs("x"))
    assert after[0][0] > m.head


async def test_an_open_streams_metadata_is_what_its_records_say_after_a_stop(open_log: Opener, tmp_path: Path) -> None:
    """The embedded log writes an open stream's counters every thousand events, not every commit:
    whatever lags in the file when the process stops is rebuilt from the records when the log is
    opened again (and by the operator commands' view meanwhile), on every backend the same."""
    log = await open_log()
    await begun(log, meta("a"))
    await begun(log, meta("ab"))
    await log.append("a", evs("1", uid="7-0"))
    await log.append("ab", evs("other"))
    await log.append("a", evs("2", "3"))
    await log.append("a", [event(b"event: values\ndata: {}\n", None)])
    live = await log.lookup("a")
    assert live is not None and live.count == 4 and live.last_event == "values" and live.last_upstream_id == "7-0"
    if isinstance(log, LmdbEventLog) and not log._cfg.shared:  # the file lags: the lever is on
        cfg = log._cfg
        await log.close()
        env = lmdb.open(str(cfg.path), max_dbs=4, readonly=True, lock=False)
        with env.begin(db=env.open_db(b"streams", create=False)) as txn:
            raw = txn.get(b"a")
        env.close()
        assert raw is not None and StreamMeta.from_bytes(raw).head < live.head
        view = eventlog.open_view(cfg)
        try:
            seen = view.meta("a")
        finally:
            view.close()
        assert seen is not None and abs(seen.updated_at - live.updated_at) < 1  # the record's time, in ms
        assert replace(seen, updated_at=live.updated_at) == live
    log = await open_log()
    again = await log.lookup("a")
    assert again is not None and again.open
    for name in ("head", "count", "size", "last_upstream_id", "last_event"):
        assert getattr(again, name) == getattr(live, name), name
    assert abs(again.updated_at - live.updated_at) < 1
    assert (await log.lookup("ab")) is not None


async def test_a_new_log_starts_its_ids_above_every_old_one(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    assert (await log.append("a", evs("1")))[0][0] > (time.time() - 3600) * 1_000_000


async def test_ids_not_reused_after_the_newest_stream_is_evicted(open_log: Opener) -> None:
    log = await open_log(retention=1.0)
    await begun(log, meta("a"))
    top = (await log.append("a", evs("1")))[-1][0]
    await log.finish("a", "done")
    await log.release("a")
    assert await log.sweep(now=time.time() + 10) == 1
    log = await open_log()
    assert await log.lookup("a") is None
    again = await begun(log, meta("a"))
    assert again.base >= top, "ids of the earlier capture are at or below the new one's base"
    assert (await log.append("a", evs("again")))[0][0] > top


async def test_open_stream_survives_reopen_as_open(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("live", resumable=True))
    await log.append("live", evs("1", uid="5-0"))
    log = await open_log()
    m = await log.lookup("live")
    assert m is not None and m.open and m.resumable and m.end is None


async def test_tail_returns_upstream_ids_newest_last(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    await begun(log, meta("b"))
    await log.append("a", evs("1", uid="1-0") + evs("2", uid="2-0") + evs("3"))
    await log.append("b", evs("other", uid="9-0"))
    tail = await log.tail("a", 2)
    assert [uid for uid, _ in tail] == ["2-0", None]
    assert tail[0][1].endswith(b"data: 2\n")


async def test_retention_ttl_removes_finished_streams_whole_and_keeps_live(open_log: Opener) -> None:
    log = await open_log(retention=60.0)
    for k in ("old", "live"):
        await begun(log, meta(k))
        await log.append(k, evs("1", "2"))
    await log.finish("old", "done")
    assert await log.sweep(now=time.time() + 30) == 0
    assert await log.sweep(now=time.time() + 3600) == 1
    assert await log.lookup("old") is None and await log.lookup("live") is not None
    assert await log.read("old", 0, 10**18, 10) == []
    log = await open_log(retention=60.0)
    assert await log.lookup("old") is None and len(await log.read("live", 0, 10**18, 10)) == 2


async def test_size_budget_evicts_oldest_finished_first_never_live(open_log: Opener) -> None:
    log = await open_log(max_bytes=3000)
    payload = "x" * 400
    for k in ("f1", "f2", "live"):
        await begun(log, meta(k))
        await log.append(k, evs(payload, payload))
        if k != "live":
            await log.finish(k, "done")
        await asyncio.sleep(0.01)  # distinct finish times
    await begun(log, meta("live2"))
    await log.append("live2", evs(payload, payload, payload))
    await log.sweep()
    assert await log.lookup("f1") is None, "oldest finished goes first"
    assert await log.lookup("live") is not None and await log.lookup("live2") is not None


async def test_a_log_at_its_budget_evicts_down_to_a_margin_below_it_not_one_stream_at_a_time(
        open_log: Opener) -> None:
    """At the budget, evicting only to just under it left the log at its budget: every new capture
    evicted one more stream, each time sorting every stream held, on the loop."""
    budget = 20_000
    log = await open_log(max_bytes=budget)
    keys: list[str] = []

    async def finished(body: str) -> None:
        keys.append(f"f{len(keys):02d}")
        await begun(log, meta(keys[-1]))
        await log.append(keys[-1], evs(body))
        await log.finish(keys[-1], "done")
        await asyncio.sleep(0.002)  # distinct finish times

    while log.size < budget * 0.9:  # ~350 B each: steps much finer than the margin
        await finished("z" * 250)
    await finished("z" * 3000)  # past the budget
    await log.sweep()  # a shared log learns what everyone holds when it sweeps
    assert log.size >= budget or await log.lookup("f00") is None, "at the budget (evicted at the sweep)"
    await begun(log, meta("new"))  # at the budget: the embedded log evicts here, Redis at its sweep
    await log.sweep()
    assert 0 < log.size <= budget * EVICT_DOWN_TO, log.size
    assert await log.lookup("f00") is None and await log.lookup(keys[-1]) is not None, "oldest first"


async def test_full_budget_with_only_live_streams_refuses_new_captures(open_log: Opener) -> None:
    log = await open_log(max_bytes=1000)
    await begun(log, meta("live"))
    await log.append("live", evs("y" * 1200))
    await log.sweep()  # a shared log learns what everyone holds when it sweeps
    assert not log.accepting()
    with pytest.raises(StorageFull):
        await begun(log, meta("new"))
    # Nothing stored is lost, and the live stream can still append.
    more = await log.append("live", evs("z"))
    assert len(await log.read("live", 0, more[-1][0], 10)) == 2


async def test_over_budget_a_capture_begins_when_something_finished_can_make_room(open_log: Opener) -> None:
    log = await open_log(max_bytes=1000)
    await begun(log, meta("done"))
    await log.append("done", evs("y" * 1200))
    await log.finish("done", "done")
    await log.release("done")
    log = await open_log(max_bytes=1000)  # as a gateway starting on it: over budget, one stream finished
    assert log.accepting(), "a finished stream can go to make room"
    await begun(log, meta("new"))
    for _ in range(100):  # a shared log evicts for the budget off the loop, after the begin
        if await log.lookup("done") is None:
            break
        await asyncio.sleep(0.05)
    assert await log.lookup("done") is None, "the oldest finished stream made room"
    await log.append("new", evs("z" * 1200))
    await log.sweep()  # a shared log learns what everyone holds when it sweeps
    assert not log.accepting(), "over budget again, and nothing finished is left to evict"


async def test_group_commit_many_streams_concurrently(open_log: Opener) -> None:
    log = await open_log()
    for i in range(50):
        await begun(log, meta(f"s{i}"))
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
        await begun(log, meta(k))
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


async def test_commit_observer_counts_events_not_records(open_log: Opener, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    seen: list[tuple[int, bool]] = []
    probe = await open_log()
    cfg = _storage("redis" if isinstance(probe, RedisEventLog) else "lmdb", tmp_path / "obs", request,
                   f"o{uuid.uuid4().hex[:8]}")
    log = eventlog.open_log(cfg, on_commit=lambda n, secs, ok: seen.append((n, ok)))
    await probe.close()
    await log.open()
    try:
        await begun(log, meta("a"))
        await log.append("a", evs("1", "2", "3"))
        assert sum(n for n, _ in seen) == 3 and all(ok for _, ok in seen)
    finally:
        await log.close()


async def test_a_trimmed_session_stream_keeps_the_ids_of_the_upstream_events_it_trimmed(open_log: Opener) -> None:
    """The upstream replays a session's whole thread on every connection, the part retention
    trimmed too: the log keeps the first and last upstream id of the trimmed upstream events (one
    of the gateway's own begins them anew), durably, so that a re-join knows that replay."""
    log = await open_log(retention=60.0)
    await begun(log, StreamMeta(key="s", kind="session", upstream="u", path="/threads/t/stream/events"))

    async def trimmed(*batch: Event) -> tuple[str | None, str | None]:
        await log.append("s", list(batch))
        await log.sweep(now=time.time() + 3600)  # everything held is past retention
        m = await log.lookup("s")
        assert m is not None and m.open
        return m.trimmed_from, m.trimmed_to

    assert await trimmed(*evs("1", uid="a1"), *evs("2", uid="a2")) == ("a1", "a2")
    assert await trimmed(*evs("3", uid="a3")) == ("a1", "a3"), "a later trim goes on from the earlier"
    assert await trimmed(*evs("gap"), *evs("4", uid="b1"), *evs("5", uid="b2")) == ("b1", "b2")
    assert await trimmed(*evs("gap")) == (None, None), "the gateway's own event trimmed last: no replay to know"
    assert await trimmed(*evs("6", uid="c1")) == ("c1", "c1")
    log = await open_log(retention=60.0)
    m = await log.lookup("s")
    assert m is not None and (m.trimmed_from, m.trimmed_to) == ("c1", "c1")


async def test_open_thread_stream_loses_only_batches_older_than_retention(open_log: Opener) -> None:
    log = await open_log(retention=60.0)
    await begun(log, StreamMeta(key="t", kind="thread", upstream="u", path="/threads/t/stream"))
    await begun(log, meta("run-live"))
    old = await log.append("t", evs("old1", "old2"))
    await log.append("run-live", evs("r"))
    # Pretend an hour passed for what is held now, then append something fresh.
    assert await log.sweep(now=time.time() + 3600 - 1) == 0
    fresh = await log.append("t", evs("fresh"))
    m = await log.lookup("t")
    assert m is not None and m.open and m.first_seq == old[-1][0] + 1
    assert await log.read("t", 0, m.head, 100) == fresh
    assert len(await log.read("run-live", 0, 10**18, 10)) == 1, "a live run is never trimmed"
    log = await open_log(retention=60.0)
    m = await log.lookup("t")
    assert m is not None and m.first_seq == old[-1][0] + 1


async def test_read_never_returns_more_than_limit_even_mid_batch(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    batch = await log.append("a", evs(*[str(i) for i in range(10)]))
    assert await log.read("a", 0, batch[-1][0], 3) == batch[:3]
    assert await log.read("a", batch[2][0], batch[-1][0], 3) == batch[3:6]


async def test_a_view_reads_a_stream_from_the_record_holding_a_position(open_log: Opener) -> None:
    """What ``streams tail -f`` reads on each poll: only the records from the one holding the
    next seq, whatever record boundary the position falls on, never the stream from its start."""
    log = await open_log()
    await begun(log, meta("a"))
    await begun(log, meta("ab"))  # a stream whose key extends this one's: never read as its records
    batches = [await log.append("a", evs(*[f"{i}.{j}" for j in range(3)])) for i in range(4)]
    await log.append("ab", evs("other"))
    cfg = log._cfg  # type: ignore[attr-defined]
    await log.close()  # LMDB: one environment per file in a process; the tools read from another
    seqs = [seq for b in batches for seq, _ in b]

    def firsts(upto: int | None, after: int) -> list[int]:
        view = eventlog.open_view(cfg)
        try:
            return [r.first for r in view.records("a", upto=upto, after=after)]
        finally:
            view.close()

    for after in [0, *seqs]:  # in a thread: the view is synchronous, and the chaos relay runs on this loop
        assert await asyncio.to_thread(firsts, None, after) == [b[0][0] for b in batches if b[-1][0] > after], after
    assert await asyncio.to_thread(firsts, batches[1][0][0], seqs[1]) == [batches[0][0][0], batches[1][0][0]]


@pytest.mark.parametrize("backend", ["lmdb"])
async def test_map_grows_instead_of_failing(tmp_path: Path, backend: str) -> None:
    log = LmdbEventLog(Storage(path=tmp_path / "log", map_size=64 * 1024))
    await log.open()
    try:
        await begun(log, meta("big"))
        total = 0
        for _ in range(40):
            total += len(await log.append("big", evs(*["p" * 1000] * 10)))
        assert total == 400
        assert len(await log.read("big", 0, 10**18, 1000)) == 400
    finally:
        await log.close()


async def test_the_writer_commits_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    """The LMDB writer holds the loop still while it puts a group (for speed), but never needs it:
    with the loop stuck in a long callback once the group is handed over, the commit still
    reaches the disk."""
    log = LmdbEventLog(Storage(path=tmp_path / "log"))
    await log.open()
    try:
        await begun(log, meta("k"))
        pending = log.submit("k", evs("during the block"))
        await asyncio.sleep(0)  # the turn of the loop in which the group goes to the writer
        # Block the loop right here (no await) and look at the disk from this thread meanwhile.
        deadline = time.monotonic() + 10
        stored: list[tuple[int, bytes]] = []
        while not stored and time.monotonic() < deadline:
            time.sleep(0.01)
            stored = log._read_sync("k", 0, 2**62, 10)
        assert [body for _, body in stored] == [b"event: custom\ndata: during the block\n"], (
            "the writer waited for the blocked loop")
        assert len(await pending) == 1
    finally:
        await log.close()


def _served_at_once(read: Any) -> bool:
    """Whether a read (a coroutine) is served without waiting a loop turn: done at its first step."""
    try:
        read.send(None)
    except StopIteration:
        return True
    read.close()
    return False


async def test_a_follower_catching_up_with_a_live_stream_reads_its_pages_without_the_executor(tmp_path: Path) -> None:
    """A client behind a fast live stream (its queue overflowed) reads it back page after page; what
    was written seconds ago is in the page cache, and each page's trip through the executor cost two
    loop turns (scenario a of the benchmark: a quarter of its events/s). Pages of a stream no longer
    live, or reads of more than a page, still go to the executor."""
    log = LmdbEventLog(Storage(path=tmp_path / "log"))
    await log.open()
    try:
        await begun(log, meta("fast"))
        for _ in range(30):
            await log.append("fast", evs(*["x" * 200] * 100))
        top = await head(log, "fast")
        assert top - 3000 > 32  # far more than the few last events read on the loop before
        assert _served_at_once(log.read("fast", top - 3000, top, 10_000, 64 << 10))
        assert not _served_at_once(log.read("fast", top - 3000, top, 10_000, 4 << 20))
        await log.finish("fast", "done")
        assert not _served_at_once(log.read("fast", top - 3000, top, 10_000, 64 << 10))
        page = await log.read("fast", top - 3000, top, 10_000, 64 << 10)
        assert 0 < len(page) < 3000 and page[0][0] == top - 2999
    finally:
        await log.close()


# --- the live feed --------------------------------------------------------------------------------------

async def test_feed_carries_commits_in_order_with_the_head_before_each(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    feed = log.subscribe("a", 100, 1 << 20)
    await log.ready(feed)
    one = await log.append("a", evs("1", "2"))
    two = await log.append("a", evs("3"))
    await log.finish("a", "done")
    got: list[Batch] = []
    while len(got) < 3:
        assert await feed.wait(5)
        b = feed.take()
        if b is not None:
            got.append(b)
    assert [b.kind for b in got] == ["events", "events", "end"]
    assert got[0].entries == one and got[1].entries == two
    assert got[1].prev == one[-1][0] and got[2].prev == two[-1][0]
    feed.close()


async def test_a_follower_past_its_bounds_overflows_instead_of_blocking(open_log: Opener) -> None:
    log = await open_log()
    await begun(log, meta("a"))
    feed = log.subscribe("a", 3, 1 << 20)
    await log.ready(feed)
    await log.append("a", evs("1", "2"))
    await log.append("a", evs("3", "4"))
    assert await feed.wait(5) and feed.overflowed
    feed.close()


async def test_feeds_of_one_process_see_another_processes_commits(two_processes: tuple[EventLog, EventLog]) -> None:
    a, b = two_processes
    await begun(a, meta("s"))
    feed = b.subscribe("s", 100, 1 << 20)
    await b.ready(feed)
    sent = await a.append("s", evs("x", "y"))
    assert await feed.wait(5)
    got = feed.take()
    assert got is not None and got.kind == "events" and got.entries == sent
    await a.finish("s", "done")
    assert await feed.wait(5)
    end = feed.take()
    assert end is not None and end.kind == "end" and end.prev == sent[-1][0]
    feed.close()


def _before_first_call(monkeypatch: pytest.MonkeyPatch, method: str, first: Callable[[], Awaitable[None]]) -> list[bool]:
    """Patch redis-py's ``PubSub.<method>`` so that its first call, and only that one, runs ``first``
    before the real method: an interleaving made certain. The list returned holds True once it has."""
    import redis.asyncio.client

    real = getattr(redis.asyncio.client.PubSub, method)
    happened: list[bool] = []

    async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not happened:
            happened.append(True)
            await first()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.PubSub, method, patched)
    return happened


async def _until(done: list[bool]) -> None:
    async with asyncio.timeout(5):
        while not done:
            await asyncio.sleep(0.01)


async def test_a_follower_arriving_while_its_channel_is_dropped_still_gets_it_subscribed(
        two_processes: tuple[EventLog, EventLog], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The last follower of a stream leaves; the feed connection unsubscribes its channel; a new
    follower of the same stream arrives during that round trip. Its wake-up must not be lost: a lost
    one left the channel unsubscribed for good, so every later follower of the stream waited 2 s
    for a subscription that never came and saw other replicas' events only at heartbeat catch-up.
    Nor may the subscription being dropped count as live for it meanwhile."""
    a, b = two_processes
    assert isinstance(b, RedisEventLog)
    await begun(a, meta("s"))
    first = b.subscribe("s", 100, 1 << 20)
    await b.ready(first)
    arrived: list[Feed] = []
    live_meanwhile: list[bool] = []

    async def a_follower_arrives() -> None:
        arrived.append(b.subscribe("s", 100, 1 << 20))
        live_meanwhile.append(b._k("c", "s").encode() in b._live_channels)  # what its ready() would find

    unsubscribing = _before_first_call(monkeypatch, "unsubscribe", a_follower_arrives)
    first.close()
    await _until(unsubscribing)
    second = arrived[0]
    assert live_meanwhile == [False], "a follower arriving then would have read the head unsubscribed"
    caplog.set_level("WARNING", logger="gateway")
    await b.ready(second)
    assert "not confirmed" not in caplog.text, "the new follower's channel was never subscribed"
    sent = await a.append("s", evs("x"))
    assert await second.wait(1)
    got = second.take()
    assert got is not None and got.entries == sent
    second.close()


@pytest.mark.parametrize("break_seen_by", ["redis-py", "the loop"])
async def test_a_commit_published_while_the_feed_connection_resubscribes_is_not_lost(
        two_processes: tuple[EventLog, EventLog], monkeypatch: pytest.MonkeyPatch, break_seen_by: str) -> None:
    """The feed connection breaks; its followers catch up from the log at once; the stream ends
    before the new connection's subscription is in place, so Redis drops that message. The end
    must still reach the follower (a catch-up once the channel is live again), not wait for the
    follower's idle heartbeat, seconds later, to look at the log (what a random-drops test showed:
    followers on the other replica finished 13 s after their runs)."""
    import redis.exceptions

    a, b = two_processes
    assert isinstance(a, RedisEventLog)
    await begun(a, meta("s"))
    feed = b.subscribe("s", 100, 1 << 20)
    await b.ready(feed)

    async def the_stream_ends() -> None:
        if feed.overflowed:
            feed.restart()  # told of the break already: the follower caught up, found nothing new
        await a.finish("s", "done")

    # Re-subscribing is redis-py's own when it reconnects under a read, or this log's after a break it
    # saw: both go through PubSub.subscribe, and the stream ends just before it.
    ended = _before_first_call(monkeypatch, "subscribe", the_stream_ends)
    if break_seen_by == "redis-py":  # it reconnects under the loop's read and re-subscribes, silently
        assert await a._r.client_kill_filter(_type="pubsub") == 1, "b's feed connection, the only one subscribed"
    else:  # the read fails: the loop opens a new connection and subscribes again itself
        async def the_read_fails() -> None:
            raise redis.exceptions.ConnectionError("the feed connection broke")

        _before_first_call(monkeypatch, "get_message", the_read_fails)
    await _until(ended)
    assert await feed.wait(2.0), "the end committed while the feed reconnected was never told"
    end = feed.take()
    assert feed.overflowed or (end is not None and end.kind == "end")
    feed.close()


# --- ownership ----------------------------------------------------------------------------------------

async def test_one_claim_per_stream_and_a_stale_owner_is_fenced(two_processes: tuple[EventLog, EventLog]) -> None:
    a, b = two_processes
    lost: list[tuple[str, str]] = []
    a.on_lost(lambda key, how: lost.append((key, how)))
    assert await a.claim("s")
    assert not await b.claim("s"), "held: the other process must follow instead"
    await a.begin(meta("s"))
    await a.append("s", evs("1"))
    # a stalls past its lease (no renewal reaches Redis): b takes over and begins again.
    assert isinstance(a, RedisEventLog) and isinstance(b, RedisEventLog)
    await a._r.delete(a._k("l", "s"))  # the lease ran out
    assert await b.claim("s")
    await b.begin(meta("s"))
    with pytest.raises(ClaimLost):
        await a.append("s", evs("stale"))
    assert lost == [("s", "fenced")], "the refused append tells, once, how the claim was lost"
    await b.append("s", evs("2"))
    assert [body for _, body in await b.read("s", 0, 10**18, 10)] == [e[0] for e in evs("1", "2")]


async def test_two_replicas_trimming_a_session_at_once_keep_its_trim_marks(
        own_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis at maxmemory refuses the sweeper lease, so every replica sweeps at once (retention is
    what frees it). ``b`` trims a session's older batch between ``a`` reading the streams and ``a``
    trimming the newer one: the marks must still span every upstream event trimmed (``a1`` to
    ``a3``), or a re-join takes the upstream's replay of ``a1``, ``a2`` for new events."""
    cfg = Storage(backend="redis", redis_url=own_redis.url, redis_prefix="trims", lease_ttl=1.0, retention=60.0)
    a, b = RedisEventLog(cfg, replica="a"), RedisEventLog(cfg, replica="b")
    await a.open()
    await b.open()
    try:
        await begun(a, StreamMeta(key="s", kind="session", upstream="u", path="/threads/t/stream/events"))
        await a.append("s", evs("1", uid="a1") + evs("2", uid="a2"))
        await asyncio.sleep(0.05)
        between = time.time()
        await asyncio.sleep(0.05)
        await a.append("s", evs("3", uid="a3"))
        read_streams = a.streams

        async def b_sweeps_meanwhile() -> list[StreamMeta]:
            metas = await read_streams()
            await b.sweep(now=between + 60.0)  # b's cutoff falls between the two batches
            return metas

        monkeypatch.setattr(a, "streams", b_sweeps_meanwhile)
        own_redis.command("CONFIG", "SET", "maxmemory", "1000")  # far below what it holds: writes refused
        try:
            await a.sweep(now=time.time() + 3600)
        finally:
            own_redis.command("CONFIG", "SET", "maxmemory", "0")
        m = await a.lookup("s")
        assert m is not None and m.open and m.count == 3
        assert await a.read("s", 0, m.head, 10) == [], "every batch was past a's retention"
        assert (m.trimmed_from, m.trimmed_to) == ("a1", "a3")
        assert m.size == 0, "the bytes trimmed are uncounted once"
    finally:
        await a.close()
        await b.close()


async def test_unowned_open_streams_are_offered_for_takeover(two_processes: tuple[EventLog, EventLog]) -> None:
    a, b = two_processes
    await begun(a, meta("s"))
    assert [m.key for m in await b.unowned()] == []
    await a.release("s")
    assert [m.key for m in await b.unowned()] == ["s"]
    assert await b.claim("s") and not await a.claim("s")


async def test_a_claim_made_while_this_process_releases_the_same_stream_is_granted(
        two_processes: tuple[EventLog, EventLog]) -> None:
    """A capture ends (its claim released) as a client here asks for the stream again (a thread
    stream's next client): the new claim must not meet this process's own lease on its way out and be
    refused, or the stream would be followed with nobody capturing it."""
    a, b = two_processes
    assert isinstance(a, RedisEventLog)
    script = a._release_script

    async def slow_release(**kw: Any) -> Any:  # the release waits for a connection, say
        await asyncio.sleep(0.05)
        return await script(**kw)

    a._release_script = slow_release
    for i in range(5):
        key = f"s{i}"
        await begun(a, meta(key))
        released, claimed = await asyncio.gather(a.release(key), a.claim(key))
        assert claimed, f"try {i}: refused its own stream"
        assert not await b.claim(key), "and it holds the lease again"
        await a.release(key)


async def test_followers_are_counted_in_every_process(two_processes: tuple[EventLog, EventLog]) -> None:
    a, b = two_processes
    b.set_followers("s", 1)
    for _ in range(50):
        if await a.followers("s", 0) == 1:
            break
        await asyncio.sleep(0.02)
    assert await a.followers("s", 0) == 1
    b.set_followers("s", 0)
    for _ in range(50):
        if await a.followers("s", 0) == 0:
            break
        await asyncio.sleep(0.02)
    assert await a.followers("s", 0) == 0


async def test_a_log_from_before_with_an_unsorted_index_is_listed_in_key_order(redis_server: Any) -> None:
    cfg = Storage(backend="redis", redis_url=redis_server.url, redis_prefix=f"v{uuid.uuid4().hex[:10]}")
    log = RedisEventLog(cfg)
    await log.open()
    for k in ("c", "a", "b"):
        await begun(log, meta(k))
    await log.close()
    index = "{" + cfg.redis_prefix + "}:all"  # as a gateway before the sorted index left it: a plain set
    redis_server.command("DEL", index)
    redis_server.command("SADD", index, "c", "a", "b")
    log = RedisEventLog(cfg)
    await log.open()
    try:
        page, after = await log.list_streams("", 2, lambda m: True)
        assert [m.key for m in page] == ["a", "b"] and after == "b"
        assert [m.key for m in (await log.list_streams("b", 2, lambda m: True))[0]] == ["c"]
    finally:
        await log.close()


async def test_a_background_task_that_swallows_its_cancellation_is_still_stopped() -> None:
    """As redis-py does in some clean-up paths: the loop around it goes round and waits again."""
    wake = asyncio.Event()

    async def loop_swallowing_once() -> None:
        swallowed = False
        while True:
            try:
                await wake.wait()
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # a library caught it: the loop goes on

    task = asyncio.create_task(loop_swallowing_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks([task], "test"), 10)
    assert task.cancelled()


async def test_a_shared_lmdb_sweep_does_not_write_a_stream_another_process_took_over(tmp_path: Path) -> None:
    """One LMDB directory shared by processes (``workers: N``): retention trims the old part of the
    thread streams a process captures, in a write of its own. That write was not fenced as appends
    are: a process that had lost a stream (it stalled, another took it over and wrote on) put back
    its own stale metadata of it, the head it had, over the new captor's."""
    cfg = Storage(path=tmp_path / "log", shared=True, lease_ttl=5.0, retention=60.0)
    log = eventlog.open_log(cfg)
    await log.open()
    other = Siblings(cfg.path, cfg.lease_ttl, lambda who, m: None, lambda who: None)  # another live process
    other.start(asyncio.get_running_loop())
    try:
        assert isinstance(log, LmdbEventLog)
        thread = StreamMeta(key="t", kind="thread", upstream="u", path="/threads/t/stream")
        await begun(log, thread)
        await log.append("t", evs("old", "older"))
        # The other process takes the stream over and writes on (as its commit would leave the file).
        taken = replace(await log.lookup("t") or thread, head=10**18, count=99)
        assert isinstance(log, SharedLmdbEventLog) and log._env is not None
        with log._env.begin(write=True) as txn:
            txn.put(b"t", other.me.encode(), db=log._leases_db)
            txn.put(b"t", taken.to_bytes(), db=log._streams_db)
        await log.sweep(now=time.time() + 3600)  # the records are past retention: trimmed, by the old captor
        held = log._read_meta("t")  # as the file says: what every other process reads
        assert held is not None and held.head == 10**18, "the new captor's head stands"
    finally:
        other.stop()
        await log.close()


@pytest.mark.parametrize("shared", [False, True], ids=["lmdb", "lmdb-shared"])
async def test_a_retention_trim_that_fails_to_commit_stops_nothing_and_counts_nothing_twice(
        small_fs: Path, shared: bool) -> None:
    """Retention trims the old part of an open thread stream in a write of its own. On a full disk
    that write fails. It lost nothing of the stream, yet on a shared log it stopped the stream (its
    next append refused, its clients cut), and on an embedded one the trim stayed in the stream's
    metadata though not on disk: the next append stored a size without the records still there,
    and the next sweep dropped their bytes a second time (a negative size, retention misled)."""
    log = eventlog.open_log(Storage(path=small_fs / "log", shared=shared, lease_ttl=5.0, retention=60.0))
    await log.open()
    try:
        await begun(log, StreamMeta(key="t", kind="thread", upstream="u", path="/threads/t/stream"))
        for i in range(40):
            await log.append("t", evs(*(f"{i} {'x' * 3000}" for _ in range(20))))
        before = await log.lookup("t")
        assert before is not None and before.size > 2_000_000
        filler = fill(small_fs, leave=0)
        with pytest.raises(StorageError):
            await log.sweep(now=time.time() + 3600)  # every record is past retention; the commit fails
        filler.unlink()
        await log.append("t", evs("after"))  # the stream takes its next batch
        held = await log.lookup("t")
        assert held is not None and held.size > before.size, "the records the trim left are counted"
        assert len(await log.read("t", 0, 10**18, 10_000)) == 801, "and read: nothing was dropped"
        await log.sweep(now=time.time() + 3600)  # space is back: the trim goes through, once
        trimmed = await log.lookup("t")
        assert trimmed is not None and trimmed.size == 0 and trimmed.open
    finally:
        await log.close()


@pytest.mark.parametrize("shared", [False, True], ids=["lmdb", "lmdb-shared"])
async def test_a_retention_eviction_that_fails_to_commit_is_made_at_the_next_sweep(
        small_fs: Path, shared: bool) -> None:
    """The embedded log forgot the streams retention chose as soon as it chose them. When the write
    that removes them failed (a full disk), they stayed on disk, out of the size the budget is
    judged by and out of every later sweep's sight, until a restart."""
    storage = Storage(path=small_fs / "log", shared=shared, lease_ttl=5.0, retention=60.0)
    log = eventlog.open_log(storage)
    await log.open()
    try:
        await begun(log, meta("old"))
        for i in range(40):
            await log.append("old", evs(*(f"{i} {'x' * 3000}" for _ in range(20))))
        await log.finish("old", "done")
        filler = fill(small_fs, leave=0)
        with pytest.raises(StorageError):
            await log.sweep(now=time.time() + 3600)
        filler.unlink()
        assert await log.sweep(now=time.time() + 3600) == 1, "tried again once space is back"
        assert await log.lookup("old") is None
    finally:
        await log.close()
    log = eventlog.open_log(storage)
    await log.open()
    try:
        assert await log.lookup("old") is None, "gone from the disk, not only from the process"
    finally:
        await log.close()


async def test_a_read_asked_for_fewer_bytes_stops_inside_a_batch_and_goes_on_from_anywhere(open_log: Opener) -> None:
    # A replay page is about 64 KiB (gateway.replay.PAGE_BYTES), so a client that stops reading holds
    # little. One stored batch may hold far more (here 400 events of ~1 KiB committed at once): the
    # read stops inside it, counted on the events it takes, and reading on from any position, the
    # middle of the batch too, gets every event once, a page at a time of at most the budget.
    log = await open_log()
    await begun(log, meta("a"))
    written = await log.append("a", evs(*(f"{i:03d}" + "x" * 1000 for i in range(400))))
    last = written[-1][0]
    for start in (0, written[137][0]):
        got, pos, pages = [], start, 0
        while pos < last and pages < 100:
            page = await log.read("a", pos, last, 2000, 8 << 10)
            assert page and sum(len(body) for _, body in page) <= 8 << 10, len(page)
            got += page
            pos, pages = page[-1][0], pages + 1
        assert got == [e for e in written if e[0] > start]
    big = await log.read("a", 0, last, 2000, 10)
    assert big == written[:1], "one event at least, however small the budget"
    # Batches bigger than the budget, between another stream's (seqs come from one counter): the
    # batch found first may end at the reader's position, and that is not the end of the stream.
    await begun(log, meta("b"))
    large: list[tuple[int, bytes]] = []
    for i in range(4):
        large += await log.append("a", evs(f"L{i}" + "y" * 20_000))
        await log.append("b", evs(f"b{i}"))
    pos, got = last, []
    for _ in range(10):
        if pos >= large[-1][0]:
            break
        page = await log.read("a", pos, large[-1][0], 2000, 8 << 10)
        assert page, f"an empty page after {pos}: the stream looks gone"
        got += page
        pos = page[-1][0]
    assert got == large


async def test_a_read_and_a_tail_of_large_events_are_bounded_in_bytes(open_log: Opener) -> None:
    # A replay page is up to 2,000 events (follower.REPLAY_PAGE): of 1 MB state snapshots, 2 GB in
    # memory for one client's replay, and a re-join's tail as many. Every backend stops a read and a
    # tail after a few MiB; the reader goes on from where a page stopped and gets everything.
    log = await open_log()
    await begun(log, meta("a"))
    written: list[tuple[int, bytes]] = []
    for i in range(40):
        written += await log.append("a", evs(f"{i:02d}" + "x" * (1 << 20), uid=f"{i}-0"))
    last = written[-1][0]
    page = await log.read("a", 0, last, 2000)
    assert 0 < len(page) < len(written) and page == written[:len(page)]
    assert sum(len(body) for _, body in page) <= 10 << 20  # a budget of a few MiB, and the batch across it
    tail = await log.tail("a", 2000)
    assert 0 < len(tail) < len(written) and sum(len(body) for _, body in tail) <= 10 << 20
    assert [uid for uid, _ in tail] == [f"{i}-0" for i in range(40 - len(tail), 40)]
    got, pos = [], 0
    while pos < last:
        page = await log.read("a", pos, last, 2000)
        got += page
        pos = page[-1][0]
    assert got == written


_OPEN_AT = """
import asyncio, sys, time
from pathlib import Path
from gateway import eventlog
from gateway.config import Storage

async def main() -> None:
    log = eventlog.open_log(Storage(path=Path(sys.argv[1]), shared=True, lease_ttl=5.0))
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
    await log.open()
    await log.close()

asyncio.run(main())
"""


def test_workers_starting_together_on_a_new_shared_log_all_open_it(tmp_path: Path) -> None:
    """``workers: N`` on a data directory that has no log yet: every worker opens it at once. One
    creating the file (empty until LMDB writes its header) while another checked it before opening
    was refused as a truncated log, and the supervisor stopped them all: a first start that fails
    now and then. Swept over fresh directories, several processes started together on each."""
    for round_ in range(8):
        start_at = time.time() + 0.6  # past the processes' imports
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(tmp_path / f"log{round_}"), str(start_at)],
                                  env=tree_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(4)]
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out[-2000:]



async def test_redis_answers_a_batch_whose_commit_lost_its_connection_on_both_tries(redis_server: Any) -> None:
    """Both tries of a commit lose their connection: the batch is answered with StorageError, so a
    capture learns that storage failed (and its end is not awaited forever)."""
    relay = await TcpRelay("127.0.0.1", redis_server.port, lose_replies_to=b"EVALSHA").start()
    cfg = Storage(backend="redis", redis_url=f"redis://127.0.0.1:{relay.port}/0",
                  redis_prefix=f"l{uuid.uuid4().hex[:10]}", lease_ttl=5.0)
    log = RedisEventLog(cfg)
    await log.open()
    try:
        await begun(log, meta("r1"))
        relay.lose_replies(1.0)
        for write in (lambda: log.submit("r1", evs("a")), lambda: log.finish("r1", "done")):
            with pytest.raises(StorageError):  # before the fix: never answered
                await asyncio.wait_for(write(), 10)
            relay.lose_replies(0.0)
            for _ in range(100):  # bounded: the probe finds Redis answering again
                if log.failure is None:
                    break
                await asyncio.sleep(0.1)
            await log.begin(meta("r1"))
            relay.lose_replies(1.0)
    finally:
        await log.close()
        await relay.stop()


async def test_redis_counts_a_batch_applied_though_both_replies_of_its_commit_were_lost(redis_server: Any) -> None:
    """The first try of a commit runs and its reply is lost, and so is the retry's: the batch is in
    the log all the same, so gateway_log_events_appended (the on_commit count) must say so once Redis
    answers again, as it does for a retry that gets its answer."""
    relay = await TcpRelay("127.0.0.1", redis_server.port, lose_replies_to=b"EVALSHA").start()
    counted: list[int] = []
    cfg = Storage(backend="redis", redis_url=f"redis://127.0.0.1:{relay.port}/0",
                  redis_prefix=f"l{uuid.uuid4().hex[:10]}", lease_ttl=5.0)
    log = RedisEventLog(cfg, on_commit=lambda n, _s, ok: counted.append(n if ok else 0))
    await log.open()
    try:
        m = meta("r1")
        await begun(log, m)
        await log.submit("r1", evs("a", "b"))
        relay.lose_replies(1.0)  # both tries of the next commit run, and neither reply arrives
        with pytest.raises(StorageError):
            await asyncio.wait_for(log.submit("r1", evs("c", "d", "e")), 10)
        relay.lose_replies(0.0)
        for _ in range(100):  # Redis answers again: the log learns it takes writes (bounded)
            if log.failure is None:
                break
            await asyncio.sleep(0.1)
        assert log.failure is None
        held = await log.read("r1", 0, await log.last_seq(), 100)
        assert [body for _, body in held][-3:] == [body for body, _ in evs("c", "d", "e")]  # the lost-reply batch is held
        assert sum(counted) == len(held)
        await log.begin(m)  # the capture goes on: counted once, and what follows counted as held
        await log.submit("r1", evs("f"))
        assert sum(counted) == len(await log.read("r1", 0, await log.last_seq(), 100)) == 6
    finally:
        await log.close()
        await relay.stop()
