"""Operators can trust the metrics: a real Prometheus scrapes a gateway through a scripted workload,
every dashboard query then returns data, promtool accepts the exposition, and the shipped alert
rules load and pass their own unit tests."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yaml

from tests.conftest import REPO, GatewayProcess, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.prometheus_server import PrometheusServer
from tests.support.metrics import by_label
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.sse import read_events, read_until_cut
from tests.test_dashboard import DASHBOARD, queries
from tests.support.runs import join, new_thread, start_run, stream_run
from tests.test_replicas import replica_config
from prometheus_client.parser import text_string_to_metric_families

MakeGateway = Callable[..., Awaitable[RunningGateway]]
ALERT_NAMES = {"GatewayDown", "GatewayStorageFailing", "GatewayStorageCommitsFailed", "GatewayStorageNearBudget", "GatewayCapturesInterrupted",
               "GatewayGapMarkers", "GatewayUpstreamDown", "GatewayUpstreamPoolSaturated", "GatewayUpstreamRequestsRefused",
               "GatewaySubscribersOverflowing", "GatewayStreamsTakenOver", "GatewayLeasesLost", "GatewayRestarting",
               "GatewayFileDescriptorsNearLimit"}


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (tests/run.sh installs Debian's prometheus)")


@pytest.fixture
async def observed(make_gateway: MakeGateway, fake_upstream: FakeAgentServer,
                   tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, PrometheusServer]]:
    """A gateway with a small budget and small client queues, scraped every second by a real Prometheus."""
    _need("prometheus")
    gw = await make_gateway(gateway_config(
        tmp_path, {"default": {"urls": [fake_upstream.url]}},
        storage={"max_bytes": 6000}, streams={"reattach_backoff": "50ms", "subscriber_buffer": 4}))
    prom = PrometheusServer(gw.admin_url.removeprefix("http://")).start()
    await asyncio.get_running_loop().run_in_executor(None, prom.wait_for_target)
    try:
        yield gw, prom
    finally:
        prom.stop()


async def workload(gw: RunningGateway, fake: FakeAgentServer, http: aiohttp.ClientSession) -> None:
    """Something of everything the dashboard shows."""
    tid = await new_thread(http, gw)
    first = await stream_run(http, gw, tid, n=5)  # streamed runs
    events = await read_events(first)
    await join(http, gw.url + first.headers["Location"], events[1].id)  # a resume
    async with http.post(f"{gw.url}/threads/{tid}/runs", json={"assistant_id": "a", "input": {"n": 3}}) as r:
        run = await r.json()  # a background run, joined later
    await asyncio.sleep(0.2)
    await join(http, f"{gw.url}/threads/{tid}/runs/{run['run_id']}/stream", "-1")
    fake.faults.cut_after = 3  # an upstream leg broken and re-joined
    await read_events(await stream_run(http, gw, tid, n=10, delay=0.01))
    fake.behaviour.ignore_resumable = True  # a gap marker
    fake.faults.cut_after = 3
    await read_events(await stream_run(http, gw, tid, n=20, delay=0.01))
    fake.behaviour.ignore_resumable = False
    fake.faults.cut_after = 2  # a stateless run cannot be re-joined: interrupted
    async with http.post(f"{gw.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01}}) as r:
        await read_events(r)
    slow = await http.get(gw.url + first.headers["Location"], headers={"Last-Event-ID": "-1"})
    live = await stream_run(http, gw, tid, n=60, pad=400, delay=0.005)  # overflows the slow client, fills the budget
    await read_events(live, limit=40)
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
        assert r.status == 503  # a refused capture
    await read_events(live)
    await gw.gw.log.sweep()  # an eviction
    slow.close()


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        observed: tuple[RunningGateway, PrometheusServer], fake_upstream: FakeAgentServer,
        http: aiohttp.ClientSession) -> None:
    gw, prom = observed
    await workload(gw, fake_upstream, http)
    await asyncio.sleep(4)  # a few scrapes after the last change
    dash = json.loads(DASHBOARD.read_text())
    empty = []
    for expr in queries(dash):
        if expr.startswith("label_values("):
            name = re.findall(r"label_values\((\w+)", expr)[0]
            if not prom.api("label/instance/values", **{"match[]": name}):
                empty.append(expr)
            continue
        promql = expr.replace("$__rate_interval", "30s").replace('"$instance"', '".*"')
        result = await asyncio.get_running_loop().run_in_executor(None, prom.query, promql)
        if not result:
            empty.append(expr)
    assert not empty, "queries with no data after the workload:\n" + "\n".join(empty)
    names = {r["name"] for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert ALERT_NAMES <= names, "the shipped alert rules are loaded"


async def test_promtool_accepts_the_metrics_exposition(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    _need("promtool")
    tid = await new_thread(http, gateway)
    await read_events(await stream_run(http, gateway, tid, n=3))
    async with http.get(gateway.admin_url + "/metrics") as r:
        text = await r.read()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# Every labelled series whose label values are a closed set, as an operator's alert or panel names it.
# ``increase()`` and ``rate()`` only see an increment from a sample before it: a series that first
# appears at 1 never moves them, so each must be scraped at 0 before anything happens.
CLOSED_SERIES = {
    ("gateway_gap_markers_total", (("reason", "no_upstream_ids"),)),
    ("gateway_gap_markers_total", (("reason", "replay_mismatch"),)),
    ("gateway_gap_markers_total", (("reason", "empty_rejoin"),)),
    ("gateway_resumes_total", (("outcome", "hit"),)),
    ("gateway_resumes_total", (("outcome", "not_held"),)),
    ("gateway_resumes_total", (("outcome", "truncated"),)),
    ("gateway_upstream_rejoins_total", (("outcome", "ok"),)),
    ("gateway_upstream_rejoins_total", (("outcome", "failed"),)),
    ("gateway_replay_pages_total", (("source", "log"),)),
    ("gateway_replay_pages_total", (("source", "shared"),)),
    ("gateway_upstream_pool_full_total", (("kind", "check"), ("upstream", "default"))),
    ("gateway_upstream_pool_full_total", (("kind", "forward"), ("upstream", "default"))),
    ("gateway_upstream_pool_full_total", (("kind", "stream"), ("upstream", "default"))),
    ("gateway_leases_lost_total", (("how", "renewal"),)),
    ("gateway_leases_lost_total", (("how", "fenced"),)),
    ("gateway_streams_taken_over_total", ()),
}


async def test_a_fresh_gateway_exposes_every_closed_label_set_at_zero(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.admin_url + "/metrics") as r:
        text = await r.text()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    missing = sorted(f"{name}{dict(labels)}" for name, labels in CLOSED_SERIES if (name, labels) not in values)
    assert not missing, "series not exposed before their first use:\n" + "\n".join(missing)
    assert {f"{name}{dict(labels)}": values[(name, labels)] for name, labels in CLOSED_SERIES} == {
        f"{name}{dict(labels)}": 0.0 for name, labels in CLOSED_SERIES}


async def test_a_replica_taking_over_a_killed_owners_stream_raises_the_takeover_alert(
        gateway_process: Callable[..., GatewayProcess], fake_upstream: FakeAgentServer,
        redis_storage: dict[str, Any], tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two replicas on one Redis, both scraped: the owner of a live capture is SIGKILLed, the other
    takes the stream over when the lease runs out, and Prometheus raises the alert at once."""
    _need("prometheus")
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, redis_storage))).start()
            for name in ("a", "b"))
    prom = PrometheusServer(f"127.0.0.1:{a.admin_port}", f"127.0.0.1:{b.admin_port}").start()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, prom.wait_for_target)  # both scraped with the counter at 0
        resp = await start_run(http, a.url, 400)  # 8 s of events: still live when a dies
        await read_events(resp, limit=5)
        a.kill()
        resp.close()
        taken: list[dict[str, Any]] = []
        for _ in range(150):  # lease 1.5 s, takeover sweep every 0.75 s, scrape and evaluation every 1 s
            taken = await loop.run_in_executor(None, prom.alerts, "GatewayStreamsTakenOver")
            if taken:
                break
            await asyncio.sleep(0.2)
        assert [(t["labels"]["instance"], t["state"] in ("pending", "firing")) for t in taken] == [
            (f"127.0.0.1:{b.admin_port}", True)], prom.log_tail()
    finally:
        prom.stop()


