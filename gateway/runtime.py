"""Process-wide tuning of the Python runtime for a long-running server, applied once started.

Two costs that every event paid, found with py-spy and strace under token streaming:

- CPython's cyclic collector walked every object start-up made, every few hundred streams.
- asyncio reads each socket with ``recv(256 KiB)`` and shrinks the result. glibc serves a
  request that size with a fresh mapping (or grows and trims the heap) and, because the shrink
  goes through ``realloc``, never raises its threshold as it does for ``free``: every read cost
  an ``mmap``, ``mremap``, ``munmap`` and a page fault (about 12 us on a 250-byte token, as much
  as the rest of the read path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

logger = logging.getLogger("gateway.runtime")

GC_THRESHOLDS = (50_000, 50, 100)

# glibc's mallopt parameters (malloc.h) and the values the gateway sets: requests below 1 MiB
# come from the heap, and the heap keeps up to 16 MiB free at its top instead of trimming it.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 16 << 20


def tune() -> None:
    tune_gc()
    tune_malloc()


def tune_gc() -> None:
    """Once started: what start-up allocated (modules, config, the app) is never collected, so it
    is left out of every collection from now on; collections are rarer (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_malloc() -> bool:
    """Fixed glibc thresholds, so that a socket read's large, short-lived buffer is taken from and
    given back to the heap without a system call. False where the C library is not glibc (musl
    has no such thresholds; nothing to do)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError) as exc:
        logger.warning("could not tune malloc: %s", exc)
        return False
    if not ok:
        logger.warning("mallopt refused the gateway's thresholds; socket reads cost more")
    return ok
