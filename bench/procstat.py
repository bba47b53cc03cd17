"""CPU time of the processes a benchmark measures, read from /proc (all their threads counted)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the processes; one that is gone counts nothing."""
    user = system = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))
