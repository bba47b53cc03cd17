"""Several gateway processes on one host: a supervisor and its workers.

One Python process uses one core. With ``workers: N`` the command starts N
copies of itself, each a full gateway sharing the log (one LMDB data directory on this host,
``gateway.eventlog.lmdb_shared``, or Redis),
all listening on the same port (SO_REUSEPORT: the kernel spreads connections);
worker i has the admin listener on ``admin.port + i``. The supervisor only
starts them, passes SIGTERM/SIGINT on, and starts a worker again when it dies
(its streams are taken over by the others meanwhile, as for any replica).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger("gateway.workers")

RESTART_DELAY = 1.0  # after a worker died, before it is started again
_PR_SET_PDEATHSIG = 1


def _stop_with_supervisor() -> None:
    """``preexec_fn``: the kernel sends the worker SIGTERM when its supervisor dies, however it dies
    (SIGKILL, the OOM killer), so no orphan keeps serving the port with no one to restart or stop it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def supervise(argv: list[str], workers: int) -> int:
    """Run ``workers`` copies of the command line; returns the exit status for the supervisor."""
    stopping: int | None = None  # the signal to pass on, once one came
    told: set[int] = set()  # pids it was passed to
    config_error = False

    def pass_on() -> None:
        # Also called from the loop: a signal that came while a worker was being started
        # (inside Popen, or in the restart delay) reaches that worker once it is in ``procs``.
        assert stopping is not None
        for p in procs:
            if p.poll() is None and p.pid not in told:
                told.add(p.pid)
                p.send_signal(stopping)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = signum
        pass_on()

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--worker-index", str(i)],
                                preexec_fn=_stop_with_supervisor)

    procs = [spawn(i) for i in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers: %s", workers, ", ".join(str(p.pid) for p in procs))
    while True:
        time.sleep(0.2)
        if stopping is not None:
            pass_on()
            if all(p.poll() is not None for p in procs):
                # A worker dead before the signal (and already logged) does not make the stop unclean.
                clean = all(p.returncode in (0, -signal.SIGTERM, -signal.SIGINT) for p in procs if p.pid in told)
                return 0 if clean and not config_error else 1
            continue
        for i, p in enumerate(procs):
            if p.poll() is not None:
                if p.returncode == 2:  # a config error: starting it again will not help
                    config_error = True
                    stop(signal.SIGTERM, None)
                    break
                log.error("worker %d (pid %d) exited with %s; starting it again", i, p.pid, p.returncode)
                time.sleep(RESTART_DELAY)
                if stopping is not None:  # told to stop meanwhile: the dead one stays dead
                    break
                procs[i] = spawn(i)
