"""The command line as users run it: `python -m gateway ...` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import REPO
from tests.fake_upstream import FakeAgentServer
from tests.support.procs import free_port, tree_env
from tests.support.sse import read_events, read_until_cut

# Bounded waits, in seconds.
START_TIMEOUT = 20.0
HEALTH_INTERVAL = 0.2
GRACE = 3.0


def clean_env() -> dict[str, str]:
    """The caller's environment without the variables the example config reads, importing this tree."""
    env = tree_env()
    for name in ("UPSTREAM_URL", "GATEWAY_DATA_DIR"):
        env.pop(name, None)
    return env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=30)


# --- refusals: exit 2, one line on stderr naming the field and the value ---------------------------

def assert_one_line(stderr: str, *fragments: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize(("args", "fragments"), [
    (["--port", "eighty"], ["--port", "eighty"]),
    (["--log-level", "loud"], ["--log-level", "loud"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_flag_exits_2_with_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "agent-gateway:", *fragments)
    assert proc.stdout == ""


def test_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("storage:\n  durability: sometimes\n")
    proc = run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "config error", "storage.durability", "sometimes")
    assert not (tmp_path / "data").exists()  # nothing was started


def test_flag_value_rejected_by_config_exits_2(tmp_path: Path) -> None:
    proc = run_cli("--upstream", "ftp://127.0.0.1:21", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "upstreams.default.urls[0]", "ftp://127.0.0.1:21")


def test_yaml_syntax_error_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("listen:\n  port: 8080\n   host: [unclosed\n")
    proc = run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, str(cfg), "line 3, column 8", "not valid YAML")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = run_cli("--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "--config", "nope.yaml")


def test_config_file_that_is_not_utf8_exits_2_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_bytes(b"listen:\n  host: caf\xe9\n")  # Latin-1, as an editor may save it
    proc = run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "config error", str(cfg), "UTF-8")


def test_help_exits_0(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--config", "--upstream", "--port", "--admin-port", "--data-dir", "--host", "--admin-host"):
        assert flag in proc.stdout


# --- a running gateway ------------------------------------------------------------------------------

class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin_port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                # The admin listener starts last, so both are up once it accepts.
                _, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError(f"gateway did not listen within {timeout}s:\n{self.log.read_text()}")


Spawn = Callable[..., Awaitable[Proc]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `python -m gateway` on free 127.0.0.1 ports; killed at teardown if still running."""
    procs: list[Proc] = []

    async def start(*args: str) -> Proc:
        port, admin_port = free_port(), free_port()
        log = tmp_path / f"gateway-{len(procs)}.log"
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--port", str(port), "--admin-port", str(admin_port), *args,
                cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        p = Proc(proc, port, admin_port, log)
        procs.append(p)
        await p.wait_listening()
        return p

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
        await asyncio.wait_for(p.proc.wait(), 10)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


async def wait_status(http: aiohttp.ClientSession, url: str, want: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = await status_of(http, url)
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} answered {got}, not {want}, within {timeout}s")


def fast_health_config(tmp_path: Path) -> Path:
    path = tmp_path / "fast-health.yaml"
    path.write_text(
        "upstreams:\n"
        "  default:\n"
        "    urls: ['${UPSTREAM_URL:-http://127.0.0.1:2024}']\n"
        f"    health: {{interval: {HEALTH_INTERVAL}s, timeout: 1s, unhealthy_threshold: 1}}\n"
        f"shutdown_grace: {GRACE}s\n")
    return path


async def test_starts_with_flags_only_and_answers_healthz(spawn: Spawn, http: aiohttp.ClientSession,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "data"
    gw = await spawn("--upstream", f"http://127.0.0.1:{free_port()}", "--data-dir", str(data))
    async with http.get(gw.admin_url + "/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"status": "alive"}
    async with http.get(gw.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert "gateway_log_bytes" in await resp.text()
    assert data.is_dir() and any(data.iterdir())  # the event log was opened where --data-dir says


async def test_readyz_follows_upstream_health(spawn: Spawn, http: aiohttp.ClientSession,
                                              fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    gw = await spawn("--config", str(fast_health_config(tmp_path)), "--upstream", fake_upstream.url,
                     "--data-dir", str(tmp_path / "data"))
    ready = gw.admin_url + "/readyz"
    await wait_status(http, ready, 200)
    # Let a few checks run against the live upstream: it stays ready.
    await asyncio.sleep(HEALTH_INTERVAL * 3)
    async with http.get(ready) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["healthy_replicas"] == {"default": [fake_upstream.url]}

    port = fake_upstream.port
    await fake_upstream.stop()
    await wait_status(http, ready, 503)
    async with http.get(ready) as resp:
        assert (await resp.json())["healthy_replicas"] == {"default": []}
    assert await status_of(http, gw.admin_url + "/healthz") == 200  # alive, just not ready

    await fake_upstream.start(port)  # same address: the replica comes back into rotation
    await wait_status(http, ready, 200)


async def test_sigterm_exits_0_within_grace(spawn: Spawn, http: aiohttp.ClientSession,
                                            fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    gw = await spawn("--config", str(fast_health_config(tmp_path)), "--upstream", fake_upstream.url,
                     "--data-dir", str(tmp_path / "data"))
    # A client is in the middle of a long stream when the signal arrives.
    async with http.post(gw.url + "/runs/stream",
                         json={"assistant_id": "agent", "input": {"n": 1000, "delay": 0.05}}) as resp:
        assert resp.status == 200
        first = await read_events(resp, limit=2)
        assert [e.event for e in first] == ["metadata", "custom"]
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(gw.proc.wait(), GRACE + 5)
        elapsed = time.monotonic() - started
        # The gateway cuts the client's stream at an event boundary instead of waiting for the run:
        # a cut, not a clean end, so the client knows to resume elsewhere.
        rest, was_cut = await asyncio.wait_for(read_until_cut(resp), 5)
    assert was_cut
    assert code == 0, gw.log.read_text()
    assert elapsed < GRACE, f"took {elapsed:.1f}s, grace is {GRACE}s"
    assert len(first) + len(rest) < 1000
    assert "Traceback" not in gw.log.read_text()


async def test_sigterm_when_idle_exits_0_quickly(spawn: Spawn, tmp_path: Path) -> None:
    gw = await spawn("--upstream", f"http://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"))
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(gw.proc.wait(), 10)
    assert code == 0, gw.log.read_text()
    assert time.monotonic() - started < 10.0  # default shutdown_grace


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signals_repeated_through_the_whole_shutdown_leave_no_traceback(
        spawn: Spawn, tmp_path: Path, sig: signal.Signals) -> None:
    """A worker gets the stop twice (the terminal's Ctrl-C to the group, then the supervisor passing
    it on), and an impatient user presses Ctrl-C again. asyncio closes its self-pipe before it
    removes its signal handlers, so a signal in between was written to a closed descriptor: an
    'Exception ignored ... Bad file descriptor' traceback, for a stop asked for the ordinary way.
    Signals are sent every millisecond until the process is gone, so every moment of the shutdown
    gets one."""
    gw = await spawn("--upstream", f"http://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"))
    deadline = time.monotonic() + 15
    while gw.proc.returncode is None and time.monotonic() < deadline:
        try:
            # Not Popen.send_signal: it polls first, and reaping the process there leaves asyncio's
            # watcher a pid it does not know (returncode 255, the test's doing, not the gateway's).
            os.kill(gw.proc.pid, sig)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.001)
    code = await asyncio.wait_for(gw.proc.wait(), 10)
    assert code == 0, gw.log.read_text()[-3000:]
    assert "Traceback" not in gw.log.read_text(), gw.log.read_text()[-3000:]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_ctrl_c_stops_the_gateway_and_its_workers_gracefully(
        http: aiohttp.ClientSession, fake_upstream: FakeAgentServer, tmp_path: Path, workers: str) -> None:
    """README: SIGTERM or SIGINT stops the gateway (and every worker) gracefully: client streams are
    cut after their last whole event, and it exits 0. Ctrl-C in a terminal sends SIGINT to the whole
    process group, the supervisor and its workers at once."""
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--port", str(port), "--admin-port", "0", "--workers", workers,
            "--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"), cwd=tmp_path, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                async with http.post(url + "/threads", json={}) as r:
                    tid = (await r.json())["thread_id"]
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline and proc.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
        async with http.post(f"{url}/threads/{tid}/runs/stream",
                             json={"assistant_id": "a", "input": {"n": 1000, "delay": 0.05}}) as resp:
            assert resp.status == 200
            await read_events(resp, limit=2)
            os.killpg(proc.pid, signal.SIGINT)
            _rest, was_cut = await asyncio.wait_for(read_until_cut(resp), 10)
        code = await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert was_cut, "a cut, not a clean end: the client knows to resume"
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


async def _reaching_own_code(pid: int) -> None:
    """Until the process runs the gateway's code: it holds the stop signals (SIGINT blocked) or has
    its handler for them (SIGTERM caught). Before that, an interrupt is the interpreter's own start."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            masks = {k: int(v, 16) for k, _, v in (ln.partition(":\t") for ln in status) if k in ("SigBlk", "SigCgt")}
            if masks["SigBlk"] & 1 << (signal.SIGINT - 1) or masks["SigCgt"] & 1 << (signal.SIGTERM - 1):
                return
        await asyncio.sleep(0.001)
    raise AssertionError("the gateway's code never ran")


@pytest.mark.parametrize("after", [0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.9])
async def test_ctrl_c_while_the_workers_start_stops_everything_without_a_traceback(
        fake_upstream: FakeAgentServer, tmp_path: Path, after: float) -> None:
    """Ctrl-C sends SIGINT to the supervisor and its workers at once. One arriving while a worker
    (or the supervisor) was still importing raised KeyboardInterrupt there: a traceback in the log,
    for a stop asked for the ordinary way. Swept over the moments of the start-up, from the gateway's
    first line on (before it, the interpreter's own start; the loading is swept module by module below)."""
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--port", str(free_port()), "--admin-port", "0", "--workers", "2",
            "--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data"), cwd=REPO, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await _reaching_own_code(proc.pid)
        await asyncio.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


# `python -m gateway ARGS...`, sent SIGINT by itself the moment it starts to import the module
# named first: a Ctrl-C landing exactly there, whatever the machine's speed.
_INTERRUPTED_AT = """
import os, runpy, signal, sys
at = sys.argv[1]
class InterruptAt:
    def find_spec(self, name, path=None, target=None):
        if name == at:
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, InterruptAt())
sys.argv = ["gateway", *sys.argv[2:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""

# Modules the command loads, in about the order it does; uuid and json load from orjson's own
# set-up (from its C code), where an interrupt crashed the interpreter.
_LOAD_POINTS = ["gateway.cli", "yaml", "gateway.config", "gateway.native", "gateway.eventlog", "uuid", "json",
                "orjson", "prometheus_client", "gateway.metrics", "lmdb", "gateway.eventlog.lmdb", "ctypes",
                "gateway.workers"]


@pytest.mark.parametrize("module", _LOAD_POINTS)
def test_ctrl_c_while_the_command_loads_its_modules_is_a_clean_stop(
        fake_upstream: FakeAgentServer, tmp_path: Path, module: str) -> None:
    """Ctrl-C a moment after starting the gateway lands while Python loads its modules. Raised into
    an import it was a traceback at best, and in orjson's module set-up the interpreter crashed
    (SIGSEGV, exit -11, seen in CI). The stop is now held until a handler takes it: a clean stop."""
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AT, module, "--port", str(free_port()), "--admin-port", "0",
         "--workers", "2", "--upstream", fake_upstream.url, "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Fatal" not in proc.stderr, proc.stderr[-3000:]


def test_subprocesses_run_the_tree_under_test(tmp_path: Path) -> None:
    """The tests' `python -m gateway` must import this tree, not an installed copy: run from a
    directory that is not the tree, Python would otherwise find whatever `gateway` its path holds
    (an editable install of another checkout), and the tests would pass or fail on the wrong code."""
    proc = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().is_relative_to(REPO), (proc.stdout, REPO)
