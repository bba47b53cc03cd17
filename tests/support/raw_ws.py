"""A WebSocket opened by hand over a plain TCP connection, to send frames no client library sends
(a close without a status code, a message in fragments, a frame of any size)."""

from __future__ import annotations

import asyncio
import base64
import os


async def raw_websocket(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The connection once the server switched protocols."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A frame as a client sends it (masked; the mask is zero, so the payload reads as it is)."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16
                                              else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
    return bytes([(0x80 if fin else 0) | opcode]) + size + b"\x00" * 4 + payload


async def server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame the server sent (unmasked): its opcode and payload."""
    head = await reader.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(n)
