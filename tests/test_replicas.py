"""Several gateway replicas sharing one log: resume on any replica, survive losing one.

The subprocess tests run twice (``shared_storage``): on a real Redis, and on one LMDB data
directory several processes of one host share (``workers: N`` with the embedded log). In-process
replicas, where the test needs to reach inside (the seam hook), are Redis only: LMDB allows one
environment per process. Every test checks the same invariant from the client's
side: every event exactly once, ids strictly increasing, the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.eventlog.base import Feed
from gateway.workers import START_TRIES
from tests.conftest import REPO, GatewayProcess, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.nginx import Nginx
from tests.support.procs import die_with_parent, tree_env
from tests.support.redis_server import RedisServer
from tests.support.sse import Ev, read_events, read_until_cut
from tests.support.disk import fill
from tests.support.invariants import assert_exactly_once, assert_whole_or_marked, follow_to_end
from tests.support.runs import assert_ids_increase, customs, join, new_thread, start_run, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def counter(http: aiohttp.ClientSession, replica: GatewayProcess, name: str) -> float:
    """The sum of a counter's series on a replica's /metrics."""
    async with http.get(f"http://127.0.0.1:{replica.admin_port}/metrics") as r:
        text = await r.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def replica_config(tmp_path: Path, name: str, upstream: str, storage: dict[str, Any]) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    lines = [f"upstreams:\n  default:\n    urls: [{upstream}]\n",
             "storage:\n" + "".join(f"  {k}: {v}\n" for k, v in storage.items()),
             "streams:\n  reattach_backoff: 100ms\n"]
    cfg.write_text("".join(lines))
    return cfg


def logs_of(*procs: GatewayProcess, lines: int = 120) -> str:
    """The last lines each replica logged (takeovers, re-joins, gaps): what a failure here needs."""
    return "\n".join(f"--- {p.log_path.name}\n" + "\n".join(p.log_path.read_text(errors="replace").splitlines()[-lines:])
                     for p in procs)


@pytest.fixture
def replicas(gateway_process: Any, fake_upstream: FakeAgentServer, shared_storage: dict[str, Any],
             tmp_path: Path) -> Callable[[int], list[GatewayProcess]]:
    """Start N gateway subprocesses on one shared log, in front of the fake upstream."""
    def start(n: int) -> list[GatewayProcess]:
        return [gateway_process("--config", str(replica_config(tmp_path, f"r{i}", fake_upstream.url,
                                                                  shared_storage))).start() for i in range(n)]
    return start


async def test_three_replicas_serve_each_others_resumes(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession) -> None:
    a, b, c = replicas(3)
    resp = await start_run(http, a.url, 60)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=10)
    resp.close()
    # The client comes back on another replica, then on the third: the log is the same.
    async with http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""}) as r:
        middle = await read_events(r, limit=20)
    async with http.get(c.url + loc, headers={"Last-Event-ID": middle[-1].id or ""}) as r:
        assert r.status == 200 and "X-Gateway-Resume" not in r.headers
        rest = await read_events(r)
    assert_exactly_once(seen + middle + rest, 60)
    for replica in (a, b, c):  # each replica replays the finished run the same way
        assert await join(http, replica.url + loc, "-1") == seen + middle + rest


@pytest.mark.parametrize("kill_after", [2, 15, 60])
async def test_owner_killed_mid_stream_the_client_resumes_on_another_replica(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession, kill_after: int) -> None:
    a, b, _c = replicas(3)
    resp = await start_run(http, a.url, 100, delay=0.005)  # resumable upstream: the gateway asked for it
    loc = resp.headers["Location"]
    # Meanwhile b captures a run of its own: its commits go on whenever a dies (on LMDB, a may die
    # inside a write transaction, holding the lock every process commits under).
    own = await start_run(http, b.url, 150, delay=0.005)
    seen = await read_events(resp, limit=kill_after)
    a.kill()  # SIGKILL the owner: its lease runs out, another replica takes the capture over
    resp.close()
    async with http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""}) as r:
        rest = await asyncio.wait_for(read_events(r), 30)
    try:
        assert_exactly_once(seen + rest, 100)
        assert_exactly_once(await asyncio.wait_for(read_events(own), 30), 150)
    except AssertionError as exc:  # rare (a duplicate once in CI): what each replica did says why
        raise AssertionError(f"{exc}\n{logs_of(a, b, _c)}") from exc
    own.close()


async def test_a_live_follower_on_another_replica_gets_every_event_as_it_is_committed(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession) -> None:
    a, b = replicas(2)
    resp = await start_run(http, a.url, 120, delay=0.02)  # a captures it; b only follows
    loc = resp.headers["Location"]
    first = await read_events(resp, limit=3)
    async with http.get(b.url + loc, headers={"Last-Event-ID": first[-1].id or ""}) as r:
        assert r.status == 200
        early = await read_events(r, limit=10)
        # Live, not a replay of a finished run: the owner's client has not seen these yet.
        assert customs(early)[-1] < 100, "the follower on b got events while the run was still going"
        rest = await read_events(r)
    mine = first + await read_events(resp)
    resp.close()
    assert_exactly_once(first + early + rest, 120)
    assert first + early + rest == mine, "b's follower saw exactly what a's client saw"


async def test_a_commit_bigger_than_a_read_page_reaches_a_follower_on_another_replica_whole(
        gateway_process: Any, fake_upstream: FakeAgentServer, shared_storage: dict[str, Any], tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """A state snapshot over 4 MiB and the small event after it, committed together. A follower on
    another replica waiting for the live tail was handed only the first read page (4 MiB) of that
    commit: the small event waited for the stream's next commit, or a heartbeat, and a run that then
    thinks for a while left its client without what had been committed. The heartbeat is long here
    and the run holds after the pair: nothing but the commit's own notice can bring the event."""
    gws = []
    for name in ("a", "b"):
        cfg = replica_config(tmp_path, name, fake_upstream.url, shared_storage)
        # A buffer that holds a snapshot: the batch is queued for the follower, not caught up from the log.
        cfg.write_text(cfg.read_text() + "  heartbeat: 600s\n  subscriber_buffer_bytes: 16MiB\n")
        gws.append(gateway_process("--config", str(cfg)).start())
    a, b = gws
    tid = await new_thread(http, a.url)
    # customs 0 and 2 are small, 1 is 5 MiB; the run holds before 1 and before 3
    resp = await http.post(f"{a.url}/threads/{tid}/runs/stream", json={
        "assistant_id": "a", "input": {"n": 4, "delay": 0, "pad": 5 << 20, "pad_at": [1], "hold_at": [1, 3]}})
    assert resp.status == 200
    loc = resp.headers["Location"]
    first = await read_events(resp, limit=2)
    run = fake_upstream.runs[first[0].json["run_id"]]
    async with http.get(b.url + loc, headers={"Last-Event-ID": first[0].id or ""}) as r:
        assert r.status == 200
        assert customs(await read_events(r, limit=1)) == [0]
        run.resume.set()  # the follower on b waits on the live tail: the pair comes now
        try:
            pair = await asyncio.wait_for(read_events(r, limit=2), 30)
        except asyncio.TimeoutError:
            raise AssertionError(f"the follower on b got less than a committed\n{logs_of(a, b)}") from None
        run.resume.set()
        rest = await asyncio.wait_for(read_events(r), 60)
    resp.close()
    assert_exactly_once(first + pair + rest, 4)


