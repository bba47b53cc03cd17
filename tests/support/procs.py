"""The server processes fixtures start: free loopback ports, stopping them, and dying with the test run.

Server processes the fixtures start die with the test run, even when it is killed outright.

A fixture's teardown stops what it started, but a test run killed by a timeout never
tears down: without this, its redis-server, nginx, Prometheus and gateways would keep
running (and holding ports) long after.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

_PR_SET_PDEATHSIG = 1

TREE = Path(__file__).resolve().parents[2]


def tree_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for every Python subprocess the tests start (``python -m gateway``, probes).

    ``TREE`` first on PYTHONPATH: a child started in another directory (a test's tmp_path) would
    otherwise import whatever ``gateway`` its path holds, such as an editable install of another
    checkout, and the test would judge that code instead of this tree. Workers inherit it.
    """
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(TREE) if not rest else os.pathsep.join([str(TREE), rest])
    return env


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGKILL to the child when the test process exits."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def refusing_port() -> socket.socket:
    """A loopback socket bound and not listening: connections to its port are refused, and no other
    process can take the port while it is open (close it to start a server there)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


# free_port's ports: below the kernel's ephemeral range (32768 up), a block of its own per test worker.
_PORTS_FROM, _PORTS_PER_WORKER = 10_000, 2_000


def free_port() -> int:
    """A loopback port nothing listens on right now, for a server started on it a moment later (or
    restarted on the port it had). From the kernel's ephemeral range, such a port could be given to
    another server binding port 0 in that moment, or chosen by another test worker: the second
    server failed to start, or, as gateways on a shared log bind with SO_REUSEPORT, two gateways of
    two tests shared one port's connections. So it comes from a block of this worker's own, below
    that range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = _PORTS_FROM + _PORTS_PER_WORKER * (int(worker) % 10 if worker.isdigit() else 0)
    for _ in range(200):
        port = random.randrange(start, start + _PORTS_PER_WORKER)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {start}-{start + _PORTS_PER_WORKER - 1}")


def stop(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL after ``grace`` seconds: a server that will not stop is stopped anyway."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
