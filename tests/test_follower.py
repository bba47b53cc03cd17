"""One client's view of a stream, over a fake Source (an in-memory log and feed): the
register-then-replay race forced at its worst moment, a batch lost on the way, an overflow, a
capture that began again under the client. And the re-join decisions of a capture, alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Callable

import pytest

from gateway.capture import UpstreamBroke, _Progress, rejoin_delay
from gateway.config import Streams
from gateway.eventlog import Entry, StreamMeta
from gateway.eventlog.base import Batch, Feed, LocalFeeds
from gateway.follower import Follower, StreamCut
from gateway.replay import Page, ReplayPages
from gateway.sse import SSEProtocolError
from gateway.upstream import UpstreamRefused, UpstreamTimeout, UpstreamUnreachable, classify


class FakeSource:
    """A stream's committed events and live feed, in memory; ``on_ready`` runs between the follower
    subscribing and reading the head (where a commit can land, on a shared log's feed above all)."""

    heartbeat = 10.0
    closing = False

    def __init__(self) -> None:
        self.feeds = LocalFeeds()
        self.meta = StreamMeta(key="s", kind="run", upstream="u", path="/p", base=100)
        self.entries: list[Entry] = []
        self.hook: Callable[[], object] = lambda: None
        self.reads = 0  # pages read from the log

    def commit(self, n: int, *, publish: bool = True, end: bool = False) -> list[Entry]:
        prev = self.meta.head  # the head before: 0 for a stream begun anew
        top = max(prev, self.meta.base)
        new = [(top + i + 1, f"data: {top + i + 1}\n".encode()) for i in range(n)]
        self.entries += new
        self.meta = replace(self.meta, head=new[-1][0] if new else prev, open=not end,
                            end="done" if end else None)
        if publish:
            self.feeds.deliver("s", Batch("events", new, prev, 10 * n))
            if end:
                self.feeds.deliver("s", Batch("end", prev=self.meta.head))
        return new

    async def ready(self, feed: Feed) -> None:
        self.hook()

    async def lookup(self, key: str) -> StreamMeta | None:
        return self.meta

    async def page(self, key: str, after: int, upto: int, limit: int) -> Page:
        self.reads += 1
        return Page([e for e in self.entries if after < e[0] <= upto][:limit])

    def subscribe(self, key: str) -> Feed:
        return self.feeds.subscribe(key, 1000, 1 << 20)

    def joined(self, follower: Follower) -> None: ...
    def left(self, follower: Follower) -> None: ...


async def collect(follower: Follower) -> list[int]:
    return [seq for page in [p async for p in follower.pages()] for seq, _ in page.entries]


async def test_a_client_subscribed_before_the_first_commit_gets_it_from_the_feed_not_the_log() -> None:
    # The client of a new run subscribes before the capture begins (StreamHandlers.create_run_stream),
    # and the run's first events may commit with the begin: they are in its feed already.
    src = FakeSource()
    follower = Follower(src, "s", 0)
    src.commit(3)
    reader = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.01)
    src.commit(2)
    src.commit(1, end=True)
    assert await asyncio.wait_for(reader, 5) == [e[0] for e in src.entries]
    assert src.reads == 0, "nothing read from the log"


@pytest.mark.parametrize("case", ["published before subscribing", "not published", "ended"])
async def test_a_feed_that_does_not_follow_on_from_the_position_is_not_trusted_for_it(case: str) -> None:
    src = FakeSource()
    if case == "published before subscribing":
        src.commit(2)
    elif case == "not published":
        src.commit(2, publish=False)  # a batch lost on the way: the feed's first starts after it
    follower = Follower(src, "s", 0)
    src.commit(3, end=case == "ended")
    reader = asyncio.create_task(collect(follower))
    if case != "ended":
        await asyncio.sleep(0.01)
        src.commit(1, end=True)
    assert await asyncio.wait_for(reader, 5) == [e[0] for e in src.entries], "each event once, in order"
    assert src.reads >= 1, "what the feed lacks is read from the log"


async def test_a_commit_between_subscribing_and_reading_the_head_is_neither_lost_nor_repeated() -> None:
    src = FakeSource()
    src.commit(3)
    src.hook = lambda: src.commit(2)  # lands on the feed and in the log before the head is read
    follower = Follower(src, "s", 0)
    reader = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.01)
    src.commit(1, end=True)
    got = await asyncio.wait_for(reader, 5)
    assert got == [e[0] for e in src.entries] and len(got) == 6, "each event once, in order"


async def test_a_batch_lost_on_the_way_is_read_from_the_log() -> None:
    src = FakeSource()
    src.commit(2)
    follower = Follower(src, "s", 0)
    reader = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.01)
    src.commit(3, publish=False)  # a shared log's channel dropped it
    src.commit(1, end=True)  # the next batch says what the head was before it
    assert await asyncio.wait_for(reader, 5) == [e[0] for e in src.entries]


async def test_a_follower_that_falls_behind_catches_up_from_the_log() -> None:
    src = FakeSource()
    follower = Follower(src, "s", 0)
    assert follower.feed is not None
    follower.feed.limit = 2
    src.commit(1)
    for _ in range(5):
        src.commit(1)  # past the feed's bound: it overflows instead of blocking the capture
    src.commit(1, end=True)
    assert await asyncio.wait_for(collect(follower), 5) == [e[0] for e in src.entries]


