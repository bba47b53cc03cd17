"""Server processes the fixtures start die with the test run, even when it is killed outright.

A fixture's teardown stops what it started, but a test run killed by a timeout never
tears down: without this, its redis-server, nginx, Prometheus and gateways would keep
running (and holding ports) long after.
"""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGKILL to the child when the test process exits."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
