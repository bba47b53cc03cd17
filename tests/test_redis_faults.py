"""The shared log when Redis fails under it: outages of every length, connections dropped at random
points of the commit path, and Redis losing its data. Real redis-server processes (AOF, fsync
always), real sockets; every client's view and every ``-1`` replay is checked for the promise:
each event exactly once, or a gap marker where events are missing, never a silent hole or a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Literal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.eventlog.redis import _APPEND
from tests.conftest import REPO, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.langgraph_server import LangGraphServer
from tests.support.invariants import assert_exactly_once, assert_whole_or_marked, follow_to_end
from tests.support.procs import tree_env
from tests.support.redis_server import RedisServer
from tests.support.sse import Ev, read_events, read_until_cut
from tests.support.tcp_relay import TcpRelay
from tests.support.runs import join, new_thread, start_run, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]

# Outage lengths swept (seconds): shorter than a commit's retries, about as long, and longer
# than the lease, so every path back (retry, storage recovery, takeover) is taken.
OUTAGES = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]


async def _gateway_on(make_gateway: MakeGateway, upstream: FakeAgentServer | LangGraphServer, tmp_path: Path,
                      redis_url: str, prefix: str, name: str = "gw") -> RunningGateway:
    raw = gateway_config(tmp_path / name, {"default": {"urls": [upstream.url]}}, streams={"reattach_backoff": "100ms"})
    raw["storage"] = {"backend": "redis", "redis_url": redis_url, "redis_prefix": prefix, "lease_ttl": "1500ms"}
    return await make_gateway(raw)


@pytest.fixture
def redises() -> Iterator[list[RedisServer]]:
    """Redis servers a test starts itself; listed before ``make_gateway``, they stop after its gateways."""
    started: list[RedisServer] = []
    yield started
    for server in started:
        server.cleanup()


async def _one_outage(make_gateway: MakeGateway, upstream: FakeAgentServer | LangGraphServer, tmp_path: Path,
                      http: aiohttp.ClientSession, redises: list[RedisServer], outage: float,
                      how: Literal["term", "kill"]) -> tuple[list[Ev], list[Ev]]:
    redis = RedisServer()
    redises.append(redis)
    await asyncio.to_thread(redis.start)
    gw = await _gateway_on(make_gateway, upstream, tmp_path, redis.url, "o", f"gw-{how}-{outage}")
    resp = await start_run(http, gw, 140, delay=0.05, stream_mode=["custom"],
                           assistant="ticker" if isinstance(upstream, LangGraphServer) else "a")
    url = gw.url + resp.headers["Location"]
    reader = asyncio.create_task(follow_to_end(http, url, resp))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(redis.stop if how == "term" else redis.kill)
    await asyncio.sleep(outage)
    await asyncio.to_thread(redis.start)  # from its AOF, on the same port
    live = await reader
    replay = await asyncio.wait_for(join(http, url, "-1"), 30)
    return live, replay


@pytest.mark.parametrize("how", ["term", "kill"])
async def test_a_redis_outage_of_any_length_leaves_no_silent_hole(
        redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        how: Literal["term", "kill"]) -> None:
    # One gateway and one Redis per outage length, all at once (the runs are independent).
    results = await asyncio.gather(*(_one_outage(make_gateway, fake_upstream, tmp_path, http, redises, outage, how)
                                     for outage in OUTAGES))
    for outage, (live, replay) in zip(OUTAGES, results):
        missing = assert_whole_or_marked(live, 140)
        assert replay == live, f"outage {outage}s: the -1 replay is what the live client got"
        # The upstream keeps a replay buffer, so the re-join recovers everything: nothing to mark.
        assert missing == [], f"outage {outage}s: customs {missing} missing"


async def test_a_redis_outage_in_front_of_the_real_server_leaves_no_silent_hole(
        redises: list[RedisServer], make_gateway: MakeGateway, langgraph_server: LangGraphServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """The sweep's worst lengths once more, in front of a real ``langgraph dev`` (where the issue
    first showed): one event went missing, unmarked, in every run."""
    cases: list[tuple[float, Literal["term", "kill"]]] = [(1.5, "kill"), (2.0, "term"), (2.5, "kill"), (3.0, "term")]
    results = await asyncio.gather(*(_one_outage(make_gateway, langgraph_server, tmp_path, http, redises, outage, how)
                                     for outage, how in cases))
    for (outage, how), (live, replay) in zip(cases, results):
        assert assert_whole_or_marked(live, 140) == [], f"{how} for {outage}s: nothing missing"
        assert replay == live, f"{how} for {outage}s: the -1 replay is what the live client got"


async def _start_through_chaos(http: aiohttp.ClientSession, gw: RunningGateway) -> aiohttp.ClientResponse:
    """Start a run of 100 events. Redis may fail the capture's begin through every retry (each
    connection lives 10-100 ms here): the gateway then refuses the start cleanly (503, said, the run
    cancelled upstream, or refused before one is created while the log says it fails), and the client
    starts again, as a client would."""
    for _ in range(5):
        tid = await new_thread(http, gw)
        resp = await stream_run(http, gw, tid, assistant="a", n=100, delay=0.02)
        if resp.status == 200:
            return resp
        detail = (await resp.json())["detail"]
        # Either refusal is clean: the capture's begin failed (the run cancelled upstream), or the log
        # had already said it was failing and the start was refused before any run was created.
        assert resp.status == 503 and (("could not capture" in detail and "cancelled upstream" in detail)
                                       or "new captures are refused" in detail), detail
    raise AssertionError("five starts in a row refused")


async def test_redis_connections_dropped_at_random_lose_and_repeat_nothing(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Two replicas whose every Redis connection is reset every 10-100 ms, and one script call in five
    runs but loses its reply:
    four runs through one replica, each followed from the other; what every client got, and
    every replay, is each event exactly once or marked."""
    relay = await TcpRelay("127.0.0.1", own_redis.port, rng=random.Random(7), lose_replies_to=b"EVALSHA",
                           lose_share=0.2).start()
    gateways: list[RunningGateway] = []
    try:
        url = f"redis://127.0.0.1:{relay.port}/0"
        a = await _gateway_on(make_gateway, fake_upstream, tmp_path, url, "chaos", "a")
        b = await _gateway_on(make_gateway, fake_upstream, tmp_path, url, "chaos", "b")
        gateways += [a, b]
        relay.chaos(random.Random(8), (0.01, 0.1))
        starts = [await _start_through_chaos(http, a) for _ in range(4)]
        locs = [r.headers["Location"] for r in starts]
        views = await asyncio.gather(*(follow_to_end(http, a.url + loc, r) for loc, r in zip(locs, starts)),
                                     *(follow_to_end(http, b.url + loc) for loc in locs))
        await relay.calm()
        assert relay.cuts >= 10 and relay.lost_replies >= 10, "the relay really dropped connections and replies"
        for loc, view in zip(locs + locs, views):
            assert_whole_or_marked(view, 100)
            replay = await join(http, b.url + loc, "-1")
            assert replay == await join(http, a.url + loc, "-1"), "one log: both replicas replay the same"
            assert [e for e in replay if e in view] == view, "what a client got is in the log, in order"
            assert_exactly_once(replay, 100)
    finally:
        # The gateways stop (release their leases, close their connections) while the relay still
        # carries them: stopped behind a closed relay, each retried into it for seconds.
        # (make_gateway's own stop at teardown then finds them stopped.)
        await relay.calm()
        for gw in gateways:
            await gw.server.stop()
        await relay.stop()


