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

import logging
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger("gateway.workers")

RESTART_DELAY = 1.0  # after a worker died, before it is started again


def supervise(argv: list[str], workers: int) -> int:
    """Run ``workers`` copies of the command line; returns the exit status for the supervisor."""
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--worker-index", str(i)])

    procs = [spawn(i) for i in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers: %s", workers, ", ".join(str(p.pid) for p in procs))
    while True:
        time.sleep(0.2)
        alive = [p.poll() is None for p in procs]
        if stopping:
            if not any(alive):
                return 0 if all(p.returncode in (0, -signal.SIGTERM, -signal.SIGINT) for p in procs) else 1
            continue
        for i, p in enumerate(procs):
            if p.poll() is not None:
                if p.returncode == 2:  # a config error: starting it again will not help
                    stop(signal.SIGTERM, None)
                    break
                log.error("worker %d (pid %d) exited with %s; starting it again", i, p.pid, p.returncode)
                time.sleep(RESTART_DELAY)
                procs[i] = spawn(i)
