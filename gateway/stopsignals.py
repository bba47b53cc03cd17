"""The signals that stop the gateway, SIGTERM and SIGINT (Ctrl-C): held while the command loads,
delivered once the process that runs has its handler for them.

An interrupt raised into an import is not a clean stop: a traceback at best, and orjson's module
set-up crashes the interpreter (SIGSEGV) when KeyboardInterrupt lands in it. Held (blocked), a
signal stays pending and is handled the moment it is released: none is lost, none lands mid-import.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release() -> None:
    """Called once this process's handler is in place (the supervisor's, the loop's, the tools')."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
