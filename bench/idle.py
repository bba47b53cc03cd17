#!/usr/bin/env python3
"""Idle-stream memory benchmark: what N open, idle streams cost the gateway process, and whether
that stays flat over a soak with heartbeats flowing.

    .venv/bin/python bench/idle.py                                   # 2,000 idle streams, 10-minute soak
    .venv/bin/python bench/idle.py --streams 200 --soak 60           # ~2 minute harness check
    .venv/bin/python bench/idle.py --streams 2000 --soak 600 --json idle.json

Three processes besides this one, all started and stopped here (by PID):

- the upstream: the project's fake Agent Server (``tests/fake_upstream.py``), sending
  ``: heartbeat`` comments on every idle stream every ``--heartbeat`` seconds;
- the gateway: ``python -m gateway --config X.yaml`` (LMDB, durability fsync, 127.0.0.1, free ports,
  ``streams.heartbeat`` = ``--heartbeat``);
- the client: one aiohttp process that opens the streams through the gateway and holds each one,
  reading its heartbeats. Its own memory is not measured.

The streams are a mix (``--thread-share``, default 0.5): run streams, ``POST
/threads/{tid}/runs/stream`` of a run that sends its ``metadata`` event and then stays idle
(``input: {n: 1, delay: 1e9}``), and thread streams, ``GET /threads/{tid}/stream`` of a thread
created first (``POST /threads``) with nothing running. Every stream has its own thread id, so each is one client connection, one
follower, one capture (ingest task) and one upstream leg in the gateway.

The gateway's VmRSS, RssAnon and RssFile (``/proc/PID/status``; the LMDB map counts as file) are
sampled at start (ready, nothing open), with half the streams open, with all open (after two
heartbeat periods, so every stream has carried heartbeats), then every 30 s over ``--soak``
seconds, and once more after the client closed everything. Reported: KiB per idle stream,
((RSS with N open) - (RSS at start)) / N, total and anon; the marginal cost of the second half;
and the least-squares slope over the soak in KiB/min.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.ports import free_port, wait_port  # noqa: E402  (idle_alloc.py imports them from here too)

PY = sys.executable
SAMPLE_EVERY = 30.0
OPEN_CONCURRENCY = 16  # streams being opened at once by the client (keeps the load light)


class BenchError(RuntimeError):
    pass


# --- processes -------------------------------------------------------------------------------------





def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(admin_port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"gateway exited with {proc.returncode}")
        try:
            if http_get(f"http://127.0.0.1:{admin_port}/readyz", 1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise BenchError("gateway not ready")


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    """SIGTERM this one process (by its PID), then SIGKILL if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_upstream(work: Path, port: int, heartbeat: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--role", "upstream", "--port", str(port),
                             "--heartbeat", str(heartbeat)], cwd=REPO,
                            stdout=open(work / "upstream.log", "wb"), stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


def gateway_config(work: Path, port: int, admin: int, upstream: int, heartbeat: float) -> Path:
    text = "\n".join([
        f"listen: {{host: 127.0.0.1, port: {port}}}", f"admin: {{host: 127.0.0.1, port: {admin}}}",
        "log_level: warning",
        "upstreams:", "  default:", f"    urls: [http://127.0.0.1:{upstream}]",
        "    max_streams: 20000", "    max_connections: 20000",
        "clients: {backlog: 4096, max_connections: 20000}",
        "storage:", "  backend: lmdb", "  durability: fsync", f"  path: {work / 'data'}",
        f"streams: {{heartbeat: {heartbeat:g}s}}", ""])
    path = work / "gateway.yaml"
    path.write_text(text)
    return path


class Client:
    """The client process (``--role client``), driven line by line over its stdin/stdout."""

    def __init__(self, url: str, heartbeat: float, thread_share: float, work: Path) -> None:
        self.proc = subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "--role", "client", "--url", url, "--heartbeat", str(heartbeat),
             "--thread-share", str(thread_share)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(work / "client.log", "wb"), text=True)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"client exited ({self.proc.poll()}) during {command!r}")
        return json.loads(line)


# --- measuring -------------------------------------------------------------------------------------