async def test_a_frozen_owner_is_fenced_when_it_wakes(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession) -> None:
    a, b = replicas(2)
    resp = await start_run(http, a.url, 150, delay=0.02)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=10)
    resp.close()
    a.freeze()  # past its lease: b takes over while a still believes it owns the stream
    await asyncio.sleep(3.0)
    a.thaw()
    async with http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""}) as r:
        rest = await asyncio.wait_for(read_events(r), 30)
    assert_exactly_once(seen + rest, 150)
    async with http.get(a.url + loc, headers={"Last-Event-ID": "-1"}) as r:  # the log has no interleaving
        assert_exactly_once(await read_events(r), 150)
    for _ in range(40):
        if "captured by another gateway process now" in a.log_text():
            break
        await asyncio.sleep(0.1)
    assert "captured by another gateway process now" in a.log_text(), "the woken owner stopped writing"
    # What an operator's alerts read: a lost its lease (learned at renewal or by a fenced append),
    # b took the stream over.
    assert await counter(http, a, "gateway_leases_lost_total") == 1
    assert await counter(http, b, "gateway_streams_taken_over_total") == 1


async def test_events_a_fenced_owner_appended_are_not_counted_as_appended(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession) -> None:
    """The owner of a live run is frozen past its lease; b takes the run over. What a read meanwhile and
    appends when it wakes is refused (fenced): gateway_log_events_appended_total on both replicas adds up
    to the events the log holds, not more (on Redis the refused batch was counted as appended)."""
    a, b = replicas(2)
    resp = await start_run(http, a.url, 150, delay=0.02)
    loc = resp.headers["Location"]
    await read_events(resp, limit=10)
    resp.close()
    a.freeze()
    await asyncio.sleep(3.0)
    a.thaw()
    async with http.get(b.url + loc, headers={"Last-Event-ID": "-1"}) as r:
        held = await asyncio.wait_for(read_events(r), 30)
    assert_exactly_once(held, 150)
    for _ in range(40):
        if "captured by another gateway process now" in a.log_text():
            break
        await asyncio.sleep(0.1)
    appended = [await counter(http, p, "gateway_log_events_appended_total") for p in (a, b)]
    assert sum(appended) == len(held), (appended, len(held), logs_of(a, b))


async def test_a_load_balancer_in_front_of_replicas(
        replicas: Callable[[int], list[GatewayProcess]], http: aiohttp.ClientSession) -> None:
    reps = replicas(3)
    lb = Nginx([f"127.0.0.1:{r.port}" for r in reps]).start()
    try:
        resp = await start_run(http, lb.url, 40)
        loc = resp.headers["Location"]
        got = await read_events(resp, limit=5)
        resp.close()
        while len(got) < 41:  # every reconnect may land on another replica
            async with http.get(lb.url + loc, headers={"Last-Event-ID": got[-1].id or ""}) as r:
                assert r.status == 200
                got += await read_events(r, limit=7)
        assert_exactly_once(got, 40)
    finally:
        lb.stop()


# --- in-process replicas, where the test reaches inside ----------------------------------------------------

async def two_gateways(make_gateway: MakeGateway, fake: FakeAgentServer, tmp_path: Path,
                       storage: dict[str, Any]) -> tuple[RunningGateway, RunningGateway]:
    gws = []
    for name in ("a", "b"):
        raw = gateway_config(tmp_path / name, {"default": {"urls": [fake.url]}}, streams={"reattach_backoff": "100ms"})
        raw["storage"] = storage
        gws.append(await make_gateway(raw))
    return gws[0], gws[1]


async def test_two_replicas_asked_for_the_same_run_at_once_open_one_leg(
        replicas: Callable[[int], list[GatewayProcess]], fake_upstream: FakeAgentServer,
        http: aiohttp.ClientSession) -> None:
    a, b = replicas(2)
    async with aiohttp.ClientSession() as direct:  # a run the gateways did not create
        created = await direct.post(f"{fake_upstream.url}/threads/t/runs/stream",
                                    json={"assistant_id": "a", "stream_resumable": True,
                                          "input": {"n": 40, "delay": 0.02}})
        loc = created.headers["Location"]
        await read_events(created, limit=2)
        fake_upstream.requests.clear()
        both = await asyncio.gather(join(http, a.url + loc, "-1"), join(http, b.url + loc, "-1"))
        created.close()
    legs = [p for m, p in fake_upstream.requests if m == "GET" and p.endswith("/stream")]
    assert len(legs) == 1, f"the upstream saw {len(legs)} legs"
    for got in both:
        assert customs(got) == list(range(40))
        assert_ids_increase(got)
    assert both[0] == both[1]


@pytest.mark.parametrize("seed", range(6))
async def test_the_seam_between_subscribing_and_the_head_loses_and_repeats_nothing(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, redis_storage: dict[str, Any],
        http: aiohttp.ClientSession, seed: int) -> None:
    a, b = await two_gateways(make_gateway, fake_upstream, tmp_path, redis_storage)
    rng = random.Random(seed)
    ready = b.gw.hub.ready

    async def ready_late(feed: Feed) -> None:  # commits land between subscribing and reading the head
        await ready(feed)
        await asyncio.sleep(rng.uniform(0, 0.08))

    b.gw.hub.ready = ready_late  # type: ignore[method-assign]
    resp = await start_run(http, a.url, 80, delay=0.005)
    loc = resp.headers["Location"]
    cuts = sorted(rng.sample(range(1, 80), 6))
    got: list[Ev] = []
    for k in cuts:  # reconnect to the other replica at random points, each time through the seam
        last = got[-1].id if got else "-1"
        async with http.get(b.url + loc, headers={"Last-Event-ID": last or ""}) as r:
            got += await read_events(r, limit=k - len(got))
    async with http.get(b.url + loc, headers={"Last-Event-ID": got[-1].id or ""}) as r:
        got += await read_events(r)
    await read_events(resp)
    assert_exactly_once(got, 80)


async def test_followers_survive_their_feed_connection_being_killed(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, redis_server: RedisServer,
        redis_storage: dict[str, Any], http: aiohttp.ClientSession) -> None:
    a, b = await two_gateways(make_gateway, fake_upstream, tmp_path, redis_storage)
    resp = await start_run(http, a.url, 120, delay=0.01)
    loc = resp.headers["Location"]
    async with http.get(b.url + loc, headers={"Last-Event-ID": "-1"}) as r:
        first = await read_events(r, limit=20)
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")  # every replica's feed connection
        rest = await asyncio.wait_for(read_events(r), 30)
    await read_events(resp)
    assert_exactly_once(first + rest, 120)


async def test_redis_restarted_from_its_aof_mid_run_loses_nothing_a_client_saw(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    storage = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "aof", "lease_ttl": "5s"}
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}, streams={"reattach_backoff": "100ms"})
    raw["storage"] = storage
    gw = await make_gateway(raw)
    resp = await start_run(http, gw.url, 150, delay=0.01)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=20)
    own_redis.restart()  # from its append-only file
    more, _cut = await read_until_cut(resp)
    seen += more
    for _ in range(100):
        async with http.get(gw.admin_url + "/readyz") as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    rest = await asyncio.wait_for(join(http, gw.url + loc, seen[-1].id), 30)
    assert_exactly_once(seen + rest, 150)
    replay = await join(http, gw.url + loc, "-1")
    assert replay[: len(seen)] == seen, "every event a client saw is still there, under the same id"


