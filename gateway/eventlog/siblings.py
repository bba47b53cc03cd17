"""The gateway processes sharing one LMDB data directory on this host: which are alive, and a
datagram channel between them.

Each process holds an exclusive ``flock`` on its own file in ``<data>/workers/`` for as long as it
lives (the kernel lets go of it when the process dies, SIGKILL included) and touches the file every
third of ``lease_ttl``: a process whose lock is free is dead, one whose file is older than
``lease_ttl`` is stalled (frozen, or its loop stuck), and either loses its streams to another.

Messages go over Unix datagram sockets in the abstract namespace (nothing on disk to clean up,
no path-length limit), named after the data directory and the process. A send never waits: when a
sibling's queue is full the message is dropped, and the sibling is owed a ``resync``: sent as soon
as it fits, it makes every follower there catch up from the log, so nothing is lost, only late.
What is not in the log (this process's follower counts, the cancels its clients asked for) follows
the ``resync`` again whole (``restate``): a dropped message of those is made up for too. It is also
sent whole to every sibling met (new, or back after it looked dead and was forgotten), and to all
of them by a process whose loop stood still long enough to have been taken for dead (``reintroduce``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

log = logging.getLogger("gateway.eventlog")

FREE = "-"  # a lease nobody holds: its stream is open, its last owner let it go (stopped)
_RECV_BYTES = 1 << 20
_SOCKET_BUFFER = 4 << 20  # asked for; the kernel caps it (net.core.[rw]mem_max)

Message = list[Any]  # [kind, sender, ...]: orjson on the wire


class Siblings:
    def __init__(self, path: Path, ttl: float, on_message: Callable[[str, Message], None],
                 on_gone: Callable[[str], None], restate: Callable[[], Iterator[Message]] = lambda: iter(())) -> None:
        self.dir = path / "workers"
        self.me = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._ns = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
        self._ttl = ttl
        self._on_message = on_message
        self._on_gone = on_gone
        self._restate = restate  # the messages that follow a resync: this process's state, whole
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.peers: set[str] = set()
        self._owed: set[str] = set()  # a message to them was dropped: they get a resync
        # A state going to a sibling a datagram at a time, as its queue takes them: the rest of it,
        # and the datagram that found the queue full.
        self._stating: dict[str, tuple[Iterator[Message], bytes | None]] = {}

    # --- this process ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Bound before this process is seen: a sibling that finds its file and sends to it must not
        # be refused (and take it for gone).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        sock.bind(self._address(self.me))
        sock.setblocking(False)
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)
        # Locked under a temporary name, then renamed: nobody ever sees this process's file unlocked
        # (and takes it for a dead one's).
        tmp = self.dir / f".{self.me}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self._lock_path(self.me))
        self._lock_fd = fd
        self.scan()

    def stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self._lock_path(self.me).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def beat(self) -> None:
        """This process is alive and its loop turns."""
        with contextlib.suppress(OSError):
            os.utime(self._lock_path(self.me))

    # --- the others ----------------------------------------------------------------------------

    def alive(self, who: str) -> bool:
        """Whether ``who`` holds its lock and touched its file within ``lease_ttl`` (thread-safe)."""
        if who == self.me:
            return True
        if who == FREE or "/" in who or who.startswith("."):
            return False
        path = self._lock_path(who)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return time.time() - os.fstat(fd).st_mtime < self._ttl  # held: alive, unless stalled
            with contextlib.suppress(OSError):  # free: it died; its file goes
                path.unlink()
            return False
        finally:
            os.close(fd)

    def scan(self) -> set[str]:
        """The live siblings now (a dead one's lock file is removed on the way)."""
        found = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                name = entry.name
                if name.endswith(".lock") and not name.startswith("."):
                    who = name[:-5]
                    if who != self.me and self.alive(who):
                        found.add(who)
        for gone in self.peers - found:
            self._gone(gone)
        met, self.peers = found - self.peers, found
        for who in met:
            self.state_to(who)
        return found

    def send(self, who: str, message: Message) -> bool:
        return self._send(who, orjson.dumps(message))

    def broadcast(self, message: Message) -> None:
        if not self.peers:
            return
        data = orjson.dumps(message)
        for who in list(self.peers):
            self._send(who, data)

    def settle(self) -> None:
        """Send the resyncs owed (called every beat, and when a send failed), each followed by what
        this process states whole (``restate``): any message of it that was dropped is in there."""
        for who in list(self._owed):
            self._owed.discard(who)
            if self.send(who, ["resync", self.me]):
                self.state_to(who)

    def reintroduce(self) -> None:
        """This process may have been taken for dead (its loop stood still): its state goes to every
        sibling again, and one that forgot it meets it again."""
        for who in list(self.peers):
            self.state_to(who)

    def state_to(self, who: str) -> None:
        """This process's whole state (``restate``) to ``who``, in as many datagrams as it takes. A
        state may be longer than the sibling's queue: what does not fit goes when it has room (each
        part is made as it goes, so it says the counts of then), never dropped and started over."""
        self._stating[who] = (self._restate(), None)
        self._state_on(who)

    def _state_on(self, who: str) -> None:
        stating = self._stating.pop(who, None)
        if stating is None or self._sock is None:
            return
        parts, held = stating
        while True:
            data = held
            if data is None:
                message = next(parts, None)
                if message is None:
                    return
                data = orjson.dumps(message)
            held = None
            try:
                self._sock.sendto(data, self._address(who))
            except BlockingIOError:  # its queue is full: the rest when it has read some
                self._stating[who] = (parts, data)
                if self._loop is not None:
                    self._loop.call_later(0.02, self._state_on, who)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                self._gone(who)
                return
            except OSError as exc:  # never out of the beat (EMSGSIZE included): a resync says it all again
                log.warning("state to gateway process %s failed: %s", who, exc)
                self._owed.add(who)
                return

    def _send(self, who: str, data: bytes) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto(data, self._address(who))
            return True
        except BlockingIOError:
            if who not in self._owed:
                self._owed.add(who)
                if self._loop is not None:
                    self._loop.call_later(0.05, self.settle)
        except (ConnectionRefusedError, FileNotFoundError):
            self._gone(who)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise  # a message too big for one datagram is the sender's to split
            log.warning("message to gateway process %s failed: %s", who, exc)
            self._owed.add(who)
        return False

    def _gone(self, who: str) -> None:
        self._stating.pop(who, None)
        self.peers.discard(who)
        self._owed.discard(who)
        self._on_gone(who)

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading from sibling gateway processes failed: %s", exc)
                return
            try:
                message = orjson.loads(data)
                sender = message[1]
            except (orjson.JSONDecodeError, IndexError, TypeError, KeyError):
                log.warning("a malformed message from a sibling gateway process was ignored")
                continue
            met = sender not in self.peers and sender != self.me  # new, or back after it looked dead
            if met:
                self.peers.add(sender)
            try:
                self._on_message(sender, message)
            except Exception:
                log.exception("handling a message from gateway process %s failed", sender)
            if met:
                # After its message: a sender that died since it sent it is found gone here (its
                # state refused), and what its message left behind (follower counts) goes with it.
                self.state_to(sender)
            sock = self._sock

    def _lock_path(self, who: str) -> Path:
        return self.dir / f"{who}.lock"

    def _address(self, who: str) -> bytes:
        return f"\0agw.{self._ns}.{who}".encode()
