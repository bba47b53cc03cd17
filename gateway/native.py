"""Whether the hot loops run in C (``gateway/_native.c``) or in Python.

``pip install`` builds the extension when a C compiler is at hand (``setup.py``); without one, or
with ``GATEWAY_PURE_PYTHON=1`` in the environment, the Python twins in ``gateway.sse``,
``gateway.eventlog.records`` and ``gateway.streamclient`` run instead. Both give the same bytes
(``tests/test_native.py``).
"""

from __future__ import annotations

import os

try:
    from gateway._native import clone, dechunk, decode_record, encode_events, frame_entries, record_page, split_events
except ImportError:  # not built: ON stays False and the names are never used
    ON = False
else:
    ON = os.environ.get("GATEWAY_PURE_PYTHON", "") in ("", "0")

__all__ = ["ON", "clone", "dechunk", "decode_record", "encode_events", "frame_entries", "record_page", "split_events"]