@pytest.mark.parametrize("flush_after", [5, 28])
async def test_redis_losing_its_data_cuts_followers_on_every_replica_instead_of_repeating_the_run(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession, flush_after: int) -> None:
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "flush", "a")
    b = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "flush", "b")
    resp = await start_run(http, a, 150, delay=0.02)
    loc = resp.headers["Location"]
    on_b = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    seen_b = await read_events(on_b, limit=flush_after + 1)  # metadata and flush_after customs
    seen_a = await read_events(resp, limit=flush_after + 1)
    own_redis.command("FLUSHALL")
    for seen, r in ((seen_a, resp), (seen_b, on_b)):
        more, cut = await asyncio.wait_for(read_until_cut(r), 30)
        r.close()
        assert cut, "the ids this client holds are gone with the log: it is cut, not fed the run again"
        customs = [e.json["i"] for e in seen + more if e.event == "custom"]
        assert customs == sorted(set(customs)), "nothing repeated before the cut"
        async with http.get(b.url + loc, headers={"Last-Event-ID": (seen + more)[-1].id or ""}) as again:
            assert again.status == 200 and again.headers["X-Gateway-Resume"] == "not-held"


async def test_a_follower_on_another_replica_gets_the_error_event_an_interrupted_run_ends_with(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, redis_storage: dict[str, Any],
        http: aiohttp.ClientSession) -> None:
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, redis_storage["redis_url"],
                          redis_storage["redis_prefix"], "a")
    b = await _gateway_on(make_gateway, fake_upstream, tmp_path, redis_storage["redis_url"],
                          redis_storage["redis_prefix"], "b")
    fake_upstream.faults.cut_after = 10  # the capture's leg breaks after 10 events ...
    resp = await start_run(http, a, 100, delay=0.02)
    loc = resp.headers["Location"]
    on_b = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    await read_events(on_b, limit=3)
    fake_upstream.faults.status = 404  # ... and its re-join is refused: the run ends interrupted
    rest, cut = await asyncio.wait_for(read_until_cut(on_b), 30)
    on_b.close()
    resp.close()
    fake_upstream.faults.status = 0
    assert not cut and rest and rest[-1].event == "error", "a remote follower ends as the log does"
    assert rest[-1].json["error"] == "CaptureInterrupted"
    replay = await join(http, b.url + loc, "-1")
    assert replay[-1] == rest[-1]


