"""Storage that fails under the gateway: a full disk, a damaged record, a damaged or truncated log file.

The rules: nothing a client saw is taken back; a client of an affected stream is cut (never a
clean end, never a second response inside a started one); the gateway says what is wrong
(readiness, a one-line start-up error naming the file) and recovers by itself when it can.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import lmdb
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import eventlog
from gateway.app import Gateway, Server
from gateway.config import Storage, build_config
from gateway.eventlog import lmdb as lmdb_log
from gateway.eventlog.base import StorageError, StreamMeta
from tests.conftest import REPO, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.disk import fill
from tests.support.procs import tree_env
from tests.support.sse import Ev, read_events, read_until_cut
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


async def _recovers_and_fills_in(http: aiohttp.ClientSession, gw: RunningGateway, loc: str, seen: list[Ev],
                                 n: int) -> None:
    """Space is back: readiness returns by itself, and a resume after what the cut client saw gets
    the rest of the run's ``n`` events (the re-joined upstream filled in what could not be stored)."""
    assert await _until_ready(http, gw), "readiness returns by itself"
    rest = await join(http, loc, seen[-1].id)
    assert customs(seen + rest) == list(range(n)), "the re-joined upstream filled in what could not be stored"
    assert_ids_increase(seen + rest)
    assert await join(http, loc, "-1") == seen + rest, "the log holds exactly what clients were sent"


async def test_full_disk_cuts_clients_says_so_and_recovers_when_space_returns(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                         storage={"path": str(small_fs / "data"), "map_size": "64MiB"},
                         streams={"reattach_backoff": "50ms"})
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    filler = fill(small_fs, leave=3 << 20)
    n = 200
    resp = await stream_run(http, gw, tid, n=n, delay=0.002, pad=40_000)  # ~8 MB: more than is free
    loc = gw.url + resp.headers["Location"]
    seen, was_cut = await read_until_cut(resp)
    assert was_cut, "a stream whose events cannot be stored must not end cleanly"
    assert customs(seen) == list(range(len(customs(seen)))) and len(customs(seen)) < n
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503
        assert "storage" in (await r.json())["storage"]
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", json={"assistant_id": "a", "input": {"n": 1}}) as r:
        assert r.status == 503 and r.content_type == "application/json"
        assert "storage" in (await r.json())["detail"]
    filler.unlink()  # space comes back: the gateway recovers by itself
    await _recovers_and_fills_in(http, gw, loc, seen, n)


async def test_full_disk_under_a_real_langgraph_run_cuts_says_so_and_the_rejoin_fills_in(
        make_gateway: MakeGateway, langgraph_server: Any, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # The same fault in front of the real server: what the log could not take while the disk was
    # full comes back through the re-join to LangGraph (its replay buffer, stream_resumable).
    raw = gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}},
                         storage={"path": str(small_fs / "data"), "map_size": "16MiB"},
                         streams={"reattach_backoff": "50ms"})
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    n = 400
    resp = await http.post(f"{gw.url}/threads/{tid}/runs/stream", json={
        "assistant_id": "ticker", "input": {"n": n, "delay": 0.01}, "stream_mode": ["custom"]})
    assert resp.status == 200
    loc = gw.url + resp.headers["Location"]
    seen = await read_events(resp, limit=5)
    filler = fill(small_fs, leave=0)
    more, was_cut = await read_until_cut(resp)
    seen += more
    assert was_cut, "a stream whose events cannot be stored must not end cleanly"
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503
    filler.unlink()
    await _recovers_and_fills_in(http, gw, loc, seen, n)


async def test_a_run_whose_capture_cannot_begin_on_a_full_disk_is_cancelled_upstream_and_said(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # The disk fills while nothing is written, so the gateway does not know yet: the run is created
    # upstream, then its capture's first commit fails. The leg's first events were already queued
    # behind that commit (Captures._begin_and_start): they must fail with it, the leg be let go, the
    # run be cancelled upstream and the client told so, before any header of a stream is sent.
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                         storage={"path": str(small_fs / "data"), "map_size": "64MiB"})
    gw = await make_gateway(raw)
    tid = await new_thread(http, gw)
    filler = fill(small_fs, leave=0)
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": 50, "delay": 0.05, "pad": 20_000}}) as r:
        assert r.status == 503 and r.content_type == "application/json"
        detail = (await r.json())["detail"]
    assert "could not capture" in detail and "cancelled upstream" in detail, detail
    (run_id,) = fake_upstream.runs
    assert await fake_upstream.wait_status(run_id, "interrupted") == "interrupted"
    assert not gw.gw.hub.captures.live, "the capture that could not begin is gone, its leg let go"
    filler.unlink()
    await _until_ready(http, gw)
    resp = await stream_run(http, gw, tid, n=5)
    assert customs(await read_events(resp)) == list(range(5)), "a run after the disk is back streams whole"