def mem(pid: int) -> dict[str, int]:
    """Size fields of /proc/PID/status in KiB, the open fds, and CPU seconds."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[name] = int(rest.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gauges(admin: int) -> dict[str, float]:
    try:
        _, body = http_get(f"http://127.0.0.1:{admin}/metrics")
    except OSError:
        return {}
    out = {}
    for name in ("gateway_streams_live", "gateway_subscribers"):
        m = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, KiB) in KiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / den if den else 0.0


def git_info() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout
    return {"commit": git("log", "-1", "--format=%h"), "dirty": bool(status.strip()),
            "modified": [ln[3:] for ln in status.splitlines() if ln.strip()]}


# --- the benchmark ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gw-idle-"))
    up_port, gw_port, admin_port = free_port(), free_port(), free_port()
    upstream = gateway = None
    client: Client | None = None
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    measured = git_info()  # what the gateway process loads, before it starts

    def sample(phase: str, stats: dict[str, Any] | None = None, soak_t: float | None = None) -> dict[str, Any]:
        assert gateway is not None
        if gateway.poll() is not None:
            raise BenchError(f"gateway exited with {gateway.returncode}; see {work / 'gateway.log'}")
        s = {"phase": phase, "t": round(time.monotonic() - t0, 1), "soak_t": soak_t, **mem(gateway.pid),
             "cpu_s": cpu_seconds(gateway.pid), **gauges(admin_port), **(stats or {})}
        samples.append(s)
        print(f"  {phase:>6} t={s['t']:>6}s VmRSS {s['VmRSS'] / 1024:7.1f} MiB  anon {s['RssAnon'] / 1024:7.1f}"
              f"  file {s['RssFile'] / 1024:6.1f}  live {s.get('gateway_streams_live', '?')}"
              f"  subs {s.get('gateway_subscribers', '?')}  fds {s['fds']}"
              + (f"  client open {stats['open']} beats {stats['beats']} stale {stats['stale']}" if stats else ""),
              file=sys.stderr, flush=True)
        return s

    try:
        upstream = start_upstream(work, up_port, args.heartbeat)
        gateway = subprocess.Popen(
            [PY, "-m", "gateway", "--config", str(gateway_config(work, gw_port, admin_port, up_port, args.heartbeat))],
            cwd=REPO, stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        wait_port(gw_port, gateway)
        wait_ready(admin_port, gateway)
        time.sleep(3.0)
        start = sample("start")
        client = Client(f"http://127.0.0.1:{gw_port}", args.heartbeat, args.thread_share, work)
        half = args.streams // 2
        st = client.ask(f"open {half}")
        if st["open"] != half:
            raise BenchError(f"only {st['open']} of {half} streams opened: {st}")
        time.sleep(2 * args.heartbeat + 2)
        half_s = sample("half", client.ask("stats"))
        st = client.ask(f"open {args.streams}")
        if st["open"] != args.streams:
            raise BenchError(f"only {st['open']} of {args.streams} streams opened: {st}")
        time.sleep(2 * args.heartbeat + 2)  # every stream has carried heartbeats
        soak_t0 = time.monotonic()
        opened = sample("open", client.ask("stats"), soak_t=0.0)
        cpu0 = opened["cpu_s"]
        next_at = SAMPLE_EVERY
        while next_at <= args.soak + 0.01:
            time.sleep(max(0.0, soak_t0 + next_at - time.monotonic()))
            sample("soak", client.ask("stats"), soak_t=round(time.monotonic() - soak_t0, 1))
            next_at += SAMPLE_EVERY
        soak_end = samples[-1]
        soak_cpu = (soak_end["cpu_s"] - cpu0) / max(1e-9, soak_end["soak_t"])
        final_stats = client.ask("close")
        client.proc.wait(30)
        time.sleep(5.0)
        closed = sample("closed")
    finally:
        if client is not None:
            stop(client.proc)
        stop(gateway)
        stop(upstream)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    n = args.streams
    soak = [s for s in samples if s["phase"] in ("open", "soak")]
    result = {
        "streams": n, "threads": int(n * args.thread_share), "runs": n - int(n * args.thread_share),
        "heartbeat_s": args.heartbeat, "soak_s": args.soak, "git": measured,
        "git_changed_during_run": git_info() != measured,
        "kib_per_stream": (opened["VmRSS"] - start["VmRSS"]) / n,
        "kib_per_stream_anon": (opened["RssAnon"] - start["RssAnon"]) / n,
        "kib_per_stream_file": (opened["RssFile"] - start["RssFile"]) / n,
        "marginal_kib_per_stream": (opened["VmRSS"] - half_s["VmRSS"]) / (n - half),
        "marginal_kib_per_stream_anon": (opened["RssAnon"] - half_s["RssAnon"]) / (n - half),
        "kib_per_stream_end_of_soak": (soak_end["VmRSS"] - start["VmRSS"]) / n,
        "kib_per_stream_end_of_soak_anon": (soak_end["RssAnon"] - start["RssAnon"]) / n,
        "slope_kib_per_min": slope([(s["soak_t"], s["VmRSS"]) for s in soak]),
        "slope_kib_per_min_anon": slope([(s["soak_t"], s["RssAnon"]) for s in soak]),
        "slope_last_half_kib_per_min": slope([(s["soak_t"], s["VmRSS"]) for s in soak if s["soak_t"] >= args.soak / 2]),
        "slope_last_half_kib_per_min_anon": slope([(s["soak_t"], s["RssAnon"]) for s in soak
                                                   if s["soak_t"] >= args.soak / 2]),
        "soak_cpu_share": soak_cpu,
        "client": final_stats,
        "samples": samples,
    }
    return result


def report(r: dict[str, Any]) -> str:
    mib = lambda k: f"{k / 1024:.1f}"  # noqa: E731
    by = {s["phase"]: s for s in r["samples"]}
    g = r["git"]
    lines = [
        f"### Idle streams: {r['streams']} ({r['runs']} idle runs, {r['threads']} thread streams), "
        f"heartbeat {r['heartbeat_s']:g} s, soak {r['soak_s']:g} s",
        "",
        f"commit `{g['commit']}`" + (f" + uncommitted changes in {', '.join(g['modified'])}" if g["dirty"] else " (clean)")
        + (" (the worktree changed during the run)" if r["git_changed_during_run"] else ""),
        "",
        "| | value |", "|---|---|",
        f"| RSS at start (total / anon / file) | {mib(by['start']['VmRSS'])} / {mib(by['start']['RssAnon'])} / "
        f"{mib(by['start']['RssFile'])} MiB |",
        f"| RSS with {r['streams']} idle (total / anon / file) | {mib(by['open']['VmRSS'])} / "
        f"{mib(by['open']['RssAnon'])} / {mib(by['open']['RssFile'])} MiB |",
        f"| **KiB per idle stream** (total / anon / file) | **{r['kib_per_stream']:.1f}** / "
        f"**{r['kib_per_stream_anon']:.1f}** / {r['kib_per_stream_file']:.1f} |",
        f"| marginal KiB per stream, 2nd half (total / anon) | {r['marginal_kib_per_stream']:.1f} / "
        f"{r['marginal_kib_per_stream_anon']:.1f} |",
        f"| KiB per stream at end of soak (total / anon) | {r['kib_per_stream_end_of_soak']:.1f} / "
        f"{r['kib_per_stream_end_of_soak_anon']:.1f} |",
        f"| **soak slope** (total / anon) | **{r['slope_kib_per_min']:+.1f}** / "
        f"**{r['slope_kib_per_min_anon']:+.1f} KiB/min** |",
        f"| soak slope, second half only (total / anon) | {r['slope_last_half_kib_per_min']:+.1f} / "
        f"{r['slope_last_half_kib_per_min_anon']:+.1f} KiB/min |",
        f"| gateway CPU during soak | {100 * r['soak_cpu_share']:.1f} % of a core |",
        f"| RSS after the client closed all (total / anon) | {mib(by['closed']['VmRSS'])} / "
        f"{mib(by['closed']['RssAnon'])} MiB |",
        f"| VmHWM (peak) | {mib(by['closed']['VmHWM'])} MiB |",
        f"| client: heartbeats read / stale streams / failed / ended early | {r['client']['beats']} / "
        f"{r['client']['stale']} / {r['client']['failed']} / {r['client']['ended']} |",
        "",
        "| phase | t (s) | soak t (s) | VmRSS MiB | anon MiB | file MiB | live captures | subscribers | fds | heartbeats read |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["samples"]:
        lines.append(f"| {s['phase']} | {s['t']:g} | {'' if s['soak_t'] is None else format(s['soak_t'], 'g')} | {mib(s['VmRSS'])} | {mib(s['RssAnon'])} | {mib(s['RssFile'])} | "
                     f"{s.get('gateway_streams_live', 0):g} | {s.get('gateway_subscribers', 0):g} | {s['fds']} | "
                     f"{s.get('beats', '')} |")
    return "\n".join(lines)


# --- the roles run in child processes --------------------------------------------------------------

def upstream_main(port: int, heartbeat: float) -> None:
    from tests.fake_upstream import FakeAgentServer

    async def serve() -> None:
        server = FakeAgentServer()
        server.heartbeat = heartbeat
        await server.start(port)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await server.stop()

    asyncio.run(serve())


@dataclass
class Held:
    kind: str
    beats: int = 0
    events: int = 0
    last: float = 0.0


def client_main(url: str, heartbeat: float, thread_share: float) -> None:
    import aiohttp

    async def main() -> None:
        loop = asyncio.get_running_loop()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None))
        held: list[Held] = []
        tasks: set[asyncio.Task[None]] = set()
        counts = {"open": 0, "failed": 0, "ended": 0}
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        errors: list[str] = []

        async def hold(h: Held, opened: asyncio.Future[None]) -> None:
            tid = str(uuid.uuid4())
            try:
                async with gate:
                    if h.kind == "run":
                        resp = await session.post(f"{url}/threads/{tid}/runs/stream", json={
                            "assistant_id": "agent", "input": {"n": 1, "delay": 1e9}, "stream_mode": ["custom"]})
                    else:
                        # A thread the upstream knows: the stream of an unknown one is relayed, not captured.
                        async with session.post(f"{url}/threads", json={}) as created:
                            tid = (await created.json())["thread_id"]
                        resp = await session.get(f"{url}/threads/{tid}/stream")
            except Exception as exc:
                counts["failed"] += 1
                errors.append(repr(exc))
                opened.set_result(None)
                return
            if resp.status != 200:
                counts["failed"] += 1
                errors.append(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                resp.release()
                opened.set_result(None)
                return
            counts["open"] += 1
            h.last = loop.time()
            opened.set_result(None)
            try:
                async for chunk in resp.content.iter_any():
                    h.beats += chunk.count(b": heartbeat")
                    h.events += chunk.count(b"\nid: ") + chunk.startswith(b"id: ")
                    h.last = loop.time()
                counts["ended"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                counts["ended"] += 1
                errors.append(repr(exc))
            finally:
                counts["open"] -= 1
                resp.close()

        def stats() -> dict[str, Any]:
            now = loop.time()
            live = [h for h in held if h.last]
            return {**counts, "beats": sum(h.beats for h in held), "events": sum(h.events for h in held),
                    "stale": sum(1 for h in live if now - h.last > 3 * heartbeat),
                    "min_beats": min((h.beats for h in live), default=0), "errors": errors[-3:]}

        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line or line == "close":
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await session.close()
                print(json.dumps(stats()), flush=True)
                return
            if line.startswith("open "):
                target = int(line.split()[1])
                waits = []
                while len(held) < target:
                    i = len(held)
                    # Interleave the kinds so both halves have the same mix.
                    kind = "thread" if int((i + 1) * thread_share) > int(i * thread_share) else "run"
                    h = Held(kind)
                    held.append(h)
                    opened: asyncio.Future[None] = loop.create_future()
                    waits.append(opened)
                    t = asyncio.create_task(hold(h, opened))
                    tasks.add(t)
                if waits:
                    await asyncio.wait(waits, timeout=600)
            print(json.dumps(stats()), flush=True)

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000, help="idle streams to hold (default 2000)")
    p.add_argument("--soak", type=float, default=600.0, help="seconds to hold them, sampled every 30 s (default 600)")
    p.add_argument("--json", metavar="OUT", help="write the figures and every sample here")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="seconds between heartbeats, upstream and gateway (default 5)")
    p.add_argument("--thread-share", type=float, default=0.5,
                   help="fraction of the streams that are thread streams; the rest are idle runs (default 0.5)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, LMDB)")
    p.add_argument("--role", choices=["bench", "upstream", "client"], default="bench", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "upstream":
        upstream_main(args.port, args.heartbeat)
        return 0
    if args.role == "client":
        client_main(args.url, args.heartbeat, args.thread_share)
        return 0
    if args.streams < 2:
        p.error("--streams must be at least 2")
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
