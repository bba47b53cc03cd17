"""Deterministic, LLM-free graphs for exercising the gateway against a real Agent Server."""

import asyncio
import operator
from typing import Annotated, Any

from langchain_core.messages import AIMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import interrupt
from typing_extensions import TypedDict


class State(TypedDict, total=False):
    n: int
    delay: float
    # Reducers so each node appends instead of overwriting, which makes resumed
    # or duplicated steps visible in the final state.
    items: Annotated[list, operator.add]
    messages: Annotated[list, add_messages]


async def tick(state: State) -> dict[str, Any]:
    n = state.get("n", 3)
    delay = state.get("delay", 0.05)
    write = get_stream_writer()
    for i in range(n):
        write({"i": i, "of": n})
        # Async sleep keeps the server's event loop free, so many runs can tick at once.
        await asyncio.sleep(delay)
    return {"items": list(range(n)), "messages": [AIMessage(content=f"ticked {n} times")]}


def finish(state: State) -> dict[str, Any]:
    # A second node gives the stream a step boundary after the custom events.
    return {"items": ["done"]}


def boom(state: State) -> dict[str, Any]:
    write = get_stream_writer()
    for k in range(3):
        write({"before_boom": k})
    # Fails after emitting output, so clients see partial events followed by `error`.
    raise ValueError("boom: intentional failure")


def ask(state: State) -> dict[str, Any]:
    get_stream_writer()({"asking": True})
    answer = interrupt({"question": "continue?"})
    return {"items": [answer]}


_ticker = StateGraph(State)
_ticker.add_node("tick", tick)
_ticker.add_node("finish", finish)
_ticker.add_edge(START, "tick")
_ticker.add_edge("tick", "finish")
_ticker.add_edge("finish", END)
ticker = _ticker.compile()

_fail = StateGraph(State)
_fail.add_node("boom", boom)
_fail.add_edge(START, "boom")
_fail.add_edge("boom", END)
fail = _fail.compile()

_interrupt = StateGraph(State)
_interrupt.add_node("ask", ask)
_interrupt.add_edge(START, "ask")
_interrupt.add_edge("ask", END)
# The server supplies the checkpointer that interrupt() needs.
interrupt_graph = _interrupt.compile()

# The ticker as a subgraph: with `stream_subgraphs`, its events are named `<mode>|<namespace>`.
_nested = StateGraph(State)
_nested.add_node("child", ticker)
_nested.add_edge(START, "child")
_nested.add_edge("child", END)
nested = _nested.compile()


# --- the v3 thread session (client.threads.stream): which channels the graphs publish ------------
# langgraph's v3 stream carries values, messages, lifecycle and subgraphs by default; a graph
# module opts into more with stream_transformers(). The ticker's writes become `custom` events,
# and each tick is also published on a named channel (`custom:ticks`).
from langgraph.stream._types import StreamTransformer  # noqa: E402
from langgraph.stream.stream_channel import StreamChannel  # noqa: E402
from langgraph.stream.transformers import CustomTransformer, UpdatesTransformer  # noqa: E402


class TickNames(StreamTransformer):
    """Each ticker write, again on the named channel `ticks` (the wire's `custom:ticks`)."""

    required_stream_modes = ("custom",)

    def __init__(self, scope=()):
        super().__init__(scope)
        self._ch = StreamChannel("ticks")

    def init(self):
        return {"ticks": self._ch}

    def process(self, event):
        data = event["params"].get("data")
        if event["method"] == "custom" and isinstance(data, dict) and "i" in data:
            self._ch.push({"tick": data["i"]})
        return True


def stream_transformers():
    return [CustomTransformer, UpdatesTransformer, TickNames]

