"""Several gateway processes on one host: a supervisor and its workers.

One Python process uses one core. With ``workers: N`` the command starts N
copies of itself, each a full gateway sharing the log (one LMDB data directory on this host,
``gateway.eventlog.lmdb_shared``, or Redis),
all listening on the same port (SO_REUSEPORT: the kernel spreads connections);
worker i has the admin listener on ``admin.port + i``. The supervisor only
starts them, passes SIGTERM/SIGINT on, and starts a worker again when it dies
(its streams are taken over by the others meanwhile, as for any replica): a second later the
first time, later and later while it keeps dying young (``restart_delay``). A worker that cannot
start (``cannot_start``: every try failed) stops the supervisor, as one gateway process would have
exited. A worker still running ``STOP_MARGIN`` after its own shutdown grace is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from gateway import stopsignals

log = logging.getLogger("gateway.workers")

RESTART_DELAY = 1.0  # after a worker died, before it is started again; doubled while it keeps dying young
RESTART_DELAY_MAX = 30.0
UP_AFTER = 10.0  # a worker that lived this long was up: its death is not a crash loop
# Starts in a row that failed (exit status 1 within UP_AFTER), from the first on, before a worker is
# taken to be unable to start: one failure may pass (its admin port held for a moment by another
# program, storage busy), three in a row, 1 s and 2 s apart, are what the setup makes of every start.
START_TRIES = 3
STOP_MARGIN = 5.0  # past a worker's shutdown grace, before SIGKILL
_TICK = 0.2
_PR_SET_PDEATHSIG = 1
# A gateway process's exit statuses (gateway.cli returns them; the supervisor reads its workers'):
# a config error, and a gateway that could not run (its storage not opened, its port not bound).
EXIT_CONFIG = 2
EXIT_RUNTIME = 1
_CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)


def restart_delay(young_deaths: int) -> float:
    """How long a dead worker waits before it is started again: RESTART_DELAY, doubled for each
    death in a row within UP_AFTER of its start (a crash loop), up to RESTART_DELAY_MAX."""
    return min(RESTART_DELAY * float(1 << min(max(young_deaths - 1, 0), 16)), RESTART_DELAY_MAX)


def failed_start(exit_status: int, lived: float) -> bool:
    """A death that looks like a gateway that could not run (the port taken, the log not opened)."""
    return exit_status == EXIT_RUNTIME and lived < UP_AFTER


def cannot_start(exit_status: int, failed_starts: int, restarted: bool) -> bool:
    """A death that starting the worker again will not mend: a config error on the first start, or a
    gateway that could not run on any of its first ``START_TRIES`` starts, as one process would exit.
    One failed start alone is not that: it stopped every worker, the ones serving too, for what a
    second try mends. Nor is a config error on a restart: the config was checked before any worker
    started, so the file was edited since, and the workers serving on what they loaded serve on
    while this one is tried again (``restart_delay``), until the file is mended."""
    if exit_status == EXIT_CONFIG:
        return not restarted
    return exit_status == EXIT_RUNTIME and failed_starts >= START_TRIES


class _StopWithParent:
    """``preexec_fn``: the kernel sends the worker SIGTERM when its supervisor dies, however it dies
    (SIGKILL, the OOM killer), so no orphan keeps serving the port with no one to restart or stop it.
    A supervisor that died between the fork and the prctl is seen by the parent pid having changed.

    The worker hears a stop from its supervisor only, as SIGTERM: SIGINT is ignored until the
    gateway's loop handles it. Ctrl-C sends SIGINT to the whole process group, and one reaching a
    worker still loading its modules raised KeyboardInterrupt there (a traceback, for a plain stop)."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child

    def __call__(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept across exec
        if self.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != self.parent:
            os._exit(EXIT_RUNTIME)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None  # None: not running (never started, or dead and waiting)
    started: float = 0.0
    first: bool = True  # every start so far failed (or none ended yet): it may be unable to start at all
    failed_starts: int = 0  # of those, while ``first``
    young_deaths: int = 0  # deaths in a row, each within UP_AFTER of its start
    restart_at: float | None = None  # dead: started again at this time


class Supervisor:
    """Starts the workers, passes a stop on, starts dead ones again; ``run`` returns its exit status."""

    def __init__(self, argv: list[str], workers: int, grace: float) -> None:
        self.argv = argv
        self.crew = [_Worker(i, None) for i in range(workers)]
        self.grace = grace
        self.stopping: int | None = None  # the signal that came (SIGTERM or SIGINT): the workers are stopping
        self.stop_deadline = 0.0
        self.failed = False  # stopping because a worker cannot start, or did not stop
        self.told: set[int] = set()  # pids the stop was passed to
        self.preexec = _StopWithParent()

    def _signalled(self, signum: int, _frame: FrameType | None) -> None:
        # Only noted: the loop passes it on. Calling Popen.poll here could race the loop's own
        # poll (the handler runs between its bytecodes) and signal a pid already reaped.
        if self.stopping is None:
            self.stopping = signum

    def run(self) -> int:
        for sig in stopsignals.STOP_SIGNALS:
            signal.signal(sig, self._signalled)
        stopsignals.release()  # one that came while the command loaded is noted now
        for w in self.crew:
            if self.stopping is not None:  # a signal came, or a worker cannot start
                break
            self._start(w)
        log.info("supervising %d workers: %s", len(self.crew),
                 ", ".join(str(w.proc.pid) for w in self.crew if w.proc is not None))
        while True:
            if self.stopping is not None:
                status = self._stop_step()
                if status is not None:
                    return status
            else:
                self._watch()
            time.sleep(_TICK)

    def _start(self, w: _Worker) -> bool:
        try:
            w.proc = subprocess.Popen([sys.executable, "-m", "gateway", *self.argv, "--worker-index", str(w.index)],
                                      preexec_fn=self.preexec)
        except OSError as exc:  # fork failed (memory, process limit)
            w.proc = None
            if w.first:  # a start that failed, as one that exits 1 at once
                w.failed_starts += 1
                if w.failed_starts >= START_TRIES:
                    log.error("worker %d could not be started (%s), %d tries in a row; stopping the others",
                              w.index, exc, w.failed_starts)
                    self._fail()
                    return False
            w.young_deaths += 1
            delay = restart_delay(w.young_deaths)
            w.restart_at = time.monotonic() + delay
            log.error("worker %d could not be started (%s); trying again in %.1fs", w.index, exc, delay)
            return False
        w.started, w.restart_at = time.monotonic(), None
        return True

    def _fail(self) -> None:
        self.failed = True
        if self.stopping is None:
            self.stopping = signal.SIGTERM

    def _watch(self) -> None:
        now = time.monotonic()
        for w in self.crew:
            if self.stopping is not None:
                return  # a signal came meanwhile: nothing more is started
            if w.proc is None:
                if w.restart_at is not None and now >= w.restart_at:
                    self._start(w)
                continue
            status = w.proc.poll()
            if status is None:
                continue
            lived = now - w.started
            w.proc = None
            restarted = w.young_deaths > 0 or not w.first  # this start was not the worker's first
            if w.first and failed_start(status, lived):
                w.failed_starts += 1
            else:
                w.first = False  # it ran: a death from now on is a crash, started again
            if cannot_start(status, w.failed_starts if w.first else 0, restarted):
                log.error("worker %d could not start (exit status %d%s; its own error is above); "
                          "stopping the others", w.index, status,
                          f", {w.failed_starts} tries in a row" if status == EXIT_RUNTIME else "")
                self._fail()
                return
            w.young_deaths = w.young_deaths + 1 if lived < UP_AFTER else 0
            delay = restart_delay(w.young_deaths)
            w.restart_at = now + delay
            log.error("worker %d exited with %s after %.1fs%s; starting it again in %.1fs",
                      w.index, status, lived,
                      " (its config no longer loads: the file was edited since the gateway started)"
                      if status == EXIT_CONFIG else "", delay)

    def _stop_step(self) -> int | None:
        """Pass the stop on to every running worker not yet told; the exit status once all are gone."""
        assert self.stopping is not None
        now = time.monotonic()
        if not self.told:
            self.stop_deadline = now + self.grace + STOP_MARGIN
        running = [w.proc for w in self.crew if w.proc is not None and w.proc.poll() is None]
        for p in running:
            if p.pid not in self.told:
                self.told.add(p.pid)
                p.send_signal(signal.SIGTERM)  # SIGINT or SIGTERM came: the workers hear SIGTERM (_StopWithParent)
        if not running:
            # A worker dead before the stop (and already logged) does not make it unclean.
            told = [w.proc for w in self.crew if w.proc is not None and w.proc.pid in self.told]
            clean = all(p.returncode in _CLEAN for p in told)
            return 0 if clean and not self.failed else 1
        if now >= self.stop_deadline:
            for p in running:
                log.error("worker pid %d still running %.0fs after it was told to stop; killing it",
                          p.pid, self.grace + STOP_MARGIN)
                p.kill()
            self.failed = True
            self.stop_deadline = float("inf")
        return None


def supervise(argv: list[str], workers: int, grace: float) -> int:
    """Run ``workers`` copies of the command line; returns the exit status for the supervisor."""
    return Supervisor(argv, workers, grace).run()
