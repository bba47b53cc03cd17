"""The server processes fixtures start: free loopback ports, stopping them, and dying with the test run.

Server processes the fixtures start die with the test run, even when it is killed outright.

A fixture's teardown stops what it started, but a test run killed by a timeout never
tears down: without this, its redis-server, nginx, Prometheus and gateways would keep
running (and holding ports) long after.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGKILL to the child when the test process exits."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def refusing_port() -> socket.socket:
    """A loopback socket bound and not listening: connections to its port are refused, and no other
    process can take the port while it is open (close it to start a server there)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