async def test_redis_refusing_writes_at_maxmemory_is_a_storage_failure_readiness_and_metrics_say(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Redis reached maxmemory (noeviction): it answers every write with an OOM error, as a full disk
    would refuse them. Readiness and the failing gauge say so, new runs are refused before they reach
    the upstream, and once memory is free the live run goes on: every event exactly once."""
    gw = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "oom")
    resp = await start_run(http, gw, 150, delay=0.02)
    url = gw.url + resp.headers["Location"]
    seen = await read_events(resp, limit=20)
    own_redis.command("CONFIG", "SET", "maxmemory", "1000")  # far below what it holds: every write refused
    reader = asyncio.create_task(follow_to_end(http, url, resp, seen))
    ready = 200
    for _ in range(100):
        async with http.get(gw.admin_url + "/readyz") as r:
            ready, body = r.status, await r.json()
        if ready == 503:
            break
        await asyncio.sleep(0.1)
    async with http.get(gw.admin_url + "/metrics") as r:
        failing = [line for line in (await r.text()).splitlines() if line.startswith("gateway_storage_failing ")]
    tid = await new_thread(http, gw)
    fake_upstream.requests.clear()
    refused = await stream_run(http, gw, tid, assistant="a", n=3)
    detail = (await refused.json())["detail"]
    created = [p for m, p in fake_upstream.requests if m == "POST" and p.endswith("/runs/stream")]
    own_redis.command("CONFIG", "SET", "maxmemory", "0")
    got = await reader
    assert ready == 503 and "maxmemory" in body["storage"], "readiness says storage fails"
    assert failing == ["gateway_storage_failing 1.0"]
    assert refused.status == 503 and "storage is failing" in detail and created == [], \
        f"a new run is refused before it reaches the upstream: {refused.status} {detail}, upstream saw {created}"
    assert_exactly_once(got, 150)
    assert await join(http, url, "-1") == got


async def test_redis_settings_that_break_the_logs_promises_are_refused_at_start_and_unreadable_ones_warned(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """README: with durability fsync Redis must run appendonly yes and appendfsync always, with
    none appendfsync everysec is accepted, maxmemory-policy must be noeviction; the gateway checks
    at start and refuses otherwise, and where CONFIG GET is forbidden it warns and goes on."""
    cfg = tmp_path / "gw.yaml"

    def start(durability: str, url: str = own_redis.url) -> subprocess.CompletedProcess[str]:
        cfg.write_text(f"upstreams: {{default: {{urls: ['{fake_upstream.url}']}}}}\n"
                       f"listen: {{port: 0}}\nadmin: {{port: 0}}\n"
                       f"storage: {{backend: redis, redis_url: '{url}', durability: {durability}}}\n")
        return subprocess.run([sys.executable, "-m", "gateway", "--config", str(cfg)], cwd=REPO, env=tree_env(),
                              capture_output=True, text=True, timeout=30)

    own_redis.command("CONFIG", "SET", "appendfsync", "everysec")
    refused = await asyncio.to_thread(start, "fsync")
    assert refused.returncode == 1 and "appendfsync" in refused.stderr, refused.stderr[-2000:]
    raw = gateway_config(tmp_path / "none", {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "none", "durability": "none"}
    await make_gateway(raw)  # durability none accepts everysec
    own_redis.command("CONFIG", "SET", "appendfsync", "always")
    own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    evicting = await asyncio.to_thread(start, "fsync")
    assert evicting.returncode == 1 and "noeviction" in evicting.stderr, evicting.stderr[-2000:]
    # A managed service that forbids CONFIG: a warning naming what could not be verified, and it starts.
    own_redis.command("ACL", "SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all", "-config")
    raw = gateway_config(tmp_path / "acl", {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = {"backend": "redis", "redis_url": f"redis://gw:pw@127.0.0.1:{own_redis.port}/0",
                      "redis_prefix": "acl"}
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await make_gateway(raw)
    warned = [r.getMessage() for r in caplog.records if "cannot verify" in r.getMessage()]
    assert warned and all(w in warned[0] for w in ("appendfsync", "noeviction")), caplog.text[-2000:]


async def _storage_says(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, float, float]:
    """What an operator sees of storage: readiness, ``gateway_storage_failing`` and
    ``gateway_log_commit_errors_total``."""
    async with http.get(gw.admin_url + "/readyz") as r:
        ready = r.status
    async with http.get(gw.admin_url + "/metrics") as r:
        samples = {s.name: s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples}
    return ready, samples["gateway_storage_failing"], samples["gateway_log_commit_errors_total"]


async def _idle_then(make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
                     own_redis: RedisServer, http: aiohttp.ClientSession, fault: str,
                     name: str) -> tuple[RunningGateway, str]:
    """A gateway on ``own_redis`` that ran one stream and is idle, storage sound; then Redis
    ``stopped`` or at maxmemory (``fault``). The gateway and its thread."""
    gw = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, name)
    tid = await new_thread(http, gw)
    await read_events(await stream_run(http, gw, tid, assistant="a", n=3))
    assert await _storage_says(http, gw) == (200, 0.0, 0.0)
    if fault == "stopped":
        await asyncio.to_thread(own_redis.stop)
    else:
        own_redis.command("CONFIG", "SET", "maxmemory", "1000")
    return gw, tid


@pytest.mark.parametrize("fault", ["stopped", "maxmemory"])
async def test_redis_refusing_a_new_run_while_no_stream_is_live_is_a_storage_failure_metrics_say(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession, fault: str) -> None:
    """Redis is down (or at maxmemory) while nothing is being captured: the first thing to write is a
    new run's claim and begin, and the run is refused with 503. That is storage failing as much as a
    failed append: readiness, the failing gauge and the failed-commit count (what the alerts read)
    say so, and clear once Redis takes writes again, with no stream live to notice it."""
    gw, tid = await _idle_then(make_gateway, fake_upstream, tmp_path, own_redis, http, fault, "idle")
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 3}}) as r:
        assert r.status == 503, await r.text()
    ready, failing, errors = await _storage_says(http, gw)
    assert (ready, failing) == (503, 1.0) and errors >= 1, (ready, failing, errors)
    if fault == "stopped":
        await asyncio.to_thread(own_redis.start)
    else:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    for _ in range(50):  # the gateway probes Redis every second
        ready, failing, _errors = await _storage_says(http, gw)
        if ready == 200:
            break
        await asyncio.sleep(0.1)
    assert (ready, failing) == (200, 0.0)
    assert [e.event for e in await read_events(await stream_run(http, gw, tid, assistant="a", n=2))][-2:] == [
        "custom", "custom"]


async def test_a_redis_outage_past_the_lease_counts_each_gap_marker_the_log_holds_once(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Redis is killed for longer than the lease under a live run whose upstream cannot replay (no
    ids): the capture re-joins after storage comes back, and again after it finds its lease gone
    and takes its own stream over. ``gateway_gap_markers_total`` counts the markers clients were
    sent and the log holds, not markers made for a re-join whose batch the log then refused."""
    gw = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "gaps")
    fake_upstream.behaviour.ignore_resumable = True
    resp = await start_run(http, gw, 140, delay=0.05)
    url = gw.url + resp.headers["Location"]
    reader = asyncio.create_task(follow_to_end(http, url, resp))
    await asyncio.sleep(1.5)
    await asyncio.to_thread(own_redis.kill)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(own_redis.start)
    live = await reader
    replay = await join(http, url, "-1")
    async with http.get(gw.admin_url + "/metrics") as r:
        counted = {s.labels["reason"]: s.value for f in text_string_to_metric_families(await r.text())
                   for s in f.samples if s.name == "gateway_gap_markers_total"}
    held = [e.json["reason"] for e in replay if e.event == "gap"]
    assert held and [e.json["reason"] for e in live if e.event == "gap"] == held
    assert counted == {reason: float(held.count(reason)) for reason in counted}, (counted, held)


