"""Shared fixtures: every one starts something real on 127.0.0.1 (port 0 or a free port)."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import shutil
import signal
import uuid
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import Gateway, Server
from gateway.config import build_config
from tests.fake_upstream import FakeAgentServer
from tests.support.langgraph_server import LangGraphServer
from tests.support.redis_server import RedisServer
from tests.support.procs import die_with_parent, free_port, tree_env

REPO = Path(__file__).resolve().parents[1]


def gateway_config(tmp_path: Path, upstreams: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A raw config tree for tests: ports 0, LMDB under tmp_path, fast health checks."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstreams": upstreams,
        "storage": {"path": str(tmp_path / "data"), "sweep_interval": "1h"},
        "shutdown_grace": 2,
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return raw


class RunningGateway:
    """An in-process gateway with its URLs and parts, for assertions."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.gw: Gateway = server.gateway
        self.url = "http://%s:%d" % server.addresses["main"]
        self.admin_url = "http://%s:%d" % server.addresses["admin"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB filesystem (tmpfs) for the test; skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def freeze_what_the_imports_made() -> Any:
    """What the imports allocated (aiohttp, the SDKs, hypothesis: most of the heap) is never garbage:
    frozen, a collection after each test looks only at what tests made (0.09 s a test less)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Any:
    """Collect after every test, so a leaked connection or task warns in the test that leaked it."""
    yield
    gc.collect()


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeAgentServer]:
    """The fault-injecting fake Agent Server (no resume support unless a run asks)."""
    server = await FakeAgentServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: start a gateway in this process from a raw config tree; stopped at teardown."""
    started: list[Server] = []

    async def start(raw: dict[str, Any]) -> RunningGateway:
        server = Server(Gateway(build_config(raw), CollectorRegistry()))
        await server.start()
        started.append(server)
        return RunningGateway(server)

    yield start
    for server in reversed(started):
        await stop_or_tell(server)


async def stop_or_tell(server: Server, timeout: float = 60.0) -> None:
    """Stop a gateway; one that does not stop in time fails the test with every task's stack, so a
    hang at shutdown says where it waits instead of running into the test timeout silently."""
    try:
        await asyncio.wait_for(server.stop(), timeout)
    except TimeoutError:
        out = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=out)
        pytest.fail(f"the gateway did not stop within {timeout:g}s; tasks:\n{out.getvalue()}")


@pytest.fixture(params=["lmdb", "redis"])
async def gateway(make_gateway: Callable[..., Awaitable[RunningGateway]], fake_upstream: FakeAgentServer,
                  tmp_path: Path, request: pytest.FixtureRequest) -> RunningGateway:
    """A gateway in front of the fake upstream, on each log backend (the same tests, both ways)."""
    raw = gateway_config(tmp_path, {"default": {"urls": [fake_upstream.url]}})
    if request.param == "redis":
        raw["storage"] = request.getfixturevalue("redis_storage")
    return await make_gateway(raw)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


@pytest.fixture(scope="session")
def langgraph_server() -> Any:
    """A real `langgraph dev` server (examples/agent), started once per test session."""
    server = LangGraphServer().start()
    yield server
    server.stop()


@pytest.fixture
async def lg_gateway(make_gateway: Callable[..., Awaitable[RunningGateway]], langgraph_server: LangGraphServer,
                     tmp_path: Path) -> RunningGateway:
    """A gateway in front of the real LangGraph server."""
    return await make_gateway(gateway_config(tmp_path, {"default": {"urls": [langgraph_server.url]}}))


class GatewayProcess:
    """The gateway as a subprocess (`python -m gateway`), for signal and restart tests."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(self.port), "--admin-port", str(self.admin_port),
                 *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=tree_env(),
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not listen:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def freeze(self) -> None:
        """SIGSTOP: the process stalls (a long GC pause, a VM frozen) without dying."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def gateway_process(tmp_path: Path) -> Any:
    """Factory for subprocess gateways; all are killed at teardown."""
    procs: list[GatewayProcess] = []

    def make(*args: str) -> GatewayProcess:
        p = GatewayProcess(list(args), tmp_path / f"gateway-{len(procs)}.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def redis_server() -> Any:
    """A real redis-server (AOF fsynced on every write, no eviction), started once per session.

    Tests keep apart by prefix (``redis_storage``); one that restarts Redis uses ``own_redis``.
    """
    yield from _redis()


@pytest.fixture
def own_redis() -> Any:
    """A redis-server of this test's own, for tests that stop, restart or flush it."""
    yield from _redis()


def _redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (tests/run.sh installs it with apt-get)")
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(params=["redis", "lmdb"])
def shared_storage(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The storage section of gateway processes sharing one log: a Redis, or one LMDB data directory
    on this host (what ``workers: N`` does with the embedded log)."""
    if request.param == "redis":
        storage: dict[str, Any] = request.getfixturevalue("redis_storage")
        return storage
    return {"backend": "lmdb", "shared": "true", "path": str(tmp_path / "shared-log"), "lease_ttl": "1500ms"}


@pytest.fixture
def redis_storage(redis_server: RedisServer) -> dict[str, Any]:
    """The storage section for a gateway on the shared Redis, under a prefix of this test's own."""
    return {"backend": "redis", "redis_url": redis_server.url, "redis_prefix": f"t{uuid.uuid4().hex[:10]}",
            "lease_ttl": "1500ms"}


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl's command line: Python cannot make one)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
