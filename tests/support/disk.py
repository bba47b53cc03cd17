"""A disk that fills: what the full-disk tests write to leave a filesystem with little room."""

from __future__ import annotations

import os
from pathlib import Path


def fill(fs: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``fs``."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave)
        while left > 0:
            n = f.write(chunk[: min(len(chunk), left)])
            left -= n
    return filler