async def test_after_redis_lost_everything_old_ids_are_not_held_and_new_ids_are_above(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    storage = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "flush", "lease_ttl": "2s"}
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = storage
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=5)
    old = await read_events(resp)
    loc = gw.url + resp.headers["Location"]
    own_redis.command("FLUSHALL")
    async with http.get(loc, headers={"Last-Event-ID": old[2].id or ""}) as r:
        assert r.status == 200 and r.headers["X-Gateway-Resume"] == "not-held"
        again = await read_events(r)
    assert customs(again) == list(range(5)), "the upstream's own replay, captured anew"
    assert min(int(e.id or 0) for e in again) > max(int(e.id or 0) for e in old), "new ids above every old one"


async def test_cancel_on_disconnect_waits_for_the_last_follower_on_any_replica(
        replicas: Callable[[int], list[GatewayProcess]], fake_upstream: FakeAgentServer,
        http: aiohttp.ClientSession) -> None:
    a, b = replicas(2)
    resp = await start_run(http, a.url, 400, delay=0.02, on_disconnect="cancel")
    loc = resp.headers["Location"]
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    other = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    await read_events(other, limit=3)
    resp.close()  # the client that asked for cancel leaves; one on the other replica stays
    await asyncio.sleep(2.0)  # longer than the owner's look at followers elsewhere
    assert fake_upstream.runs[run_id].status == "running", "a follower on another replica is still there"
    other.close()
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted", "the last follower left: cancelled"


async def test_workers_share_one_port_and_a_dead_one_is_replaced(
        gateway_process: Any, fake_upstream: FakeAgentServer, shared_storage: dict[str, Any], tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    sup, _ = await two_workers(gateway_process, replica_config(tmp_path, "w", fake_upstream.url, shared_storage))
    assert sup.proc is not None
    pid = sup.proc.pid
    resp = await start_run(http, sup.url, 80)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=10)
    resp.close()
    victim = _children(pid)[0]  # as they are now (one CI run found workers[0] gone by this point)
    os.kill(victim, signal.SIGKILL)  # its streams are taken over by the other, and it is started again
    got = list(seen)
    while len(got) < 81:
        try:
            async with http.get(sup.url + loc, headers={"Last-Event-ID": got[-1].id or ""}) as r:
                if r.status != 200:
                    await asyncio.sleep(0.1)
                    continue
                got += await read_events(r, limit=10)
        except aiohttp.ClientError:
            # A connection the dead worker had accepted (or was serving) is reset: a client retries.
            await asyncio.sleep(0.1)
    assert_exactly_once(got, 80)
    for _ in range(100):
        if len(_children(pid)) == 2 and victim not in _children(pid):
            break
        await asyncio.sleep(0.05)
    assert len(_children(pid)) == 2 and victim not in _children(pid), "the dead worker was replaced"
    assert sup.terminate() == 0


def _children(pid: int) -> list[int]:
    out = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in out.read_text().split()] if out.exists() else []


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie no one has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def workers_config(tmp_path: Path, upstream: str, extra: str = "") -> Path:
    """The config of ``--workers 2`` tests (run them with ``--admin-port 0``: worker 1 would take
    admin.port + 1, an even port, which the kernel hands to outgoing connections)."""
    cfg = replica_config(tmp_path, "w", upstream, {"backend": "lmdb", "shared": "true",
                                                    "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"})
    cfg.write_text(cfg.read_text() + extra)
    return cfg


async def two_workers(gateway_process: Any, cfg: Path) -> tuple[GatewayProcess, list[int]]:
    """A supervisor of two workers on ``cfg`` (admin ports 0, see workers_config), once both run."""
    sup: GatewayProcess = gateway_process("--config", str(cfg), "--workers", "2", "--admin-port", "0").start()
    assert sup.proc is not None
    for _ in range(100):
        if len(_children(sup.proc.pid)) == 2:
            break
        await asyncio.sleep(0.05)
    workers = _children(sup.proc.pid)
    assert len(workers) == 2, "two workers behind one port"
    return sup, workers


