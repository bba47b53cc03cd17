"""A real redis-server (Debian's) on a free 127.0.0.1 port, for the shared-log tests.

It persists like production should: an append-only file fsynced on every write,
and no eviction. ``restart`` stops it and starts it again on the same port and
directory, so it comes back from its AOF. With ``snapshots=True`` it keeps no AOF and
writes an RDB snapshot only when told (``SAVE``): killed, it comes back as of that
snapshot, as a Redis on its default (RDB) persistence does after a crash.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from tests.support.procs import die_with_parent, free_port, stop


class RedisServer:
    def __init__(self, binary: str = "redis-server", *, snapshots: bool = False) -> None:
        self.binary = shutil.which(binary) or binary
        self.snapshots = snapshots
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             *(("--appendonly", "no") if self.snapshots else ("--appendonly", "yes", "--appendfsync", "always")),
             "--save", "", "--maxmemory-policy", "noeviction",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer: {self.log_tail()}")

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: Redis dies without a word; what it acknowledged is in its AOF (fsynced always)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop, then start from the same AOF on the same port."""
        self.stop()
        self.start()

    def command(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