async def test_a_stateless_run_interrupted_while_redis_is_down_ends_with_its_error_event_once_redis_is_back(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """A stateless run's upstream stalls (read timeout) while Redis is down: the gateway cannot
    re-join it, and cannot write its CaptureInterrupted end either (its last append failed), so it
    stays open. Once Redis is back the stream is taken over and ended with that error event: not
    left open with every reconnecting client cut, over and over; and it is counted once, as the log
    holds one end, not once per try to write it."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "read_timeout": "1s"}})
    raw["storage"] = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "stall", "lease_ttl": "1500ms"}
    gw = await make_gateway(raw)
    fake_upstream.faults.stall_after = 3
    resp = await http.post(f"{gw.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01}})
    assert resp.status == 200
    loc = resp.headers["Location"]
    await read_events(resp, limit=3)  # the three events before the stall, committed
    await asyncio.to_thread(own_redis.kill)
    await asyncio.sleep(4.0)  # the leg times out meanwhile: interrupted, with nowhere to write it
    resp.close()
    await asyncio.to_thread(own_redis.start)
    replay: list[Ev] = []
    for _ in range(50):  # until the stream is taken over and ended (lease 1.5 s)
        try:
            async with http.get(gw.url + loc, headers={"Last-Event-ID": "-1"}) as r:
                # 503 until the log's probe (every second) sees Redis back: the capture's failed
                # commit was answered, so it no longer waits on it; asked again meanwhile.
                assert r.status in (200, 503), await r.text()
                replay = await read_events(r) if r.status == 200 else []
        except aiohttp.ClientPayloadError:  # cut: the capture stopped here before the end
            replay = []
        if replay and replay[-1].event == "error":
            break
        await asyncio.sleep(0.1)
    ends = [e for e in replay if e.event == "error"]
    assert len(ends) == 1 and ends[0].json["error"] == "CaptureInterrupted", [e.event for e in replay]
    await asyncio.sleep(1.0)  # another takeover sweep
    async with http.get(gw.admin_url + "/metrics") as r:
        counted = [s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                   if s.name == "gateway_streams_interrupted_total"]
    assert counted == [1.0], "streams ended with CaptureInterrupted: one, not one per try to write its end"


async def test_a_redis_outage_past_the_lease_counts_a_lost_lease_per_live_capture_only(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Three runs ended, one live, then Redis is killed for longer than the lease: gateway_leases_lost_total
    (GatewayLeasesLost) counts the one live capture at most, never one for every stream this process
    ever captured (their leases were kept and renewed after they ended: it said four). Whether the live
    one counts is a race this test does not judge: its renewal may find the lease gone once Redis is
    back (one), or its capture, cut by a commit refused during the outage, may claim it again first
    when storage is back (none: nothing went to another replica)."""
    gw = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "lost")
    tid = await new_thread(http, gw)
    for _ in range(3):
        await read_events(await stream_run(http, gw, tid, assistant="a", n=3))
    resp = await start_run(http, gw, 140, delay=0.05)
    reader = asyncio.create_task(follow_to_end(http, gw.url + resp.headers["Location"], resp))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(own_redis.kill)
    await asyncio.sleep(2.5)
    await asyncio.to_thread(own_redis.start)
    assert_exactly_once(await reader, 140)
    async with http.get(gw.admin_url + "/metrics") as r:
        lost = sum(s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                   if s.name == "gateway_leases_lost_total")
    assert lost in (0, 1), f"{lost} leases counted lost for one live capture"


