"""Agent Stream Gateway: durable, resumable SSE in front of LangGraph Agent Servers."""

__version__ = "0.1.0"
