"""A real Prometheus (Debian's) on a free 127.0.0.1 port, scraping gateways' admin listeners every
second, evaluating the shipped alert rules every second too."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from tests.support.procs import die_with_parent, stop

ALERTS = Path(__file__).resolve().parents[2] / "prometheus" / "alerts.yaml"


class PrometheusServer:
    def __init__(self, *targets: str, binary: str = "prometheus") -> None:
        self.targets = targets
        self.binary = shutil.which(binary) or binary
        self.dir = Path(tempfile.mkdtemp(prefix="gw-prometheus-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        shutil.copy(ALERTS, self.dir / "alerts.yaml")
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [alerts.yaml]\n"
            "scrape_configs:\n  - job_name: agent-gateway\n"
            f"    static_configs:\n      - targets: {list(targets)!r}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        self._log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self._log, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prometheus did not get ready: {self.log_tail()}")

    def wait_for_target(self, timeout: float = 30.0) -> None:
        """Until every gateway has been scraped once (target discovery takes a few seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = {r["metric"]["instance"] for r in self.query('up{job="agent-gateway"} == 1')}
            if up >= set(self.targets):
                return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus never scraped the gateway: {self.api('targets')} {self.log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The alerts of rule ``name`` pending or firing now, with their labels and ``state``."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def query(self, expr: str) -> list[Any]:
        result: list[Any] = self.api("query", query=expr)["result"]
        return result

    def log_tail(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        stop(self.proc)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
