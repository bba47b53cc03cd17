"""The processes sharing one LMDB directory: who is alive, and that a message that could not be
delivered is never a silent loss (the receiver is told to catch up from the log)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

from gateway import eventlog
from gateway.config import Storage
from gateway.eventlog.siblings import FREE, Siblings


def pair(tmp_path: Path, ttl: float = 5.0) -> tuple[Siblings, Siblings, list[Any], list[Any]]:
    got_a: list[Any] = []
    got_b: list[Any] = []
    a = Siblings(tmp_path, ttl, lambda who, m: got_a.append(m), lambda who: None)
    b = Siblings(tmp_path, ttl, lambda who, m: got_b.append(m), lambda who: None)
    return a, b, got_a, got_b


async def test_a_sibling_whose_queue_was_full_is_told_to_catch_up(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    a, b, _, got_b = pair(tmp_path)
    a.start(loop)
    b.start(loop)
    try:
        assert a.scan() == {b.me}
        assert b._sock is not None
        loop.remove_reader(b._sock.fileno())  # b's loop is busy: its queue fills up
        sent = 0
        while sent < 100_000 and a.send(b.me, ["commit", a.me, [["k", sent, sent + 1, 10, False]]]):
            sent += 1
        assert 0 < sent < 100_000, "the queue filled up"
        loop.add_reader(b._sock.fileno(), b._readable)  # b reads again
        for _ in range(100):
            if got_b and got_b[-1][0] == "resync":
                break
            await asyncio.sleep(0.02)
        commits = [m for m in got_b if m[0] == "commit"]
        assert [m[2][0][1] for m in commits] == list(range(sent)), "every message that was sent arrived, in order"
        assert got_b[-1] == ["resync", a.me], "then the message that was dropped is made up for"
    finally:
        a.stop()
        b.stop()


async def test_a_sibling_is_alive_while_it_holds_its_lock_and_beats(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    a, b, _, _ = pair(tmp_path, ttl=2.0)
    a.start(loop)
    b.start(loop)
    try:
        assert a.alive(b.me) and b.alive(a.me)
        assert not a.alive(FREE) and not a.alive("../escape") and not a.alive("never-was")
        stale = time.time() - 10
        os.utime(tmp_path / "workers" / f"{b.me}.lock", (stale, stale))  # b's loop stopped beating
        assert not a.alive(b.me), "a stalled sibling loses its streams"
        b.beat()
        assert a.alive(b.me), "and is alive again once it beats"
        assert b._lock_fd is not None
        os.close(b._lock_fd)  # as when it dies (SIGKILL included): the kernel lets its lock go, the file stays
        b._lock_fd = None
        assert not a.alive(b.me)
        assert not (tmp_path / "workers" / f"{b.me}.lock").exists(), "a dead sibling's file is cleared away"
        assert a.scan() == set()
    finally:
        a.stop()
        b.stop()


@contextlib.asynccontextmanager
async def _beside_a_peer(tmp_path: Path, got: list[Any]) -> AsyncIterator[tuple[eventlog.EventLog, Siblings]]:
    """A shared log, and a bare sibling process beside it that keeps every message it gets in ``got``."""
    peer = Siblings(tmp_path, 5.0, lambda who, m: got.append(m), lambda who: None)
    peer.start(asyncio.get_running_loop())
    log = eventlog.open_log(Storage(path=tmp_path, shared=True, lease_ttl=5.0))
    await log.open()
    try:
        yield log, peer
    finally:
        await log.close()
        peer.stop()


async def test_a_sibling_owed_a_catch_up_gets_the_whole_state_even_with_many_cancels_asked(tmp_path: Path) -> None:
    """What a shared log states again after a dropped message (its follower counts, the cancels its
    clients asked for) goes out whole each time the sibling's queue has room. Sent as a message per
    cancel, a state longer than the queue (11 datagrams) never got through: each try was cut at the
    queue's end and started over from the first, so the last cancels were never said."""
    loop = asyncio.get_running_loop()
    got: list[Any] = []
    async with _beside_a_peer(tmp_path, got) as (log, peer):
        assert peer._sock is not None
        loop.remove_reader(peer._sock.fileno())  # the sibling's loop is busy: its queue fills up
        asked = [f"default/run/r{i}" for i in range(15)]
        for key in asked:  # runs the sibling captures, asked to be cancelled here
            await log.request_cancel(key)
        log.set_followers("default/run/r0", 2)
        await asyncio.sleep(0.1)
        got.clear()
        loop.add_reader(peer._sock.fileno(), peer._readable)  # it reads again


        def told() -> set[str]:  # as a message each, or with the state
            return ({m[2] for m in got if m[0] == "cancel"}
                    | {k for m in got if m[0] == "restate" and len(m) > 5 for k in m[5]})

        for _ in range(50):
            await asyncio.sleep(0.05)
            if set(asked) <= told():
                break
        assert set(asked) <= told(), f"cancels never said: {sorted(set(asked) - told())}"
        states = [m for m in got if m[0] == "restate" and m[4]]
        assert states and states[-1][2] == {"default/run/r0": 2}, "and the follower counts, whole"


