"""Run a real `langgraph dev` server on a free 127.0.0.1 port for tests and manual probing.

Usage in pytest:

    @pytest.fixture(scope="session")
    def upstream():
        server = LangGraphServer().start()
        yield server
        server.stop()

Manual: `python -m tests.support.langgraph_server` prints the URL and runs until Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from tests.support.procs import die_with_parent, free_port

EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "agent"


@dataclass
class LangGraphServer:
    app_dir: Path = EXAMPLE_APP
    port: int = 0  # 0 = pick a free one
    startup_timeout: float = 90.0
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "langgraph-dev.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "<no log>"

    def start(self) -> "LangGraphServer":
        if self.proc is not None:
            raise RuntimeError("already started")
        # A copy keeps `.langgraph_api/` state out of the repo and gives each server a clean slate.
        self.workdir = Path(tempfile.mkdtemp(prefix="langgraph-dev-"))
        app = self.workdir / "app"
        shutil.copytree(self.app_dir, app, ignore=shutil.ignore_patterns(".langgraph_api", "__pycache__"))
        if not self.port:
            self.port = free_port()
        self._log_file = open(self.log_path, "wb")
        # Own session so stop() can kill the whole tree (the CLI spawns children).
        self.proc = subprocess.Popen(self._command(), cwd=app, env=self._env(), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self) -> list[str]:
        cli = Path(sys.executable).parent / "langgraph"
        return [str(cli), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(self.port),
                # The dev default is 1 job per worker, which would serialise all runs server-wide.
                "--n-jobs-per-worker", "10"]

    @staticmethod
    def _env() -> dict[str, str]:
        return dict(os.environ, LANGSMITH_TRACING="false", LANGCHAIN_TRACING_V2="false",
                    LANGGRAPH_CLI_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")

    def _wait_ready(self) -> None:
        assert self.proc is not None, "server not started"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"langgraph dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            log = self.log_path.read_text(errors="replace")
            # `langgraph dev` silently moves to a random port when ours is taken.
            if f"Port {self.port} is already in use" in log:
                raise RuntimeError(f"port {self.port} was taken; langgraph dev switched ports:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/ok", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"langgraph dev not ready on {self.url} after {self.startup_timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole server: nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        self.proc = None

    def restart_empty(self) -> None:
        """Start it again on the same port with none of its state (killed before it could save any,
        or a new replica): threads and runs it had are gone."""
        self.kill()
        assert self.workdir is not None
        shutil.rmtree(self.workdir / "app" / ".langgraph_api", ignore_errors=True)
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        cmd = self._command()
        self.proc = subprocess.Popen(cmd, cwd=self.workdir / "app", env=self._env(), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self._wait_ready()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout)
                except ProcessLookupError:
                    pass
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None and not os.environ.get("KEEP_LANGGRAPH_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LangGraphServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    # Turn SIGTERM (e.g. from `timeout`) into a clean stop so the server is not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = LangGraphServer(port=port).start()
    print(server.url, flush=True)
    print(f"log: {server.log_path}", file=sys.stderr, flush=True)
    assert server.proc is not None
    try:
        while server.proc.poll() is None:
            time.sleep(1)
        print(f"server exited:\n{server.log_tail()}", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
