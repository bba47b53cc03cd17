"""An LLM-free graph for bench/storm.py: emits ``n`` custom events of about ``pad`` + 29 bytes each,
as fast as the server takes them (``{"i": k, "of": n, "pad": "xx.."}``, like the fake upstream's)."""

import asyncio
from typing import Any

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict


class State(TypedDict, total=False):
    n: int
    pad: int


async def emit(state: State) -> dict[str, Any]:
    n = state.get("n", 2000)
    pad = "x" * state.get("pad", 171)
    write = get_stream_writer()
    for i in range(n):
        write({"i": i, "of": n, "pad": pad})
        if i % 64 == 63:
            await asyncio.sleep(0)  # let the server's loop run (other runs, the stream writer)
    return {}


_g = StateGraph(State)
_g.add_node("emit", emit)
_g.add_edge(START, "emit")
_g.add_edge("emit", END)
storm = _g.compile()