async def test_a_full_disk_is_not_taken_for_recovered_while_the_write_that_failed_would_fail_again(
        small_fs: Path) -> None:
    # A failed commit leaves the file's pages it wrote before the disk filled; a small probe
    # written over them succeeded on a disk still full, so the gateway said it had recovered
    # (readiness back to 200, captures resumed) and failed again at the next commit, once a second.
    log = eventlog.open_log(Storage(path=small_fs / "data", map_size=64 << 20))
    await log.open()
    try:
        key = "default/run/r1"
        await log.begin(StreamMeta(key=key, kind="run", upstream="default", path="/threads/t/runs/r1"))
        filler = fill(small_fs, leave=2 << 20)
        body = b"event: custom\ndata: " + b"x" * (256 << 10) + b"\n\n"
        with pytest.raises(StorageError):
            await log.submit(key, [(body, None)] * 16)  # 4 MiB: twice what is free
        assert log.failure is not None
        await asyncio.sleep(lmdb_log.PROBE_INTERVAL * 3.5)  # three probes, on a disk as full as it was
        assert log.failure is not None, "the disk is as full as when the write failed"
        filler.unlink()
        async with asyncio.timeout(10):
            await log.wait_healthy()
        await log.begin(StreamMeta(key=key, kind="run", upstream="default", path="/threads/t/runs/r1"))
        assert len(await log.submit(key, [(body, None)] * 16)) == 16  # the write that failed fits now
    finally:
        await log.close()


async def test_a_commit_that_wrote_nothing_is_not_taken_for_storage_recovered(small_fs: Path) -> None:
    # The chunks a capture had in flight behind a failed commit are refused (their stream stopped
    # at the failure) and their group commits nothing. That empty commit was taken for storage
    # back: readiness went to 200 and captures resumed on a disk still full.
    log = eventlog.open_log(Storage(path=small_fs / "data", map_size=64 << 20))
    await log.open()
    try:
        key = "default/run/r1"
        await log.begin(StreamMeta(key=key, kind="run", upstream="default", path="/threads/t/runs/r1"))
        fill(small_fs, leave=2 << 20)
        body = b"event: custom\ndata: " + b"x" * (256 << 10) + b"\n\n"
        first = log.submit(key, [(body, None)] * 16)  # 4 MiB: twice what is free
        await asyncio.sleep(0)  # handed over: the next chunk waits for the next group
        second = log.submit(key, [(b"event: custom\ndata: {}\n\n", None)])
        for fut in (first, second):
            with pytest.raises(StorageError):
                await fut
        assert log.failure is not None, "nothing was written since the failure"
    finally:
        await log.close()


# --- a damaged record met during a replay -------------------------------------------------------------

async def _stopped_gateway_with_a_run(raw: dict[str, Any], fake: FakeAgentServer) -> str:
    server = Server(Gateway(build_config(raw), CollectorRegistry()))
    await server.start()
    try:
        url = "http://%s:%d" % server.addresses["main"]
        async with aiohttp.ClientSession() as http:
            tid = await new_thread(http, RunningGateway(server))
            resp = await stream_run(http, RunningGateway(server), tid, n=20)
            await read_events(resp)
            return url + resp.headers["Location"]
    finally:
        await server.stop()


def _damage_a_record(data_dir: Path) -> None:
    env = lmdb.open(str(data_dir), max_dbs=4)
    try:
        db = env.open_db(b"events")
        with env.begin(write=True, db=db) as txn:
            key = next(k for k, _ in txn.cursor())
            txn.put(key, b"\0" * 8 + b"\1\2\3")  # a time stamp, then half an event header
    finally:
        env.close()


async def test_error_after_headers_cuts_the_connection_never_a_second_response(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    loc = await _stopped_gateway_with_a_run(raw, fake_upstream)
    _damage_a_record(tmp_path / "data")
    gw = await make_gateway(raw)
    path = loc.split("/", 3)[3]
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: -1\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # until the gateway closes the connection
    writer.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:100]
    assert data.count(b"HTTP/1.1 ") == 1, "no second status line inside the started body"
    assert not data.endswith(b"0\r\n\r\n"), "cut, not a clean end of a stream that lost events"


# --- a damaged log at start ---------------------------------------------------------------------------