@pytest.mark.parametrize("fault", ["stopped", "maxmemory"])
async def test_redis_failing_while_the_gateway_is_idle_is_said_by_readiness_before_any_client_is_refused(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession, fault: str) -> None:
    """README: /readyz is 200 only while "storage takes writes". With nothing being captured the
    gateway still writes to Redis (its replica heartbeat, every third of the lease): when Redis is
    down or refuses writes, readiness and ``gateway_storage_failing`` say so from that write on, so
    the load balancer and GatewayStorageFailing hear of it before the first new run is refused
    with 503, not only after. No commit failed, so no failed commit is counted; once Redis takes
    writes again the gateway is ready again by itself."""
    gw, tid = await _idle_then(make_gateway, fake_upstream, tmp_path, own_redis, http, fault, "idle-ready")
    said = (200, 0.0, 0.0)
    for _ in range(60):  # the heartbeat writes every 0.5 s (lease_ttl 1.5 s): bounded at 6 s
        said = await _storage_says(http, gw)
        if said[0] == 503:
            break
        await asyncio.sleep(0.1)
    assert said == (503, 1.0, 0.0), f"(readyz, storage_failing, commit errors) with Redis {fault}: {said}"
    if fault == "stopped":
        await asyncio.to_thread(own_redis.start)
    else:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    for _ in range(60):  # the gateway probes Redis every second
        said = await _storage_says(http, gw)
        if said[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert said == (200, 0.0, 0.0)


async def _follow_noting_resumes(http: aiohttp.ClientSession, url: str, first: aiohttp.ClientResponse,
                                 got: list[Ev]) -> list[tuple[str, int]]:
    """As ``follow_to_end``, into ``got``: each reconnect's ``X-Gateway-Resume`` with the number of
    events the client had then."""
    resumes: list[tuple[str, int]] = []
    got[:] = await follow_to_end(http, url, first, got, resumes=resumes)
    return resumes


# (events a client gets after the snapshot, seconds Redis stays down): back at once, or after the
# capture's lease ran out (it is then claimed again, as a takeover does).
@pytest.mark.parametrize("after_save,outage", [(10, 0.0), (40, 0.0), (25, 0.8), (25, 2.5)])
async def test_redis_rolled_back_to_a_snapshot_never_hands_a_client_an_id_again(
        redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, after_save: int, outage: float) -> None:
    """Redis on snapshots (its default persistence; ``durability: none`` accepts it) is killed and
    comes back as of its last snapshot: the events a client was sent after it, and the id counter
    with them, are gone. The capture re-joins the upstream from what the snapshot holds; the client
    reconnecting with its last id gets the rest of the run exactly once, or is told its id is not
    held and gets the run anew: never an id it was sent again for another event, nor events
    skipped unsaid (the skipped ones were given the ids of events it had)."""
    redis, (gw,) = await _on_snapshot_redis(redises, make_gateway, fake_upstream, [tmp_path], "snap")
    resp = await start_run(http, gw, 200, delay=0.02)
    other = await start_run(http, gw, 200, delay=0.013)  # another stream draws ids from the counter too
    url = gw.url + resp.headers["Location"]
    got = await read_events(resp, limit=20)
    await asyncio.to_thread(redis.command, "SAVE")
    got += await read_events(resp, limit=after_save)
    await asyncio.to_thread(redis.kill)
    await asyncio.sleep(outage)
    await asyncio.to_thread(redis.start)  # from the snapshot: the last after_save events are not in it
    resumes = await _follow_noting_resumes(http, url, resp, got)
    other.close()
    anew = next((at for outcome, at in resumes if outcome == "not-held"), len(got))
    if anew == len(got):
        assert_whole_or_marked(got, 200)
    else:  # told: from there the client has the run again, whole; what the log lost, under new ids
        assert_exactly_once(got[anew:], 200)
        before = {e.id for e in got[:anew]}
        fresh = [int(e.id or 0) for e in got[anew:] if e.id not in before]
        assert fresh and min(fresh) > max(int(i or 0) for i in before), "ids never go back to ones handed out"
    sent: dict[str | None, str] = {}
    for e in got:
        assert sent.setdefault(e.id, e.data) == e.data, f"id {e.id} was sent for another event before"


async def test_redis_losing_the_data_of_a_stream_taken_over_holds_it_anew_from_its_start(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """A run another replica took over, then Redis loses everything: its capture begins it again as
    a new stream, from the run's start (the upstream replays it all), not from where the stream
    stood when it was taken over, with the counts of what the log no longer holds."""
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "lost", "a")
    resp = await start_run(http, a, 300, delay=0.01)
    loc = resp.headers["Location"]
    seen = await read_events(resp, limit=30)
    resp.close()
    await a.server.stop()  # its capture's claim released, the run open: the next replica takes it over
    b = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "lost", "b")
    async with http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""}) as r:
        assert r.status == 200
        await read_events(r, limit=30)
    own_redis.command("FLUSHALL")
    key = "default/run/" + loc.split("/")[4]
    for _ in range(100):  # until its capture has begun it again
        async with http.get(f"{b.admin_url}/streams/{key}") as shown:
            if shown.status == 200:
                break
        await asyncio.sleep(0.05)
    r = await http.get(b.url + loc, headers={"Last-Event-ID": seen[-1].id or ""})
    assert r.status == 200 and r.headers["X-Gateway-Resume"] == "not-held"
    anew: list[Ev] = []
    await _follow_noting_resumes(http, b.url + loc, r, anew)
    assert_exactly_once(anew, 300)
    assert await join(http, b.url + loc, "-1") == anew
    async with http.get(b.admin_url + "/streams") as r:
        listed = [s for s in await r.json() if s["key"] == key]
    assert [s["count"] for s in listed] == [len(anew)], "the metadata counts what the log holds"