async def test_a_state_of_many_long_keys_goes_whole_in_datagrams_that_fit(tmp_path: Path) -> None:
    """Counted by entries (2,000 a part), a process following thousands of streams with long keys
    stated itself in datagrams over a default host's limit (net.core.wmem_max 208 KiB): EMSGSIZE,
    raised out of the heartbeat, which ended it and got the process taken for dead. Sized by bytes,
    a state bigger than the socket's buffer then never fit at once; it goes as the sibling reads."""
    got: list[Any] = []
    async with _beside_a_peer(tmp_path, got) as (log, peer):
        counts = {f"an-upstream-with-a-long-name/run/{'t' * 60}/{i:0120d}": 1 for i in range(2500)}
        for key, n in counts.items():
            log.set_followers(key, n)
        await asyncio.sleep(0.2)
        got.clear()
        siblings = log._siblings  # type: ignore[attr-defined]
        siblings._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 212992 // 2)  # a default host's (doubled)
        siblings.state_to(peer.me)  # what a resync or a hello gets
        whole: dict[str, int] = {}
        for _ in range(200):
            await asyncio.sleep(0.02)
            parts = [m for m in got if m[0] == "restate"]
            if parts and parts[-1][4]:
                for m in parts:
                    whole.update(m[2])
                break
        assert whole == counts, f"{len(whole)} of {len(counts)} counts stated"


async def test_a_message_read_after_its_sender_died_comes_before_it_is_said_gone(tmp_path: Path) -> None:
    """A process sent its follower counts and died before they were read. The reader, meeting it,
    found it gone (its state to it refused) and said so, then handed the dead process's message
    on: the shared log kept the counts of a process it had been told was gone, for ever (nothing
    says gone twice), and a stream nobody follows looked followed (never cancelled, never let go)."""
    loop = asyncio.get_running_loop()
    heard: list[tuple[str, str]] = []  # ("message" | "gone", who), in the order the reader was told
    a = Siblings(tmp_path, 5.0, lambda who, m: heard.append(("message", who)), lambda who: heard.append(("gone", who)),
                 lambda: iter([["restate", "a", {}, True, True, []]]))
    b = Siblings(tmp_path, 5.0, lambda who, m: None, lambda who: None)
    a.start(loop)
    assert a._sock is not None
    loop.remove_reader(a._sock.fileno())  # a's loop is busy: b's message waits in its queue
    b.start(loop)
    try:
        assert b.send(a.me, ["followers", b.me, {"k": 1}])
    finally:
        b.stop()  # b dies
    a._readable()
    try:
        assert ("gone", b.me) in heard, "a found b gone when it answered it"
        assert heard[-1] == ("gone", b.me), f"told of b after it was said gone: {heard}"
    finally:
        a.stop()