def _start_cli(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Start the gateway on ``data_dir``: its exit, or (once it listens) a SIGTERM and its exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--upstream", "http://127.0.0.1:9", "--port", str(port),
                             "--admin-port", "0", "--data-dir", str(data_dir)], cwd=REPO, env=tree_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            proc.terminate()  # it started
            break
        except OSError:
            time.sleep(0.05)
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
async def written_log(fake_upstream: FakeAgentServer, tmp_path: Path) -> AsyncIterator[Path]:
    """A data directory a gateway wrote a run into and then closed."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    await _stopped_gateway_with_a_run(raw, fake_upstream)
    yield tmp_path / "data"


def _assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    # README: refused at start with one line naming the file and what is wrong, and exit status 1.
    assert result.returncode == 1, f"exit {result.returncode} (-7 is SIGBUS):\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("agent-gateway: storage error: ") and "move the data directory aside" in last, last
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"


def _put(data_dir: Path, db_name: bytes, key: bytes | None, value: bytes) -> None:
    env = lmdb.open(str(data_dir), max_dbs=4)
    try:
        db = env.open_db(db_name)
        with env.begin(write=True, db=db) as txn:
            if key is None:
                key = next(k for k, _ in txn.cursor())
            txn.put(key, value)
    finally:
        env.close()


def test_bad_stream_metadata_at_start_is_one_line_naming_the_file(written_log: Path) -> None:
    _put(written_log, b"streams", None, b"{not json")
    _assert_refused(_start_cli(written_log), str(written_log / "data.mdb"), "stream")


def test_bad_seq_record_at_start_is_one_line_naming_the_file(written_log: Path) -> None:
    _put(written_log, b"meta", b"seq", b"twelve")
    _assert_refused(_start_cli(written_log), str(written_log / "data.mdb"), "seq")


def test_truncated_log_file_is_refused_not_a_crash(written_log: Path) -> None:
    data = written_log / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    _assert_refused(_start_cli(written_log), str(data), "truncated")


def test_zero_length_log_file_is_refused_not_a_new_log(written_log: Path) -> None:
    data = written_log / "data.mdb"
    os.truncate(data, 0)
    _assert_refused(_start_cli(written_log), str(data), "truncated")


def test_moving_a_damaged_log_aside_starts_a_new_one_above_every_old_id(
        written_log: Path, tmp_path: Path) -> None:
    env = lmdb.open(str(written_log), max_dbs=4, readonly=True)
    with env.begin(db=env.open_db(b"meta", create=False)) as txn:
        seq = txn.get(b"seq")
        assert seq is not None
        old_top = int(seq)
    env.close()
    shutil.move(written_log, tmp_path / "damaged")
    assert _start_cli(written_log).returncode == 0
    env = lmdb.open(str(written_log), max_dbs=4, readonly=True)
    with env.begin(db=env.open_db(b"meta", create=False)) as txn:
        seq = txn.get(b"seq")
        assert seq is not None
        new_floor = int(seq)
    env.close()
    assert new_floor > old_top, "a new log never hands out an id an old one did"


async def test_a_stateless_run_interrupted_on_a_full_disk_ends_with_its_error_event_once_space_returns(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """A stateless run's upstream stalls (read timeout) while the disk is full: the gateway cannot
    re-join it, nor write its CaptureInterrupted end, so the stream stays open. Once space returns,
    a client joining it gets that end: the capture re-attached for it writes from what the log holds,
    not refused forever by the failed commit of the capture before it (which left the client waiting
    on a stream nobody would ever end). Counted once, as the log holds one end."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url], "read_timeout": "1s"}},
                         storage={"path": str(small_fs / "data"), "map_size": "64MiB"})
    gw = await make_gateway(raw)
    fake_upstream.faults.stall_after = 3
    resp = await http.post(f"{gw.url}/runs/stream",
                           json={"assistant_id": "a", "input": {"n": 10, "delay": 0.01, "pad": 200_000}})
    assert resp.status == 200
    loc = resp.headers["Location"]
    await read_events(resp, limit=3)
    filler = fill(small_fs, leave=0)
    await asyncio.sleep(2.0)  # the leg times out meanwhile: interrupted, with no room to write it
    resp.close()
    filler.unlink()
    for _ in range(50):  # storage is probed every second
        async with http.get(gw.admin_url + "/readyz") as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    replay: list[Ev] = []
    for _ in range(30):  # until the stream is ended
        try:
            replay = await asyncio.wait_for(join(http, gw.url + loc, "-1"), 5)
        except aiohttp.ClientPayloadError:  # cut: the capture stopped before the end
            replay = []
        if replay and replay[-1].event == "error":
            break
        await asyncio.sleep(0.2)
    assert replay and replay[-1].event == "error" and replay[-1].json["error"] == "CaptureInterrupted", \
        [e.event for e in replay]
    assert gw.gw.metrics.interruptions._value.get() == 1