@pytest.mark.parametrize("pause", [0.0, 0.1, 0.3])
async def test_a_client_back_before_the_capture_saw_redis_lose_its_stream_opens_no_second_capture(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession, pause: float) -> None:
    """Redis loses everything between two events of a slow run; a client reconnects ``pause`` later,
    before (or as) the run's capture finds its stream gone. The capture still running here is the
    stream's one capture: a second one opened for the client would append every event again."""
    gw = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "again")
    resp = await start_run(http, gw, 40, delay=0.15)
    url = gw.url + resp.headers["Location"]
    seen = await read_events(resp, limit=6)
    own_redis.command("FLUSHALL")
    await asyncio.sleep(pause)
    r = await http.get(url, headers={"Last-Event-ID": seen[-1].id or ""})
    assert r.status == 200, await r.text()
    anew: list[Ev] = []
    await _follow_noting_resumes(http, url, r, anew)
    resp.close()
    replay = await join(http, url, "-1")
    assert [e.json["i"] for e in replay if e.event == "custom"] == list(range(40)), "each event once in the log"
    assert_whole_or_marked(anew, 40)


async def test_retention_frees_a_redis_at_maxmemory(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """Redis at maxmemory (noeviction) refuses every write that would add to it, but deletes go
    through: retention, the one thing that frees the log's memory, must still remove what has
    expired, or a full Redis stays full (and the gateway failing) for good."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    raw["storage"] = {"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "full", "lease_ttl": "1500ms",
                      "retention": "1s", "sweep_interval": "200ms"}
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, assistant="a", n=3)
    key = "default/run/" + resp.headers["Location"].split("/")[4]
    await read_events(resp)
    own_redis.command("CONFIG", "SET", "maxmemory", "1000")  # far below what it holds: writes refused
    try:
        held = 200
        for _ in range(100):
            async with http.get(f"{gw.admin_url}/streams/{key}") as r:
                held = r.status
            if held == 404:
                break
            await asyncio.sleep(0.1)
        refused = own_redis.command("SET", "probe", "x")
    finally:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    assert "OOM" in refused, "Redis really refused writes meanwhile"
    assert held == 404, "the expired stream was removed while Redis refused writes"


async def test_a_replica_whose_writes_redis_refuses_at_maxmemory_still_counts_as_following(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """A run to cancel on disconnect, captured on ``a``; its client there leaves, one on ``b`` stays.
    Redis reaches maxmemory for longer than a lease: ``b`` is alive and its client still follows the
    run, so ``a`` must not take ``b`` for dead (its liveness key unrenewed) and cancel the run."""
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "alive", "a")
    b = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "alive", "b")
    resp = await start_run(http, a, 3, delay=6.0, on_disconnect="cancel")  # quiet: no commit during the test
    loc = resp.headers["Location"]
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    other = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
    await read_events(other, limit=1)
    resp.close()  # the client that asked for the cancel leaves; the one on b stays
    await asyncio.sleep(0.5)
    own_redis.command("CONFIG", "SET", "maxmemory", "1000")  # far below what it holds: writes refused
    try:
        await asyncio.sleep(3.0)  # twice the lease: every replica's look at who follows ran meanwhile
        status = fake_upstream.runs[run_id].status
    finally:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    other.close()
    assert status == "running", "b's client still follows the run: it is not cancelled"


@pytest.mark.parametrize("refused_for", [0.5, 4.0])
async def test_a_takeover_whose_end_storage_refuses_is_counted_once_when_it_is_written(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession, refused_for: float) -> None:
    """A stateless run left open is taken over and ended with CaptureInterrupted; while Redis never
    runs the append that writes its end, every sweep tries again. gateway_streams_taken_over_total
    counts the takeover once, when the end is in the log, not once per try."""
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "adopt", "a")
    resp = await http.post(f"{a.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 300, "delay": 0.02}})
    assert resp.status == 200
    loc = resp.headers["Location"]
    await read_events(resp, limit=3)
    resp.close()
    await a.server.stop()  # its claim released, the run open: the next process takes it over
    appends = hashlib.sha1(_APPEND.encode()).hexdigest().encode()
    relay = await TcpRelay("127.0.0.1", own_redis.port, lose_replies_to=appends).start()
    relay.refuse_marked(True)  # claims and begins run; the append of the end never does
    try:
        b = await _gateway_on(make_gateway, fake_upstream, tmp_path, f"redis://127.0.0.1:{relay.port}/0", "adopt", "b")
        await asyncio.sleep(refused_for)  # a sweep or several (every half lease), each refused its end
        relay.refuse_marked(False)
        shown: dict[str, Any] = {}
        for _ in range(100):  # until a sweep writes the end (bounded)
            async with http.get(f"{b.admin_url}/streams/default/run/{loc.split('/')[2]}") as r:
                shown = await r.json()
            if not shown.get("open", True):
                break
            await asyncio.sleep(0.1)
        assert shown.get("end") == "interrupted", shown
        await asyncio.sleep(1.0)  # another sweep or two
        async with http.get(b.admin_url + "/metrics") as r:
            counted = [s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                       if s.name == "gateway_streams_taken_over_total"]
        assert counted == [1.0], "one stream taken over (its end written once), not one per try"
    finally:
        await relay.stop()


async def test_a_client_joining_while_redis_refuses_writes_still_holds_off_the_cancel(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, own_redis: RedisServer,
        http: aiohttp.ClientSession) -> None:
    """A run to cancel on disconnect, captured on ``a``. Redis reaches maxmemory, and only then a
    client follows the run on ``b``: the write that says so (its presence) is refused. ``a``'s own
    client, who asked for the cancel, leaves: the run is still followed (on ``b``), so ``a`` must not
    cancel it on the word of a presence record Redis refused to take; once Redis takes writes again
    ``b``'s client is counted, and the run cancelled only when it leaves too."""
    a = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "oomjoin", "a")
    b = await _gateway_on(make_gateway, fake_upstream, tmp_path, own_redis.url, "oomjoin", "b")
    resp = await start_run(http, a, 3, delay=8.0, on_disconnect="cancel")  # quiet: no commit during the test
    loc = resp.headers["Location"]
    run_id = (await read_events(resp, limit=1))[0].json["run_id"]
    own_redis.command("CONFIG", "SET", "maxmemory", "1000")  # far below what it holds: writes refused
    try:
        other = await http.get(b.url + loc, headers={"Last-Event-ID": "-1"})
        assert other.status == 200, "a client may follow a run while Redis refuses writes"
        await read_events(other, limit=1)
        resp.close()  # the client that asked for the cancel leaves; the one on b stays
        await asyncio.sleep(2.0)  # past a's orphan checks (every half lease)
        during = fake_upstream.runs[run_id].status
    finally:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    await asyncio.sleep(2.0)  # writes taken again: b's presence is recorded, a checks again
    after = fake_upstream.runs[run_id].status
    other.close()
    assert (during, after) == ("running", "running"), "b's client still follows the run: it is not cancelled"
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted", "the last follower left: cancelled"