def test_readme_explains_every_alert() -> None:
    """The README's table says, for each shipped rule, when it fires and what users see."""
    rules = yaml.safe_load((REPO / "prometheus" / "alerts.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == ALERT_NAMES
    table = (REPO / "README.md").read_text().split("### Metrics and alerts")[1].split("\n### ")[0]
    missing = sorted(n for n in names if f"| `{n}` (" not in table)
    assert not missing, f"README.md's Metrics and alerts table does not explain {missing}"


def test_alert_rules_pass_their_unit_tests() -> None:
    _need("promtool")
    proc = subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"], cwd=REPO / "prometheus",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_a_stream_its_client_dropped_counts_under_the_status_it_was_sent(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """gateway_requests_total{status} says what the access log says: a 200 stream whose client hung
    up mid-run was a 2xx (its line reads 200, end=client_gone), not a 4xx; 499 is only for a client
    gone before any response started."""
    tid = await new_thread(http, gateway)
    live = await stream_run(http, gateway, tid, assistant="a", n=400, delay=0.02)
    assert live.status == 200
    await read_events(live, limit=3)
    live.close()

    async def posts() -> dict[str, float]:
        async with http.get(gateway.admin_url + "/metrics") as r:
            text = await r.text()
        return {s.labels["status"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "gateway_requests_total" and s.labels["method"] == "POST"}

    for _ in range(100):  # until the gateway has seen the client go (bounded)
        counted = await posts()
        if sum(counted.values()) >= 2:
            break
        await asyncio.sleep(0.05)
    assert counted == {"2xx": 2.0}, counted


async def test_every_metric_the_readme_names_is_exposed(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """README names metrics operators will query (gateway_gap_markers_total{reason}, ..._limit, ...):
    each of them, with the labels it gives, is on a fresh gateway's /metrics."""
    readme = (REPO / "README.md").read_text()
    async with http.get(gateway.admin_url + "/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    samples = {s.name: set(s.labels) for f in families.values() for s in f.samples}
    named = set(re.findall(r"(gateway_[a-z_]+[a-z])(?:\{([a-z_,]+)\})?", readme))
    assert len(named) > 5
    for name, labels in named:
        assert name in samples, f"README names {name}, /metrics has no such series"
        assert set(filter(None, labels.split(","))) <= samples[name], (name, labels, samples[name])
    if "`..._limit`" in readme:  # "gateway_upstream_connections{upstream,kind}, `..._limit`"
        assert "gateway_upstream_connections_limit" in samples


async def test_each_alert_fires_in_a_real_prometheus_on_the_series_the_gateway_exports_under_its_fault(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, own_redis: RedisServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """The rule tests (alerts.test.yaml) feed promtool the series as they assume the gateway names
    them. Here the gateway itself is driven into each fault (an upstream leg without ids re-joined, a
    stateless run whose upstream breaks, Redis down under a new run, a stream pool kept full, an
    upstream replica that never answers) and a real Prometheus evaluating the shipped rules raises
    each alert with the labels the gateway really exports."""
    _need("prometheus")
    gw = await make_gateway(gateway_config(
        tmp_path, {"default": {"urls": [fake_upstream.url], "max_streams": 2, "pool_timeout": "200ms"},
                   "gone": {"urls": [f"http://127.0.0.1:{free_port()}"],
                            "health": {"interval": "200ms", "timeout": "200ms", "unhealthy_threshold": 1}}},
        streams={"reattach_backoff": "50ms"},
        storage={"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "alerts", "lease_ttl": "1500ms"}))
    prom = PrometheusServer(gw.admin_url.removeprefix("http://")).start()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, prom.wait_for_target)  # every counter scraped at 0 first
        tid = await new_thread(http, gw)
        fake_upstream.behaviour.ignore_resumable = True  # a leg re-joined without ids: a gap marker
        fake_upstream.faults.cut_after = 3
        assert [e.event for e in await read_events(await stream_run(http, gw, tid, assistant="a", n=20, delay=0.01))
                ].count("gap") == 1
        fake_upstream.behaviour.ignore_resumable = False
        fake_upstream.faults.cut_after = 2  # a stateless run cannot be re-joined: interrupted
        async with http.post(f"{gw.url}/runs/stream", json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01}}) as r:
            assert (await read_events(r))[-1].event == "error"
        held = [await stream_run(http, gw, tid, assistant="a", n=400, delay=0.02) for _ in range(2)]
        async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
            assert r.status == 503  # the stream pool is full
        for r in held:
            r.close()
        await asyncio.to_thread(own_redis.stop)
        async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
            assert r.status == 503  # storage is down
        await asyncio.sleep(2.5)  # scraped failing
        await asyncio.to_thread(own_redis.start)
        want = {
            ("GatewayGapMarkers", (("reason", "no_upstream_ids"),)),
            ("GatewayCapturesInterrupted", ()),
            ("GatewayStorageCommitsFailed", ()),
            ("GatewayStorageFailing", ()),  # pending: it fires after a minute
            ("GatewayUpstreamRequestsRefused", (("kind", "stream"), ("upstream", "default"))),
            ("GatewayUpstreamDown", (("upstream", "gone"),)),  # pending too
        }
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for _ in range(60):
            raised = await loop.run_in_executor(None, prom.api, "alerts")
            seen = {(a["labels"]["alertname"], tuple(sorted((k, v) for k, v in a["labels"].items()
                                                             if k in ("reason", "kind", "upstream"))))
                    for a in raised["alerts"] if a["labels"]["instance"] == gw.admin_url.removeprefix("http://")}
            if want <= seen:
                break
            await asyncio.sleep(0.5)
        assert want <= seen, f"not raised: {sorted(want - seen)}; raised: {sorted(seen)}\n{prom.log_tail()}"
    finally:
        prom.stop()


async def test_a_stream_storage_cut_counts_under_the_status_it_was_sent_as_its_access_line_says(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, own_redis: RedisServer, tmp_path: Path,
        http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    """A run streamed with 200 whose capture storage then fails (Redis killed) is cut; its access line
    reads 200, end=error, and gateway_requests_total counts it as a 2xx too, not as a 5xx nobody was
    sent (storage failing has its own series and alerts)."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await make_gateway(gateway_config(
        tmp_path, {"default": {"urls": [fake_upstream.url]}},
        storage={"backend": "redis", "redis_url": own_redis.url, "redis_prefix": "cut", "lease_ttl": "1500ms"}))
    tid = await new_thread(http, gw)
    live = await stream_run(http, gw, tid, assistant="a", n=400, delay=0.02)
    assert live.status == 200
    await read_events(live, limit=3)
    await asyncio.to_thread(own_redis.kill)
    _seen, was_cut = await read_until_cut(live)
    assert was_cut
    await asyncio.to_thread(own_redis.start)
    lines: list[tuple[int, str]] = []
    for _ in range(100):  # until the gateway has logged the run's request (bounded)
        lines = [(r.status, r.end) for r in caplog.records  # type: ignore[attr-defined]
                 if r.name == "gateway.access" and getattr(r, "method", "") == "POST" and "/runs/stream" in r.path]  # type: ignore[attr-defined]
        if lines:
            break
        await asyncio.sleep(0.05)
    async with http.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    counted = {s.labels["status"]: s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "gateway_requests_total" and s.labels["method"] == "POST"}
    assert lines == [(200, "error")]
    assert counted == {"2xx": 2.0}, counted


async def test_the_exposition_stays_valid_and_bounded_under_many_streams(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """Sixty runs on sixty threads at once, with joins and resumes: promtool still accepts /metrics,
    and no series was added per run, thread or client (labels never name one): the series after
    are the series a single run leaves."""
    _need("promtool")

    async def series() -> tuple[bytes, set[tuple[str, tuple[tuple[str, str], ...]]]]:
        async with http.get(gateway.admin_url + "/metrics") as r:
            raw = await r.read()
        return raw, {(s.name, tuple(sorted(s.labels.items())))
                     for f in text_string_to_metric_families(raw.decode()) for s in f.samples
                     if s.name.startswith("gateway_")}

    async def one() -> None:
        tid = await new_thread(http, gateway)
        resp = await stream_run(http, gateway, tid, assistant="a", n=20, delay=0.005)
        events = await read_events(resp)
        await join(http, gateway.url + resp.headers["Location"], events[3].id)

    await one()
    _raw, before = await series()
    await asyncio.gather(*(one() for _ in range(60)))
    raw, after = await series()
    assert after == before, f"series added by more streams: {sorted(after - before)[:10]}"
    proc = subprocess.run(["promtool", "check", "metrics"], input=raw, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


async def test_log_bytes_scraped_follows_what_the_log_holds_between_sweeps(
        gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    """gateway_log_bytes (the Log bytes panel, GatewayStorageNearBudget) grows as runs are stored, on
    either backend, without waiting for a retention sweep (an hour away here): on Redis it stayed at
    the last sweep's value, 0 on a fresh replica however much the log held."""
    async def held() -> float:
        async with http.get(gateway.admin_url + "/metrics") as r:
            text = await r.text()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "gateway_log_bytes")

    tid = await new_thread(http, gateway)
    await read_events(await stream_run(http, gateway, tid, assistant="a", n=20, pad=100))
    first = await held()
    await read_events(await stream_run(http, gateway, tid, assistant="a", n=20, pad=100))
    second = await held()
    assert 2000 < first < second, (first, second)


async def test_a_replica_frozen_past_its_lease_raises_leases_lost_with_the_how_it_exports(
        gateway_process: Callable[..., GatewayProcess], fake_upstream: FakeAgentServer,
        redis_storage: dict[str, Any], tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two replicas on one Redis, both scraped: the owner of a live capture is frozen (SIGSTOP) past its
    lease, the other takes the stream over, and the owner, thawed, learns it lost it. A real Prometheus
    raises GatewayLeasesLost on the owner with the ``how`` label it exports, GatewayStreamsTakenOver on
    the other; once the owner is killed, GatewayDown goes pending on it."""
    _need("prometheus")
    a, b = (gateway_process("--config", str(replica_config(tmp_path, name, fake_upstream.url, redis_storage))).start()
            for name in ("a", "b"))
    ia, ib = f"127.0.0.1:{a.admin_port}", f"127.0.0.1:{b.admin_port}"
    prom = PrometheusServer(ia, ib).start()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, prom.wait_for_target)
        resp = await start_run(http, a.url, 400)
        await read_events(resp, limit=5)
        resp.close()
        a.freeze()
        await asyncio.sleep(3.0)  # lease 1.5 s: b takes the stream over
        a.thaw()
        want = {("GatewayLeasesLost", ia), ("GatewayStreamsTakenOver", ib)}
        seen: set[tuple[str, str]] = set()
        hows: set[str] = set()
        for _ in range(60):
            raised = (await loop.run_in_executor(None, prom.api, "alerts"))["alerts"]
            seen = {(x["labels"]["alertname"], x["labels"]["instance"]) for x in raised}
            hows = {x["labels"].get("how", "") for x in raised if x["labels"]["alertname"] == "GatewayLeasesLost"}
            if want <= seen:
                break
            await asyncio.sleep(0.5)
        assert want <= seen, f"{sorted(seen)}\n{prom.log_tail()}"
        assert hows and hows <= {"renewal", "fenced"}, hows
        a.kill()
        down: list[dict[str, Any]] = []
        for _ in range(40):
            down = [x for x in await loop.run_in_executor(None, prom.alerts, "GatewayDown")
                    if x["labels"]["instance"] == ia]
            if down:
                break
            await asyncio.sleep(0.5)
        assert [x["state"] for x in down] == ["pending"], down
    finally:
        prom.stop()


async def test_capacity_alerts_go_pending_on_what_the_gateway_exports_at_capacity(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A stream pool with every connection in use and a log over 90% of its budget: GatewayUpstreamPoolSaturated
    (per upstream and kind) and GatewayStorageNearBudget go pending in a real Prometheus on the series the
    gateway exports (they fire after their ``for``)."""
    _need("prometheus")
    gw = await make_gateway(gateway_config(
        tmp_path, {"default": {"urls": [fake_upstream.url], "max_streams": 2}}, storage={"max_bytes": 6000}))
    prom = PrometheusServer(gw.admin_url.removeprefix("http://")).start()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, prom.wait_for_target)
        tid = await new_thread(http, gw)
        held = [await stream_run(http, gw, tid, assistant="a", n=400, delay=0.05, pad=400) for _ in range(2)]
        for r in held:
            await read_events(r, limit=12)  # over 5,400 bytes held between them
        want = {("GatewayUpstreamPoolSaturated", "default", "stream"), ("GatewayStorageNearBudget", "", "")}
        seen: set[tuple[str, str, str]] = set()
        for _ in range(40):
            raised = (await loop.run_in_executor(None, prom.api, "alerts"))["alerts"]
            seen = {(x["labels"]["alertname"], x["labels"].get("upstream", ""), x["labels"].get("kind", ""))
                    for x in raised if x["state"] == "pending"}
            if want <= seen:
                break
            await asyncio.sleep(0.5)
        assert want <= seen, f"{sorted(seen)}: log bytes {gw.gw.log.size}\n{prom.log_tail()}"
        for r in held:
            r.close()
    finally:
        prom.stop()


async def test_a_gateway_started_again_and_again_raises_restarting(
        gateway_process: Callable[..., GatewayProcess], fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    """A gateway process killed and started again three times on its admin port (a crash loop under a
    service manager), each start scraped: a real Prometheus raises GatewayRestarting on the
    ``process_start_time_seconds`` the process exports."""
    _need("prometheus")
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data")).start()
    target = f"127.0.0.1:{gw.admin_port}"
    prom = PrometheusServer(target).start()
    loop = asyncio.get_running_loop()

    async def scraped_start() -> float | None:
        got = await loop.run_in_executor(None, prom.query, f'process_start_time_seconds{{instance="{target}"}}')
        return float(got[0]["value"][1]) if got else None

    try:
        await loop.run_in_executor(None, prom.wait_for_target)
        for _ in range(3):
            before = await scraped_start()
            gw.kill()
            gw.start()
            for _ in range(50):  # until this start is scraped
                now = await scraped_start()
                if now is not None and now != before:
                    break
                await asyncio.sleep(0.2)
        firing: list[dict[str, Any]] = []
        for _ in range(30):
            firing = [x for x in await loop.run_in_executor(None, prom.alerts, "GatewayRestarting")
                      if x["labels"]["instance"] == target]
            if firing:
                break
            await asyncio.sleep(0.5)
        assert [x["state"] for x in firing] == ["firing"], prom.log_tail()
    finally:
        prom.stop()


async def test_a_background_runs_first_leg_is_no_rejoin(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """gateway_upstream_rejoins_total counts re-joins of upstream legs that broke (the dashboard's
    "Upstream re-joins/s", what an operator reads as legs lost). The first leg of a background run,
    which the gateway opens itself because no client streams it yet, is no re-join: counted as one,
    every background run created showed as a broken leg re-joined. A leg that does break is."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "50ms"}))
    tid = await new_thread(http, gw)
    for _ in range(3):
        async with http.post(f"{gw.url}/threads/{tid}/runs", json={"assistant_id": "a", "input": {"n": 3}}) as r:
            run = await r.json()
        got = await join(http, f"{gw.url}/threads/{tid}/runs/{run['run_id']}/stream", "-1")
        assert [e.event for e in got].count("custom") == 3
    assert await by_label(http, gw.admin_url, "gateway_upstream_rejoins_total", "outcome") == {"ok": 0.0, "failed": 0.0}
    fake_upstream.faults.cut_after = 2  # one leg broken: one re-join
    await read_events(await stream_run(http, gw, tid, assistant="a", n=6, delay=0.01))
    fake_upstream.faults.cut_after = 0
    assert await by_label(http, gw.admin_url, "gateway_upstream_rejoins_total", "outcome") == {"ok": 1.0, "failed": 0.0}


async def test_request_methods_http_does_not_define_share_one_series_of_gateway_requests(
        gateway_process: Callable[..., GatewayProcess], fake_upstream: FakeAgentServer, tmp_path: Path,
        http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client may send any token as its method, and the gateway forwards it. aiohttp's C parser
    knows a fixed list of methods, but its pure-Python parser (AIOHTTP_NO_EXTENSIONS, platforms
    without its compiled extension) takes any token: one series of gateway_requests_total per
    token let any client grow /metrics, and Prometheus's memory, without bound. The methods HTTP
    defines keep their own series; every other one counts as ``method="other"``."""
    monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data")).start()
    for i in range(30):
        async with http.request(f"X{i}YZ", gw.url + "/echo/x") as r:
            await r.read()
    async with http.get(gw.url + "/echo/x") as r:
        await r.read()
    async with http.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
        text = await r.text()
    methods: dict[str, float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "gateway_requests_total":
                methods[s.labels["method"]] = methods.get(s.labels["method"], 0.0) + s.value
    assert set(methods) <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
                            "other"}, sorted(methods)
    assert (methods.get("other"), methods.get("GET")) == (30.0, 1.0), methods