async def test_a_full_disk_under_a_run_that_cannot_be_replayed_is_counted_as_the_log_says(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """What an operator's alerts read of a full disk under a live run whose upstream sends no ids: the
    failed commit is counted, the failing gauge is back to 0 once space returns, and the gap marker
    the re-join writes (what could not be stored is lost) is counted once, under its reason."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                         storage={"path": str(small_fs / "data"), "map_size": "64MiB"},
                         streams={"reattach_backoff": "50ms"})
    gw = await make_gateway(raw)
    fake_upstream.behaviour.ignore_resumable = True
    tid = await new_thread(http, gw)
    filler = fill(small_fs, leave=3 << 20)
    resp = await stream_run(http, gw, tid, assistant="a", n=200, delay=0.01, pad=40_000)
    loc = gw.url + resp.headers["Location"]
    _seen, was_cut = await read_until_cut(resp)
    assert was_cut
    filler.unlink()
    await _until_ready(http, gw)
    replay: list[Ev] = []
    for _ in range(100):  # until the re-joined run has ended
        replay = await join(http, loc, "-1")
        if any(e.event == "gap" for e in replay):
            break
        await asyncio.sleep(0.1)
    async with http.get(gw.admin_url + "/metrics") as r:
        samples = {(s.name, tuple(s.labels.values())): s.value
                   for f in text_string_to_metric_families(await r.text()) for s in f.samples}
    assert [e.json["reason"] for e in replay if e.event == "gap"] == ["no_upstream_ids"]
    assert samples[("gateway_gap_markers_total", ("no_upstream_ids",))] == 1
    assert samples[("gateway_log_commit_errors_total", ())] >= 1
    assert samples[("gateway_storage_failing", ())] == 0


async def _until_ready(http: aiohttp.ClientSession, gw: RunningGateway) -> bool:
    """Whether /readyz says 200 (the storage probe saw the disk back) within 10 s."""
    for _ in range(100):
        async with http.get(gw.admin_url + "/readyz") as r:
            if r.status == 200:
                return True
        await asyncio.sleep(0.1)
    return False


async def test_an_idle_session_whose_last_commit_failed_cuts_its_clients_and_fills_in_once_space_returns(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, small_fs: Path, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    """A v3 session (a thread stream too) is idle between runs for as long as it likes, its capture
    parked on an open leg. A failed commit was only noticed when the next events came, or the leg
    ended: the last events of a run that the disk refused stayed out of the log, and its clients
    waited on an open stream, told nothing, until the thread's next run. The failure ends the leg at
    once: the clients are cut, and once space is back the re-join fills in what was refused."""
    from tests.test_sessions import ALL, _scripted, frames
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                         storage={"path": str(small_fs / "data"), "map_size": "64MiB"},
                         streams={"reattach_backoff": "50ms"})
    gw = await make_gateway(raw)
    tid = "5b2d7c1e-3f4a-4e6b-8c9d-0a1b2c3d4e%02d" % (os.getpid() % 100)
    fake_upstream.threads.add(tid)
    script = fake_upstream.session_events[tid] = [_scripted("e1", "values", '{"n":1}')]
    seen: list[dict[str, Any]] = []
    filler: Path | None = None
    cut = False
    async with http.post(f"{gw.url}/threads/{tid}/stream/events", json={"channels": ALL}) as r:
        stream = frames(r)
        seen.append((await asyncio.wait_for(stream.__anext__(), 20))[1])
        filler = fill(small_fs, leave=2 << 20)
        script.append(_scripted("e2", "values", '"%s"' % ("x" * (6 << 20))))  # more than is free

        async def rest_of_it() -> None:
            async for _name, data, _id in stream:
                seen.append(data)

        try:
            await asyncio.wait_for(rest_of_it(), 20)
        except aiohttp.ClientPayloadError:
            cut = True
        except asyncio.TimeoutError:
            pass
    assert cut, "a client of a stream whose events cannot be stored is cut"
    assert [e.get("event_id") for e in seen] == ["e1"], seen
    filler.unlink()  # space comes back: the capture recovers and re-joins
    script.append(_scripted("e3", "values", '{"n":3}'))
    rest: list[dict[str, Any]] = []
    for _ in range(100):
        try:
            async with http.post(f"{gw.url}/threads/{tid}/stream/events",
                                 json={"channels": ALL, "since": seen[-1]["seq"]}) as r:
                if r.status == 200:
                    async for _name, data, _id in frames(r):
                        rest.append(data)
                        if data.get("event_id") == "e3":
                            break
                    break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    assert [e.get("event_id") for e in rest] == ["e2", "e3"], [e.get("event_id") or e.get("error") for e in rest]