def _assert_told_or_whole(got: list[Ev], resumes: list[tuple[str, int]], n: int) -> None:
    """What a client of a run of ``n`` events got across a Redis rollback: the run exactly once (or
    marked where missing), or told its id is not held and the run anew from there; never an id it
    was sent before for another event."""
    anew = next((at for outcome, at in resumes if outcome == "not-held"), len(got))
    if anew == len(got):
        assert_whole_or_marked(got, n)
    else:
        assert_exactly_once(got[anew:], n)
    sent: dict[str | None, str] = {}
    for e in got:
        assert sent.setdefault(e.id, e.data) == e.data, f"id {e.id} was sent for another event before"


async def _on_snapshot_redis(redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                             dirs: list[Path], prefix: str) -> tuple[RedisServer, list[RunningGateway]]:
    """A redis-server that persists by snapshots only (its default; ``durability: none`` accepts it),
    and a gateway on it for each of ``dirs``, all on one prefix."""
    redis = RedisServer(snapshots=True)
    redises.append(redis)
    await asyncio.to_thread(redis.start)
    gws = []
    for where in dirs:
        raw = gateway_config(where, {"default": {"urls": [fake_upstream.url]}}, streams={"reattach_backoff": "100ms"})
        raw["storage"] = {"backend": "redis", "redis_url": redis.url, "redis_prefix": prefix, "lease_ttl": "1500ms",
                          "durability": "none"}
        gws.append(await make_gateway(raw))
    return redis, gws