async def test_a_supervisor_stopped_while_it_restarts_a_worker_stops_the_new_one_too(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """SIGTERM in the second between a worker's death and its restart: the worker started then
    is stopped too, and the supervisor exits, instead of waiting forever on a worker it never told."""
    sup, workers = await two_workers(gateway_process, workers_config(tmp_path, fake_upstream.url))
    assert sup.proc is not None
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(200):  # reaped, not yet started again: the supervisor waits out its restart delay
        if len(now := _children(sup.proc.pid)) == 1 and victim not in now:
            break
        await asyncio.sleep(0.01)
    assert len(_children(sup.proc.pid)) == 1, "caught in the restart delay"
    assert sup.terminate() == 0, sup.log_text()[-3000:]


async def test_workers_stop_when_their_supervisor_is_killed(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A supervisor SIGKILLed (OOM killer, kill -9) leaves no worker holding the port behind it."""
    sup, workers = await two_workers(gateway_process, workers_config(tmp_path, fake_upstream.url))
    assert sup.proc is not None
    sup.kill()
    for _ in range(300):
        if all(_gone(w) for w in workers):
            break
        await asyncio.sleep(0.05)
    left = [w for w in workers if not _gone(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)  # no stray process outlives the test, whatever it asserts
    assert not left, "workers outlived their supervisor"


async def test_workers_that_cannot_start_stop_the_supervisor_as_one_process_would_stop(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """The port is taken: one process exits 1 at once; the supervisor too once each start failed
    (START_TRIES in a row), instead of starting workers that fail the same way every second forever
    (a service that looks up and serves nothing)."""
    sup = gateway_process("--config", str(workers_config(tmp_path, fake_upstream.url)), "--workers", "2",
                          "--admin-port", "0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", sup.port))
        taken.listen()
        sup.start()  # returns at once: the taken socket answers
        assert sup.proc is not None
        assert sup.proc.wait(20) == 1
    text = sup.log_text()
    assert "cannot listen" in text and "could not start" in text, text[-2000:]
    assert text.count("starting it again") <= 2 * (START_TRIES - 1), text[-2000:]


def _port_pair() -> tuple[int, socket.socket]:
    """A free port ``p`` and a listening socket on ``p + 1`` (worker 1's admin port when admin.port is p)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            p = probe.getsockname()[1]
        if p >= 65535:
            continue
        held = socket.socket()
        try:
            held.bind(("127.0.0.1", p + 1))
        except OSError:
            held.close()
            continue
        held.listen()
        return p, held
    raise RuntimeError("no free pair of ports")


async def test_a_worker_that_fails_its_first_start_once_is_started_again(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Worker 1's admin port (admin.port + 1) is held for a moment when the gateway starts (an outgoing
    connection's ephemeral port, another program starting): worker 1 exits 1 on its first start. Worker 0
    serves; the supervisor starts worker 1 again, as for any worker that died, instead of stopping the
    whole gateway as if no start could ever succeed."""
    admin, held = _port_pair()
    sup = gateway_process("--config", str(workers_config(tmp_path, fake_upstream.url)), "--workers", "2",
                          "--admin-port", str(admin))
    try:
        sup.start()
        for _ in range(400):  # worker 1 found its admin port taken
            if "cannot listen" in sup.log_text() or sup.proc is None or sup.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert "cannot listen" in sup.log_text(), sup.log_text()[-2000:]
    finally:
        held.close()
    assert sup.proc is not None
    for _ in range(300):  # started again, it listens
        if sup.proc.poll() is not None:
            break
        try:
            async with http.get(f"http://127.0.0.1:{admin + 1}/healthz") as r:
                if r.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    assert sup.proc.poll() is None, f"the gateway stopped: {sup.log_text()[-2000:]}"
    async with http.get(f"http://127.0.0.1:{admin + 1}/healthz") as r:
        assert r.status == 200
    assert sup.terminate() == 0, sup.log_text()[-3000:]


async def test_workers_whose_log_cannot_open_stop_the_supervisor_and_a_config_error_starts_none(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """README: a worker that cannot start (the log not opened) stops the supervisor with exit status
    1; a config error is found before any worker starts, exit status 2, as for one process."""
    not_a_dir = tmp_path / "shared-log"
    not_a_dir.write_text("a file where the data directory should be\n")
    sup = gateway_process("--config", str(workers_config(tmp_path, fake_upstream.url)), "--workers", "2",
                          "--admin-port", "0")
    with pytest.raises(RuntimeError, match="gateway exited 1"):
        sup.start(timeout=40)
    text = sup.log_text()
    assert "storage error" in text and "could not start" in text, text[-2000:]
    assert text.count("starting it again") <= 2 * (START_TRIES - 1), text[-2000:]
    bad = tmp_path / "bad.yaml"
    bad.write_text(workers_config(tmp_path, fake_upstream.url).read_text() + "bogus: 1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(bad), "--workers", "2", "--admin-port", "0",
        stderr=asyncio.subprocess.PIPE, cwd=REPO, env=tree_env())
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and err.decode().splitlines() == [err.decode().strip()], err
    assert "config error: bogus" in err.decode()


async def test_a_worker_restarted_on_a_config_edited_into_an_error_leaves_the_others_serving(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The config was checked before any worker started. An operator then edits it into an error, and
    a worker dies (the OOM killer): started again, it reads the broken file and exits 2. The worker
    still serving on the config it loaded serves on; the dead one is tried again (later and later)
    with the error in the log, and comes back once the file is mended."""
    cfg = workers_config(tmp_path, fake_upstream.url)
    good = cfg.read_text()
    sup, workers = await two_workers(gateway_process, cfg)
    assert sup.proc is not None
    cfg.write_text(good + "bogus: 1\n")
    os.kill(workers[0], signal.SIGKILL)
    for _ in range(200):  # the restart found the config broken
        if "config error" in sup.log_text() or sup.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert "config error: bogus" in sup.log_text(), sup.log_text()[-2000:]
    await asyncio.sleep(0.5)
    assert sup.proc.poll() is None, f"the gateway stopped over an edited config: {sup.log_text()[-2000:]}"
    assert workers[1] in _children(sup.proc.pid), "the worker serving was stopped"
    async with http.get(f"{sup.url}/threads/{uuid.uuid4()}", timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status in (200, 404), "the gateway serves on"
    cfg.write_text(good)
    for _ in range(200):  # mended: the next try starts it
        if len(_children(sup.proc.pid)) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(_children(sup.proc.pid)) == 2, sup.log_text()[-2000:]
    assert sup.terminate() == 0, sup.log_text()[-3000:]


async def test_a_worker_that_keeps_dying_is_started_again_less_and_less_often(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A crash loop (killed by the OOM killer as soon as it starts, say) backs off: the delay before
    each restart doubles while the worker dies young, instead of a restart every second forever."""
    sup, _ = await two_workers(gateway_process, workers_config(tmp_path, fake_upstream.url))
    assert sup.proc is not None
    pid = sup.proc.pid

    def first_worker() -> int | None:
        for p in _children(pid):
            try:
                if Path(f"/proc/{p}/cmdline").read_bytes().endswith(b"--worker-index\x000\x00"):
                    return p
            except (FileNotFoundError, ProcessLookupError):  # reaped since it was listed (ESRCH mid-read)
                pass
        return None

    for _ in range(3):  # the same worker, each time it is started again
        victim = first_worker()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        for _ in range(400):
            if first_worker() not in (None, victim):
                break
            await asyncio.sleep(0.05)
    delays = [line.rsplit(" in ", 1)[1] for line in sup.log_text().splitlines() if "starting it again in" in line]
    assert delays == ["1.0s", "2.0s", "4.0s"], sup.log_text()[-3000:]
    assert sup.terminate() == 0


async def test_a_worker_that_does_not_stop_is_killed_after_its_grace(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A worker that hangs at shutdown (here: frozen) is killed once its shutdown grace and
    STOP_MARGIN are over, and the supervisor says so (exit 1) instead of waiting forever."""
    cfg = workers_config(tmp_path, fake_upstream.url, "shutdown_grace: 200ms\n")
    sup, workers = await two_workers(gateway_process, cfg)
    assert sup.proc is not None
    frozen, other = workers
    os.kill(frozen, signal.SIGSTOP)
    assert sup.terminate(timeout=30) == 1
    assert _gone(frozen) and _gone(other)
    assert "still running" in sup.log_text(), sup.log_text()[-2000:]


async def test_a_request_waiting_on_a_silent_upstream_holds_a_worker_no_longer_than_its_grace(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: in-flight requests get shutdown_grace to finish. A handler waiting on an upstream that
    never answers was given the grace, then aiohttp's second wait of the same length before it was
    cancelled: the worker ran twice its grace, past the supervisor's margin, and was SIGKILLed
    (the supervisor exits 1). With a 6 s grace the margin (5 s) tells the two apart, no clock needed."""
    cfg = workers_config(tmp_path, fake_upstream.url, "shutdown_grace: 6s\n")
    sup, _workers = await two_workers(gateway_process, cfg)
    fake_upstream.faults.hang = 60  # every API request: accepted, then silence (health checks still pass)
    waiting = asyncio.ensure_future(http.get(f"{sup.url}/assistants/a"))
    for _ in range(200):  # until the request reached the upstream (bounded)
        if ("GET", "/assistants/a") in fake_upstream.requests:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the request never reached the upstream")
    assert await asyncio.get_running_loop().run_in_executor(None, sup.terminate, 30) == 0, sup.log_text()[-3000:]
    assert "still running" not in sup.log_text()
    assert "Traceback" not in sup.log_text() and "Task was destroyed" not in sup.log_text(), sup.log_text()[-3000:]
    with pytest.raises(aiohttp.ClientError):  # cut without an answer: the client retries elsewhere
        (await waiting).release()


async def test_cancel_on_disconnect_asked_on_a_replica_that_does_not_capture_the_run(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, redis_storage: dict[str, Any],
        http: aiohttp.ClientSession) -> None:
    a, b = await two_gateways(make_gateway, fake_upstream, tmp_path, redis_storage)
    async with http.post(f"{a.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{a.url}/threads/{tid}/runs",  # a background run: a captures it, nobody follows
                         json={"assistant_id": "a", "input": {"n": 400, "delay": 0.02}}) as r:
        run_id = (await r.json())["run_id"]
    on_b = await http.get(f"{b.url}/threads/{tid}/runs/{run_id}/stream", params={"cancel_on_disconnect": "true"},
                          headers={"Last-Event-ID": "-1"})
    assert b.gw.hub.live(f"default/run/{run_id}") is None, "b does not capture the run"
    await read_events(on_b, limit=3)
    on_b.close()  # the only client, and it asked for a cancel when it leaves
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted", "cancelled upstream, as on the owning replica"


async def test_a_thread_stream_released_after_linger_on_one_replica_is_captured_again_on_another(
        gateway_process: Any, fake_upstream: FakeAgentServer, shared_storage: dict[str, Any], tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """README: a replica's lease on a stream is released when the stream ends, and a thread stream's
    upstream leg is let go thread_linger after its last client left. A client who then asks another
    replica for the thread stream gets it captured again there, and the thread's next run on it:
    not a stream that stays silent because the first replica still holds a lease it captures nothing under."""
    storage = {**shared_storage, "lease_ttl": "1500ms"}
    cfgs = [replica_config(tmp_path, f"t{i}", fake_upstream.url, storage) for i in range(2)]
    for cfg in cfgs:
        cfg.write_text(cfg.read_text().replace("\nstreams:\n", "\nstreams:\n  thread_linger: 200ms\n"))
    a, b = (gateway_process("--config", str(cfg)).start() for cfg in cfgs)
    tid = await new_thread(http, a.url)
    async with http.get(f"{a.url}/threads/{tid}/stream") as on_a:
        await asyncio.sleep(0.2)
        await read_events(await stream_run(http, a.url, tid, assistant="a", n=2))
        assert len(await read_events(on_a, limit=3)) == 3
    await asyncio.sleep(1.5)  # past the linger: a let go of the thread's upstream leg
    async with http.get(f"{b.url}/threads/{tid}/stream") as on_b:
        await asyncio.sleep(0.3)
        run = await stream_run(http, b.url, tid, assistant="a", n=3)
        await read_events(run)
        got: list[Ev] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while len(customs(got)) < 3:
                    got += await read_events(on_b, limit=1)
    # (A gap marker may come first: what the thread sent while nobody captured it is not known.)
    assert customs(got) == [0, 1, 2], f"the thread's next run reaches its client on the other replica: {got}\n" \
        + logs_of(a, b)


async def test_a_replica_gives_up_its_lease_on_a_stream_when_the_stream_ends(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, redis_storage: dict[str, Any],
        redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    """README: the lease is released when the stream ends, not renewed for the rest of the process's
    life (a lease per stream ever captured, each renewed every third of lease_ttl)."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = redis_storage
    gw = await make_gateway(raw)
    leases = "{%s}:l:*" % redis_storage["redis_prefix"]
    for assistant in ("a", "fail"):  # ended by its last event, or by an error event
        resp = await start_run(http, gw, 3, assistant=assistant)
        await read_events(resp)
    async with http.post(f"{gw.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{gw.url}/threads/{tid}/runs", json={"assistant_id": "a", "input": {"n": 2}}) as r:
        run_id = (await r.json())["run_id"]  # a background run nobody streams
    await fake_upstream.wait_status(run_id, "success")
    held: list[str] = []
    for _ in range(50):
        held = redis_server.command("--scan", "--pattern", leases).split()
        if not held:
            break
        await asyncio.sleep(0.1)
    assert held == [], "leases of streams that ended"
    # README: a stream's keys expire a week after their last write; the id counter never does.
    prefix = "{%s}" % redis_storage["redis_prefix"]
    week_ms = 7 * 24 * 3600 * 1000
    stream_keys = [k for kind in ("s", "m") for k in
                   redis_server.command("--scan", "--pattern", f"{prefix}:{kind}:*").split()]
    assert len(stream_keys) == 6
    for k in stream_keys:
        assert week_ms - 60_000 < int(redis_server.command("PTTL", k)) <= week_ms, k
    assert redis_server.command("PTTL", f"{prefix}:seq") == "-1"


def _free_port_pair() -> int:
    """A loopback port P with P + 1 free too (both bound and let go at once)."""
    for _ in range(200):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two free ports in a row")


async def test_each_worker_has_its_admin_listener_on_admin_port_plus_its_index(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: worker i has its admin listener on admin.port + i."""
    admin = _free_port_pair()
    sup: GatewayProcess = gateway_process("--config", str(workers_config(tmp_path, fake_upstream.url)),
                                          "--workers", "2", "--admin-port", str(admin))
    sup.admin_port = admin
    sup.start()
    assert sup.proc is not None
    for port in (admin, admin + 1):  # the supervisor listens on neither: each is a worker's
        said = ""
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        break
                    said = await r.text()  # not ready until its first upstream health check
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no ready admin listener on {port} ({said})\n{sup.log_text()[-2000:]}")
    workers = _children(sup.proc.pid)
    assert len(workers) == 2
    assert sup.terminate() == 0


@pytest.mark.parametrize("how", ["kill", "term"])
async def test_a_live_follower_waits_no_longer_than_the_readme_says_when_the_capturing_replica_goes(
        replicas: Callable[[int], list[GatewayProcess]], shared_storage: dict[str, Any],
        http: aiohttp.ClientSession, how: str) -> None:
    """README: on a shared LMDB directory another worker takes a SIGKILLed one's live streams over
    within half a lease_ttl; on Redis they pause until the lease runs out (up to lease_ttl) plus the
    next look for expired leases (up to half a lease_ttl). At SIGTERM the leases are released, so
    the next look (half a lease_ttl) finds them on either backend. A client following the run on
    another replica sees its events stop for no longer than that (and a re-join's worth)."""
    ttl = 1.5  # shared_storage's lease_ttl
    bound = 0.5 * ttl if shared_storage["backend"] == "lmdb" or how == "term" else 1.5 * ttl
    a, b = replicas(2)
    resp = await start_run(http, a.url, 400, delay=0.01)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=3)
    async with http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""}) as r:
        got = await read_events(r, limit=5)
        loop = asyncio.get_running_loop()
        last = loop.time()
        if how == "kill":
            a.kill()
            stopped = None
        else:
            stopped = loop.run_in_executor(None, a.terminate)
        resp.close()
        longest = 0.0
        while len(customs(got)) < 400:
            more = await asyncio.wait_for(read_events(r, limit=1), 10)
            if not more:
                break
            got += more
            now = loop.time()
            longest, last = max(longest, now - last), now
    if stopped is not None:
        assert await stopped == 0
    assert_exactly_once(seen + got, 400)
    assert longest <= bound + 0.6, f"the follower waited {longest:.2f}s (README: {bound:g}s and a re-join)\n" \
        + logs_of(a, b)


async def test_the_shared_log_works_over_a_unix_socket_url(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """README: storage.redis_url may be redis://, rediss:// or unix://. A gateway and the operator tools
    on a Redis reached by its Unix socket."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--dir", str(tmp_path), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                             "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        url = f"unix://{sock}?db=0"
        raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
        raw["storage"] = {"backend": "redis", "redis_url": url, "redis_prefix": "u"}
        gw = await make_gateway(raw)
        resp = await start_run(http, gw, 5, delay=0.01)
        seen = await read_events(resp, limit=3)
        rest = await join(http, gw.url + resp.headers["Location"], seen[-1].id)
        assert_exactly_once(seen + rest, 5)
        cfg = tmp_path / "tools.yaml"
        cfg.write_text(f"storage:\n  backend: redis\n  redis_url: '{url}'\n  redis_prefix: u\n")
        checked = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
                                          cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and "checked 1 streams" in checked.stdout, checked.stdout + checked.stderr
    finally:
        proc.kill()
        proc.wait()


async def test_a_stream_that_ended_here_holds_no_lease(
        make_gateway: Callable[..., Any], fake_upstream: FakeAgentServer, redis_server: RedisServer,
        redis_storage: dict[str, Any], tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Runs that ended (cleanly, or interrupted) and a thread stream released after its linger let go
    of their leases: none is renewed once its capture is over. Kept, every stream a replica ever
    captured was renewed every third of a lease for the life of the process, a renewal pipeline
    growing without end, and a released thread stream could be captured by no other replica."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}, storage=redis_storage,
                                           streams={"thread_linger": "200ms"}))
    tid = await new_thread(http, gw)
    thread = await http.get(f"{gw.url}/threads/{tid}/stream")
    await asyncio.sleep(0.2)
    thread.close()  # its capture is released after the linger
    for _ in range(2):
        assert (await read_events(await stream_run(http, gw, tid, assistant="a", n=3)))[-1].event == "custom"
    fake_upstream.faults.cut_after = 2  # a stateless run cannot be re-joined: interrupted
    async with http.post(f"{gw.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01}}) as r:
        assert (await read_events(r))[-1].event == "error"
    await asyncio.sleep(2 * 1.5)  # two leases: one renewed would still be there
    pattern = "{" + redis_storage["redis_prefix"] + "}:l:*"
    held = redis_server.command("--scan", "--pattern", pattern)
    assert held == "", f"leases still held on ended streams: {held.split()}"


async def test_a_follower_count_whose_message_was_dropped_still_holds_off_the_cancel(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory tell each other their follower counts by datagram. One sent while
    the owner's queue was full (its loop busy: here frozen, shorter than its lease) was dropped, and
    the catch-up that follows a drop made up for lost commits only: the owner never learnt that a
    client on the other worker follows the run, and cancelled it upstream when its own client left."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "6s"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    resp = await start_run(http, a.url, 400, delay=0.02, on_disconnect="cancel")
    loc = resp.headers["Location"]
    run_id = (await read_events(resp, limit=10))[0].json["run_id"]  # committed: any worker replays them
    busy = await start_run(http, b.url, 3000, delay=0.001)  # b commits, and tells a, all the time
    a.freeze()
    try:
        await asyncio.sleep(0.5)  # a's queue of datagrams fills up: b's messages to it are dropped
        other = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
        await read_events(other, limit=3)  # b's count of R's followers went out, and was dropped
    finally:
        a.thaw()
    await asyncio.sleep(0.5)  # b's catch-up reaches a
    resp.close()  # the client that asked for cancel leaves; one on the other worker stays
    await asyncio.sleep(1.5)
    try:
        assert fake_upstream.runs[run_id].status == "running", "a follower on another worker is still there"
    finally:
        other.close()
        busy.close()
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted", "the last follower left: cancelled"


async def test_a_follower_gets_the_end_an_owner_committed_but_died_before_telling(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: the owner of a run committed its last events and its end, but
    died (SIGKILL) before its datagram reached the worker a client follows the run on (that one's
    queue was full, so the owner owed it a catch-up it never sent). Nothing is left to take over: the
    run is closed. The follower must catch up once the owner is seen dead, not a heartbeat later."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "3s"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    resp = await start_run(http, a.url, 60, delay=0.01)
    loc = resp.headers["Location"]
    first = await read_events(resp, limit=3)
    follower = await http.get(b.url + loc, headers={"Last-Event-ID": first[-1].id or ""})
    seen = await read_events(follower, limit=1)
    b.freeze()  # its queue of datagrams fills with a's commits; the rest, and the end, are dropped
    try:
        mine = first + await asyncio.wait_for(read_events(resp), 10)  # a committed the end
        a.kill()  # before it could make up for what it dropped
    finally:
        b.thaw()
    t0 = asyncio.get_running_loop().time()
    rest = await asyncio.wait_for(read_events(follower), 20)
    waited = asyncio.get_running_loop().time() - t0
    follower.close()
    assert_exactly_once(first + seen + rest, 60)
    assert first + seen + rest == mine
    assert waited < 5.0, f"the follower waited {waited:.1f}s for what was committed (a heartbeat, not the owner's death)"


async def test_the_follower_counts_of_a_worker_that_stalled_past_its_lease_count_again_when_it_wakes(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: one frozen past lease_ttl (a long GC pause, a VM stopped) is taken
    for dead by the others, who forget its follower counts. When it wakes its clients are still
    there: the captor of a run one of them follows must count them again, not cancel the run when
    its own client (who asked for cancel on disconnect) leaves."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    resp = await start_run(http, a.url, 400, delay=0.02, on_disconnect="cancel")
    loc = resp.headers["Location"]
    run_id = (await read_events(resp, limit=3))[0].json["run_id"]
    other = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    early = await read_events(other, limit=3)
    await asyncio.sleep(0.5)  # a knows b follows it
    b.freeze()
    await asyncio.sleep(2.5)  # past b's lease: a takes b for dead
    b.thaw()
    await asyncio.sleep(1.0)
    resp.close()  # the client that asked for cancel leaves; the one on b is still there
    await asyncio.sleep(1.5)
    try:
        assert fake_upstream.runs[run_id].status == "running", "a follower on the worker that woke is still there"
        rest = await asyncio.wait_for(read_events(other), 20)
    finally:
        other.close()
    assert_exactly_once(early + rest, 400)


@pytest.mark.parametrize("busy", [0.3, 1.5])  # answers the new worker's hello late, or after it stopped waiting
async def test_a_worker_starting_does_not_end_a_thread_stream_another_worker_follows(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        busy: float) -> None:
    """Workers on one LMDB directory: the captor of a thread stream dies and a worker starts (the
    supervisor's restart) while the worker whose client follows the stream is slow to answer its
    hello. The new worker's first look at open streams found nobody following the thread stream
    (the counts had not come yet) and ended it: the client on the other worker got a clean end of a
    stream that has none, and stopped. It must be taken over instead."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "20s"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    tid = await new_thread(http, a)
    on_a = await http.get(f"{a.url}/threads/{tid}/stream")
    on_b = await http.get(f"{b.url}/threads/{tid}/stream")
    try:
        await asyncio.sleep(0.5)  # a captures the thread stream; b's client follows it, and a knows
        a.kill()
        b.freeze()  # busy: the new worker's hello waits in its queue
        try:
            gateway_process("--config", str(replica_config(tmp_path, "c", fake_upstream.url, storage))).start()
            await asyncio.sleep(busy)
        finally:
            b.thaw()
        await asyncio.sleep(0.5)
        async with http.post(f"{fake_upstream.url}/threads/{tid}/runs",  # straight to the upstream
                             json={"assistant_id": "a", "input": {"n": 5, "delay": 0.01}}) as r:
            assert r.status == 200
        got = await asyncio.wait_for(read_events(on_b, limit=3), 10)
        assert got, "the thread stream the client on b follows was ended, not taken over"
        assert [e.event for e in got if e.event != "gap"][:2] == ["metadata", "custom"]
    finally:
        on_a.close()
        on_b.close()



async def test_a_worker_idle_while_another_made_room_evicts_nothing_more(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory share one disk budget. A worker's last commit saw the log over
    it; another worker has since made room (its eviction at a begin). The first one's retention
    sweep went by what it saw last, still over the budget, and removed a finished run the log had
    plenty of room for: a client resuming it found it gone."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "6s",
               "max_bytes": "1MiB"}
    a = gateway_process("--config", str(replica_config(tmp_path, "a", fake_upstream.url,
                                                       {**storage, "sweep_interval": "3s"}))).start()
    started = asyncio.get_running_loop().time()
    b = gateway_process("--config", str(replica_config(tmp_path, "b", fake_upstream.url,
                                                       {**storage, "sweep_interval": "1h"}))).start()
    tid = await new_thread(http, a)
    small = await start_run(http, a.url, 20, delay=0.03)  # a captures a small run that ends last ...
    async with http.post(f"{b.url}/threads/{tid}/runs/stream",  # ... while b captures ~1.6 MB, finished first
                         json={"assistant_id": "a", "input": {"n": 40, "pad": 40_000}}) as r:
        assert len(await read_events(r)) == 41
    mine = await read_events(small)  # a's last commits saw the log over its budget
    small.close()
    later = await start_run(http, b.url, 3)  # b's begin evicts the big run: the log is far under its budget
    await read_events(later)
    later.close()
    await asyncio.sleep(max(0.0, started + 4.0 - asyncio.get_running_loop().time()))  # a's retention sweep ran
    async with http.get(a.url + small.headers["Location"], headers={"Last-Event-ID": "-1"}) as r:
        assert r.status == 200 and "X-Gateway-Resume" not in r.headers, "the finished run is still held"
        assert await read_events(r) == mine



async def test_a_worker_whose_hello_was_dropped_still_learns_its_siblings_counts(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: a worker starting asks its siblings for their follower counts
    (hello) and counts one that has not answered as a possible follower of everything. Its hello to a
    sibling whose queue was full is dropped; the sibling must still be heard from, or the new worker
    never cancels a run whose cancel-on-disconnect client left, nor lets go of a thread stream."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "6s"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    busy = await start_run(http, a.url, 3000, delay=0.001)  # a commits, and tells b, all the time
    b.freeze()
    try:
        await asyncio.sleep(0.5)  # b's queue of datagrams is full
        c = gateway_process("--config", str(replica_config(tmp_path, "c", fake_upstream.url, storage))).start()
        await asyncio.sleep(0.3)  # its hello to b was dropped
    finally:
        b.thaw()
    busy.close()
    resp = await start_run(http, c.url, 400, delay=0.02, on_disconnect="cancel")
    run_id = (await read_events(resp, limit=3))[0].json["run_id"]
    resp.close()  # nobody else follows it, anywhere
    assert await fake_upstream.wait_status(run_id, "interrupted", timeout=8) == "interrupted"


async def test_a_worker_that_only_reads_follows_on_after_another_grew_the_map(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: the captor of a run outgrew the map and grew it. LMDB then
    refuses every transaction of the other processes (MDB_MAP_RESIZED) until they adopt the new
    size, and a worker that only serves followers never writes, where that was done: its followers
    were cut and every request that reads the log failed, for good."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "6s",
               "map_size": "2MiB", "max_bytes": "512KiB"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    tid = await new_thread(http, a)
    resp = await http.post(f"{a.url}/threads/{tid}/runs/stream",  # ~4 MB: the map grows twice
                           json={"assistant_id": "a", "input": {"n": 100, "delay": 0.01, "pad": 40_000}})
    loc = resp.headers["Location"]
    follower = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    mine = await asyncio.wait_for(read_events(resp), 20)
    resp.close()
    assert customs(mine) == list(range(100))
    try:
        got, cut = await asyncio.wait_for(read_until_cut(follower), 20)
    finally:
        follower.close()
    assert not cut and got == mine, "b's follower got the run whole"
    assert await join(http, b.url + loc, "-1") == mine, "and b serves it whole after"


async def test_two_replicas_asked_at_once_for_a_stream_the_upstream_refuses_both_relay_its_answer(
        replicas: Callable[[int], list[GatewayProcess]], fake_upstream: FakeAgentServer,
        http: aiohttp.ClientSession) -> None:
    """Two clients join the same thread stream at once on two replicas (workers), and the upstream
    refuses it (404 here). One replica claims the stream and relays the refusal; the other, which
    lost the claim, waited for a capture that never began, then answered 500 five seconds later."""
    a, b = replicas(2)
    for _ in range(3):
        tid = await new_thread(http, a)
        fake_upstream.faults.status = 404  # the upstream no longer knows the thread
        started = asyncio.get_running_loop().time()

        async def join_on(replica: GatewayProcess) -> int:
            async with http.get(f"{replica.url}/threads/{tid}/stream") as r:
                return r.status

        assert list(await asyncio.gather(join_on(a), join_on(b))) == [404, 404], "the upstream's answer, on both"
        assert asyncio.get_running_loop().time() - started < 2.0
        fake_upstream.faults.status = 0


async def test_a_worker_killed_mid_read_does_not_pin_the_log_for_good(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: one SIGKILLed inside a read transaction leaves its slot in
    LMDB's reader table, holding the snapshot it read. LMDB never reuses a page freed after it, and
    clears such a slot only when a process asks it to (or when every process has closed the file):
    the other workers never did, so the file grew by every commit's copied pages, for good."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"}
    a = gateway_process("--config", str(replica_config(tmp_path, "a", fake_upstream.url, storage))).start()
    reader = subprocess.Popen(  # a worker in the middle of a read when it is killed
        [sys.executable, "-c", "import lmdb, sys, time\n"
         f"txn = lmdb.open({str(tmp_path / 'shared-log')!r}, max_dbs=4).begin()\n"
         "print('reading', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"reading\n"
    finally:
        reader.kill()
        reader.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    await asyncio.sleep(1.0)  # a beat of the live worker
    data = tmp_path / "shared-log" / "data.mdb"
    before = data.stat().st_size
    for _ in range(3):
        resp = await start_run(http, a.url, 300, delay=0.002)  # a commit every few events: pages copied each time
        assert customs(await read_events(resp)) == list(range(300))
        resp.close()
    grown = data.stat().st_size - before
    assert grown < 2 << 20, f"the file grew by {grown} bytes for ~100 KB of events"


def _worker(sup_pid: int, index: int) -> int | None:
    """The supervisor's running worker of that index, if any."""
    for p in _children(sup_pid):
        try:
            if Path(f"/proc/{p}/cmdline").read_bytes().endswith(b"--worker-index\x00%d\x00" % index):
                return p
        except (FileNotFoundError, ProcessLookupError):
            pass
    return None


@pytest.mark.parametrize("kill_at", [0, 2, 10, 40, 100, 149])
async def test_a_worker_killed_while_it_captures_leaves_every_follower_whole_or_told(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        kill_at: int) -> None:
    """Runs captured by both workers, each followed by clients on either; one worker is SIGKILLed
    after ``kill_at`` events of the runs (swept) and started again by the supervisor. Every client,
    reconnecting with its last id as an SDK does, gets every event once, or a gap marker where
    some are missing, and the end: never silence."""
    sup, _ = await two_workers(gateway_process, workers_config(tmp_path, fake_upstream.url))
    assert sup.proc is not None
    n = 150
    starts = [await start_run(http, sup.url, n, delay=0.02) for _ in range(6)]
    locs = [r.headers["Location"] for r in starts]
    clients = [asyncio.create_task(follow_to_end(http, sup.url + loc, first=r, timeout=90))
               for loc, r in zip(locs, starts)]
    clients += [asyncio.create_task(follow_to_end(http, sup.url + loc, timeout=90)) for loc in locs for _ in range(2)]
    for _ in range(400):
        if max(len(r.events) for r in fake_upstream.runs.values()) >= kill_at:
            break
        await asyncio.sleep(0.01)
    victim = _worker(sup.proc.pid, 0)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    try:
        for c in clients:
            assert_whole_or_marked(await c, n)
    except (AssertionError, asyncio.TimeoutError) as exc:
        raise AssertionError(f"{exc!r}\n{sup.log_text()[-6000:]}") from exc
    finally:
        for c in clients:
            c.cancel()
    assert sup.terminate() == 0, sup.log_text()[-3000:]


async def _logged(proc: GatewayProcess, text: str) -> None:
    """Until ``proc`` has logged ``text`` (bounded: 30 s)."""
    for _ in range(600):
        if text in proc.log_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never logged {text!r}:\n{proc.log_text()[-4000:]}")


async def test_a_stream_taken_back_after_a_failed_commit_here_is_captured_over_the_budget(
        gateway_process: Any, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """b's commit of a run fails (full disk), b stalls and a takes the run over; b wakes having lost
    it; a dies and b takes it over again, the log now over its budget. b's writer still refused
    the run's writes for the failed commit of its first capture (only a begin cleared that, and a
    takeover does not begin; over the budget a begin is refused): its client heard nothing more,
    the run's end included, while b retried a begin every second for ever."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(small_fs / "log"), "lease_ttl": "1500ms",
               "max_bytes": "256KiB", "map_size": "16MiB"}
    a = gateway_process("--config", str(replica_config(tmp_path, "a", fake_upstream.url, storage))).start()
    b = gateway_process("--config", str(replica_config(tmp_path, "b", fake_upstream.url, storage))).start()
    tid = await new_thread(http, b.url)
    n = 600
    resp = await http.post(f"{b.url}/threads/{tid}/runs/stream", json={
        "assistant_id": "a", "input": {"n": n, "delay": 0.02, "pad": 20000}})  # 12 MB: over the budget
    assert resp.status == 200
    loc = resp.headers["Location"]
    await read_events(resp, limit=5)
    resp.close()
    filler = fill(small_fs, leave=256 << 10)
    await _logged(b, "capture resumes when storage does")  # b's commit of the run failed
    b.freeze()
    filler.unlink()
    await _logged(a, "taking over")
    b.thaw()
    await _logged(b, "was lost")
    a.kill()
    await _logged(b, "taking over")
    try:
        assert_whole_or_marked(await follow_to_end(http, b.url + loc, timeout=60), n)
    except (AssertionError, asyncio.TimeoutError) as exc:
        raise AssertionError(f"{exc!r}\n{logs_of(a, b, lines=40)}") from exc


@pytest.mark.parametrize("lag", [0.0, 0.002, 0.005, 0.01, 0.02])
async def test_a_cancel_on_disconnect_asked_while_another_replica_opens_the_run_is_kept(
        replicas: Callable[[int], list[GatewayProcess]], fake_upstream: FakeAgentServer,
        http: aiohttp.ClientSession, lag: float) -> None:
    """A run the log does not hold yet (created upstream directly, by another client of the Agent
    Server) is joined on two replicas (workers) at once: on a without cancel_on_disconnect, on b with
    it. When a opens the run's leg first, b follows what a captures, and its client's cancel request
    was dropped on that path: both clients left and the run went on upstream. Swept over the lag
    between the two joins, so either replica may be the one that opens it."""
    a, b = replicas(2)
    async with http.post(f"{fake_upstream.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{fake_upstream.url}/threads/{tid}/runs",
                         json={"assistant_id": "a", "input": {"n": 1000, "delay": 0.02}}) as r:
        run_id = (await r.json())["run_id"]
    loc = f"/threads/{tid}/runs/{run_id}/stream"

    async def on_a() -> aiohttp.ClientResponse:
        return await http.get(a.url + loc, headers={"Last-Event-ID": "-1"})

    async def on_b() -> aiohttp.ClientResponse:
        await asyncio.sleep(lag)
        return await http.get(b.url + loc, params={"cancel_on_disconnect": "true"}, headers={"Last-Event-ID": "-1"})

    plain, asking = await asyncio.gather(on_a(), on_b())
    assert plain.status == 200 and asking.status == 200
    await read_events(plain, limit=2)
    plain.close()  # the client that asked for nothing leaves first
    await read_events(asking, limit=3)
    asking.close()  # the last client anywhere, and it asked for a cancel when it leaves
    assert await fake_upstream.wait_status(run_id, "interrupted", timeout=8) == "interrupted", logs_of(a, b)


async def test_a_cancel_asked_on_the_worker_that_then_takes_the_run_over_is_kept(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Workers on one LMDB directory: a captures a background run, and stalls (SIGSTOP). A client joins
    the run on b asking for a cancel on disconnect: b tells a (a datagram a does not read while frozen)
    and keeps the client's credentials to cancel it itself. Then b takes the run over from the stalled a.
    When the client leaves, b, now its captor, looked only at the capture's own flag (which a never
    wrote): the cancel the client asked for was dropped, and the run went on upstream."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"}
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
            for name in ("a", "b"))
    tid = await new_thread(http, a)
    async with http.post(f"{a.url}/threads/{tid}/runs",  # a background run: a captures it, nobody follows
                         json={"assistant_id": "a", "input": {"n": 1000, "delay": 0.02}}) as r:
        run_id = (await r.json())["run_id"]
    key = f"default/run/{run_id}"
    asking = await http.get(f"{b.url}/threads/{tid}/runs/{run_id}/stream", headers={"Last-Event-ID": "-1"})
    await read_events(asking, limit=2)
    asking.close()  # (a plain follower first: b knows the run is a's)
    a.freeze()
    try:
        asking = await http.get(f"{b.url}/threads/{tid}/runs/{run_id}/stream",
                                params={"cancel_on_disconnect": "true"}, headers={"Last-Event-ID": "-1"})
        assert asking.status == 200
        for _ in range(300):  # a's lease runs out: b takes the run over
            async with http.get(f"http://127.0.0.1:{b.admin_port}/streams/{key}") as r:
                if (await r.json()).get("captured_here"):
                    break
            await asyncio.sleep(0.05)
        async with http.get(f"http://127.0.0.1:{b.admin_port}/streams/{key}") as r:
            assert (await r.json()).get("captured_here"), logs_of(a, b)
        await read_events(asking, limit=3)
        asking.close()  # the only client, and it asked for a cancel when it leaves
        assert await fake_upstream.wait_status(run_id, "interrupted", timeout=8) == "interrupted", logs_of(a, b)
    finally:
        a.thaw()


async def test_a_cancel_asked_while_the_captor_stalls_waits_for_a_follower_on_a_third_worker(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Three workers on one LMDB directory: a captures a background run and stalls (SIGSTOP); a
    client on c follows the run, a client on b asked for a cancel on disconnect (b's note of it to a
    goes unread). b's client leaves while c's still follows: b left the cancel to the captor, and the
    captor is whichever of b and c took the run over from a, without the note. When c's client
    leaves, nobody follows the run anywhere, and it went on upstream."""
    storage = {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"}
    a, b, c = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, storage))).start()
               for name in ("a", "b", "c"))
    tid = await new_thread(http, a)
    async with http.post(f"{a.url}/threads/{tid}/runs",  # a background run: a captures it, nobody follows
                         json={"assistant_id": "a", "input": {"n": 1000, "delay": 0.02}}) as r:
        run_id = (await r.json())["run_id"]
    key = f"default/run/{run_id}"
    loc = f"/threads/{tid}/runs/{run_id}/stream"
    on_c = await http.get(c.url + loc, headers={"Last-Event-ID": "-1"})
    await read_events(on_c, limit=2)
    a.freeze()
    try:
        asking = await http.get(b.url + loc, params={"cancel_on_disconnect": "true"}, headers={"Last-Event-ID": "-1"})
        await read_events(asking, limit=2)
        asking.close()  # it asked for a cancel; c's client still follows
        captor = None
        for _ in range(300):  # a's lease runs out: b or c takes the run over
            for w in (b, c):
                async with http.get(f"http://127.0.0.1:{w.admin_port}/streams/{key}") as r:
                    if (await r.json()).get("captured_here"):
                        captor = w
            if captor is not None:
                break
            await asyncio.sleep(0.05)
        assert captor is not None, logs_of(a, b, c)
        await read_events(on_c, limit=3)
        assert fake_upstream.runs[run_id].status == "running", "c's client still follows it"
        on_c.close()  # the last follower anywhere
        assert await fake_upstream.wait_status(run_id, "interrupted", timeout=8) == "interrupted", logs_of(a, b, c)
    finally:
        a.thaw()