@pytest.mark.parametrize("where", ["feed", "head"])
async def test_a_capture_begun_anew_under_the_client_cuts_it(where: str) -> None:
    src = FakeSource()
    src.commit(3)
    follower = Follower(src, "s", None)
    reader = asyncio.create_task(collect(follower))
    await asyncio.sleep(0.01)
    # The log lost the stream and the capture began it again: new ids, above a new base.
    src.meta = replace(src.meta, base=src.meta.head + 1000, head=0)
    if where == "feed":
        src.commit(2)
    else:
        src.feeds.resync("s")  # the follower looks at the head itself
    with pytest.raises(StreamCut):
        await asyncio.wait_for(reader, 5)


def test_a_leg_that_may_recover_is_retried_with_backoff_and_one_that_will_not_is_given_up() -> None:
    cfg = Streams(reattach_attempts=3, reattach_backoff=0.5)
    for transient in (UpstreamBroke("closed"), UpstreamUnreachable("refused"), UpstreamTimeout("slow"),
                      TimeoutError(), _Progress("mid-event")):
        assert [rejoin_delay(transient, k, cfg, True) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, None]
    for permanent in (UpstreamRefused("404"), SSEProtocolError("not SSE")):
        assert rejoin_delay(permanent, 1, cfg, True) is None
    assert rejoin_delay(UpstreamBroke("closed"), 1, cfg, False) is None, "a stateless run has no join path"


def test_what_an_upstream_answer_means() -> None:
    assert [classify(s) for s in (401, 403, 404)] == ["refused"] * 3
    assert [classify(s) for s in (400, 409, 422)] == ["permanent"] * 3
    assert [classify(s) for s in (408, 429, 500, 502, 503)] == ["retry"] * 5


class Client:
    """An express writer that takes what it is offered until told to refuse (a full buffer)."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.refuse = False

    def write(self, entries: list[Entry]) -> bool:
        if self.refuse:
            return False
        self.got += [seq for seq, _ in entries]
        return True


async def test_a_caught_up_follower_is_written_from_the_commit_and_the_task_takes_the_rest_in_order() -> None:
    src = FakeSource()
    src.commit(3)
    client = Client()
    follower = Follower(src, "s", 0)
    follower.express(client.write)
    pages: list[int] = []

    async def task() -> None:  # what the handler's task writes, in the same order as the client's writes
        async for page in follower.pages():
            client.got += [seq for seq, _ in page.entries]
            pages.extend(seq for seq, _ in page.entries)
    reader = asyncio.create_task(task())
    await asyncio.sleep(0.01)
    assert pages == [101, 102, 103], "the replay goes through the task"
    src.commit(2)
    src.commit(1)
    assert client.got[3:] == [104, 105, 106], "written from the commit, before the task could run"
    await asyncio.sleep(0.01)
    assert pages == [101, 102, 103], "the task took none of them"
    src.commit(2, publish=False)  # a batch lost on the way: the next one does not follow on
    src.commit(1)
    client.refuse = True
    src.commit(1)  # the client's buffer is full: queued for the task
    await asyncio.sleep(0.01)
    client.refuse = False
    src.commit(1, end=True)
    await asyncio.wait_for(reader, 5)
    assert client.got == [e[0] for e in src.entries], "each event once, in order, whichever way it went"
    assert pages == [101, 102, 103, 107, 108, 109, 110], "the gap, the refused batch and all after them"


async def test_a_shared_replay_read_that_found_nothing_is_not_counted_as_a_page() -> None:
    """gateway_replay_pages_total{source}: a page read from the log counts only when it holds
    events, and so must a page shared with clients that waited for that read. A stream evicted
    during a resume storm left every waiter counted as served a shared page it never got."""
    counted: list[str] = []
    release = asyncio.Event()

    async def read(key: str, after: int, upto: int, limit: int, max_bytes: int) -> list[Entry]:
        await release.wait()
        return []  # the stream went from the log while it was read

    pages = ReplayPages(read, budget=1 << 20, on_page=counted.append)
    first = asyncio.create_task(pages.page("k", 0, 10, 100))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(pages.page("k", 0, 10, 100)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    got = await asyncio.gather(first, *waiters)
    assert not any(got), "nothing was held"
    assert counted == [], counted


async def test_followers_joining_and_leaving_a_stream_each_get_the_batches_committed_while_they_follow() -> None:
    # A stream's one follower is held as itself, a second makes a set, and back (LocalFeeds): each
    # step of that must leave every follower that is still there on the stream's feed, and none gone.
    feeds = LocalFeeds()
    got: dict[str, list[int]] = {}

    def join(name: str) -> Feed:
        got[name] = seen = list[int]()
        feed = feeds.subscribe("s", 1000, 1 << 20)

        def take(batch: Batch) -> bool:
            seen.extend(seq for seq, _ in batch.entries)
            return True

        feed.express = take
        feed.waiting(10.0)  # waits with nothing queued: takes batches straight from the commit
        return feed

    seq = 0

    def commit() -> None:
        nonlocal seq
        seq += 1
        feeds.deliver("s", Batch("events", [(seq, b"data: x\n")], seq - 1, 10))

    a = join("a")
    commit()
    b = join("b")
    commit()
    c = join("c")
    commit()
    b.close()
    commit()
    a.close()
    commit()
    assert feeds.following("s")
    c.close()
    commit()
    assert not feeds.following("s")
    a2 = join("a2")
    commit()
    a2.close()
    assert got == {"a": [1, 2, 3, 4], "b": [2, 3], "c": [3, 4, 5], "a2": [7]}
    feeds.stop()