async def _rolled_back_pair(redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                            tmp_path: Path) -> tuple[RedisServer, RunningGateway, RunningGateway]:
    redis, gws = await _on_snapshot_redis(redises, make_gateway, fake_upstream, [tmp_path / "a", tmp_path / "b"],
                                          "snap2")
    return redis, gws[0], gws[1]


@pytest.mark.parametrize("after_save,outage", [(10, 0.0), (40, 0.0), (25, 2.5)])
async def test_redis_rolled_back_under_a_client_that_reconnects_to_another_replica_is_told(
        redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, after_save: int, outage: float) -> None:
    """As the rollback test above, but the client reconnects to replica ``b``, not to ``a`` (its
    captor, the one replica that knows which ids it handed out): it is still told, or served whole."""
    redis, a, b = await _rolled_back_pair(redises, make_gateway, fake_upstream, tmp_path)
    resp = await start_run(http, a, 200, delay=0.02)
    other = await start_run(http, a, 200, delay=0.013)  # another stream draws ids from the counter too
    loc = resp.headers["Location"]
    got = await read_events(resp, limit=20)
    await asyncio.to_thread(redis.command, "SAVE")
    got += await read_events(resp, limit=after_save)
    resp.close()
    await asyncio.to_thread(redis.kill)
    await asyncio.sleep(outage)
    await asyncio.to_thread(redis.start)  # from the snapshot: the last after_save events are not in it
    resumes = await _follow_noting_resumes(http, b.url + loc, None, got)  # type: ignore[arg-type]
    other.close()
    _assert_told_or_whole(got, resumes, 200)


@pytest.mark.parametrize("after_save", [10, 40])
async def test_redis_rolled_back_under_a_run_another_replica_takes_over_is_told(
        redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, after_save: int) -> None:
    """The captor ``a`` stops, Redis comes back from an older snapshot, and ``b`` (which never
    captured the run, so knows nothing of the ids ``a`` handed out) takes the run over: its client,
    reconnecting to ``b`` with its last id, is told its id is not held, or served the run whole."""
    redis, a, b = await _rolled_back_pair(redises, make_gateway, fake_upstream, tmp_path)
    resp = await start_run(http, a, 200, delay=0.02)
    other = await start_run(http, b, 400, delay=0.013)  # another stream draws ids from the counter too
    loc = resp.headers["Location"]
    got = await read_events(resp, limit=20)
    await asyncio.to_thread(redis.command, "SAVE")
    got += await read_events(resp, limit=after_save)
    await asyncio.to_thread(redis.kill)
    await a.server.stop()  # it leaves before it could see what Redis lost
    await asyncio.to_thread(redis.start)
    resumes = await _follow_noting_resumes(http, b.url + loc, None, got)  # type: ignore[arg-type]
    other.close()
    _assert_told_or_whole(got, resumes, 200)


async def test_a_session_resumed_with_a_since_the_rolled_back_log_still_holds_gets_only_what_follows(
        redises: list[RedisServer], make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """Redis back from a snapshot lost a session's latest events: ids above what it still holds, up
    to the counter the gateway raised past every id it had seen, are not held (``StreamMeta.lost``),
    and a since among them gets the session anew. A since of an event the snapshot still holds is
    held as ever, and gets what follows it only."""
    from tests.test_sessions import ALL, _scripted, read_session
    redis, (gw,) = await _on_snapshot_redis(redises, make_gateway, fake_upstream, [tmp_path], "snaps")
    tid = "0f3c5e4a-8d6b-4a1e-9c2f-7b1d3e5a9c%02d" % random.randrange(100)
    fake_upstream.threads.add(tid)
    script = fake_upstream.session_events[tid] = [_scripted(f"e{i}", "values", str(i)) for i in range(1, 6)]
    got = await asyncio.wait_for(read_session(http, gw.url, tid, channels=ALL, count=5), 20)
    await asyncio.to_thread(redis.command, "SAVE")
    script += [_scripted(f"e{i}", "values", str(i)) for i in range(6, 9)]
    got += await asyncio.wait_for(read_session(http, gw.url, tid, since=got[-1]["seq"], count=3), 20)
    await asyncio.to_thread(redis.kill)
    await asyncio.to_thread(redis.start)  # from the snapshot: e6..e8 are not in it
    fake_upstream.session_drops += 1  # the capture re-joins: the upstream replays e1..e8
    again: list[dict[str, Any]] = []
    for _ in range(20):  # until the capture holds e6..e8 again
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            again = await asyncio.wait_for(read_session(http, gw.url, tid, since=got[2]["seq"], count=5), 2)
            break
    names = [e.get("event_id") or e.get("error") for e in again]
    assert names == ["e4", "e5", "e6", "e7", "e8"], names
    lost = await asyncio.wait_for(read_session(http, gw.url, tid, since=got[6]["seq"], count=8), 10)
    assert [e.get("event_id") for e in lost] == [f"e{i}" for i in range(1, 9)], "a lost id: the session anew"
