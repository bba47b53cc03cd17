"""Several gateway processes on one host: a supervisor and its workers.

One Python process uses one core. With ``workers: N`` the command starts N
copies of itself, each a full gateway sharing the log (one LMDB data directory on this host,
``gateway.eventlog.lmdb_shared``, or Redis),
all listening on the same port (SO_REUSEPORT: the kernel spreads connections);
worker i has the admin listener on ``admin.port + i``. The supervisor only
starts them, passes SIGTERM/SIGINT on, and starts a worker again when it dies
(its streams are taken over by the others meanwhile, as for any replica): a second later the
first time, later and later while it keeps dying young (``restart_delay``). A worker that cannot
start (``cannot_start``) stops the supervisor, as one gateway process would have exited.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("gateway.workers")

RESTART_DELAY = 1.0  # after a worker died, before it is started again; doubled while it keeps dying young
RESTART_DELAY_MAX = 30.0
UP_AFTER = 10.0  # a worker that lived this long was up: its death is not a crash loop
_TICK = 0.2
_PR_SET_PDEATHSIG = 1
# The exit statuses of gateway.cli: a config error, and a gateway that could not run (its storage
# could not be opened, its port not bound).
_EXIT_CONFIG = 2
_EXIT_RUNTIME = 1


def _stop_with_supervisor() -> None:
    """``preexec_fn``: the kernel sends the worker SIGTERM when its supervisor dies, however it dies
    (SIGKILL, the OOM killer), so no orphan keeps serving the port with no one to restart or stop it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    first: bool = True  # started with the supervisor, not started again after a death
    young_deaths: int = 0  # deaths in a row, each within UP_AFTER of its start
    restart_at: float | None = None  # dead: started again at this time


def restart_delay(young_deaths: int) -> float:
    """How long a dead worker waits before it is started again: RESTART_DELAY, doubled for each
    death in a row within UP_AFTER of its start (a crash loop), up to RESTART_DELAY_MAX."""
    return min(RESTART_DELAY * float(1 << min(max(young_deaths - 1, 0), 16)), RESTART_DELAY_MAX)


def cannot_start(exit_status: int, first: bool, lived: float) -> bool:
    """A death that starting the worker again will not mend: a config error, or a gateway that could
    not run on its first start (the port taken, the log not opened), as one process would exit."""
    return exit_status == _EXIT_CONFIG or (exit_status == _EXIT_RUNTIME and first and lived < UP_AFTER)


def supervise(argv: list[str], workers: int) -> int:
    """Run ``workers`` copies of the command line; returns the exit status for the supervisor."""
    stopping: int | None = None  # the signal to pass on, once one came
    told: set[int] = set()  # pids it was passed to
    failed = False  # stopping because a worker cannot start

    def pass_on() -> None:
        # Also called from the loop: a signal that came while a worker was being started
        # (inside Popen, or in the restart delay) reaches that worker once it is in ``crew``.
        assert stopping is not None
        for w in crew:
            if w.restart_at is None and w.proc.poll() is None and w.proc.pid not in told:
                told.add(w.proc.pid)
                w.proc.send_signal(stopping)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = signum
        pass_on()

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--worker-index", str(i)],
                                preexec_fn=_stop_with_supervisor)

    crew = [_Worker(i, spawn(i), time.monotonic()) for i in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers: %s", workers, ", ".join(str(w.proc.pid) for w in crew))
    while True:
        time.sleep(_TICK)
        if stopping is not None:
            pass_on()
            if all(w.restart_at is not None or w.proc.poll() is not None for w in crew):
                # A worker dead before the signal (and already logged) does not make the stop unclean.
                clean = all(w.proc.returncode in (0, -signal.SIGTERM, -signal.SIGINT) for w in crew
                            if w.proc.pid in told)
                return 0 if clean and not failed else 1
            continue
        now = time.monotonic()
        for w in crew:
            if w.restart_at is not None:
                if now >= w.restart_at:
                    w.proc, w.started, w.restart_at, w.first = spawn(w.index), time.monotonic(), None, False
                continue
            status = w.proc.poll()
            if status is None:
                continue
            lived = now - w.started
            if cannot_start(status, w.first, lived):
                log.error("worker %d (pid %d) could not start (exit status %d); stopping the others",
                          w.index, w.proc.pid, status)
                failed = True
                stop(signal.SIGTERM, None)
                break
            w.young_deaths = w.young_deaths + 1 if lived < UP_AFTER else 0
            delay = restart_delay(w.young_deaths)
            log.error("worker %d (pid %d) exited with %s after %.1fs; starting it again in %.1fs",
                      w.index, w.proc.pid, status, lived, delay)
            w.restart_at = now + delay
