"""Throughput of small SSE events through the gateway, as ratios against baselines run alongside.

Targets, all fed by the same source (bench/sse_upstream.py, its own process):
  direct      the client talks to the source
  nginx       nginx as a plain buffering-off reverse proxy (the "any proxy" cost)
  gw-fsync    the gateway, default durability (every commit group fsynced)
  gw-none     the gateway with ``storage: {durability: none}``

For each concurrency C, every round runs each target once (order rotated per
round); a cell is C clients each doing R POST streams of N events, reading
every byte and checking every event. Ratios are taken per round (same minute,
same noise) and the median is reported.

Usage: python bench/run.py [--quick] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
from bench.ports import free_port  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402

_DATA_I = re.compile(rb'data: \{"i":(\d+)\}')
_EVENT = re.compile(rb"^event: custom\r?$", re.M)
_ID = re.compile(rb"^id: (.*?)\r?$", re.M)
_BLOCK_END = re.compile(rb"\r?\n\r?\n")


class BenchError(Exception):
    pass


# --- processes -----------------------------------------------------------------------------------

def proc_status(pid: int, field_name: str) -> int:
    """A /proc/<pid>/status size field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} for pid {pid}")


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.popen.returncode}; log tail:\n"
                             + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, argv: list[str], tmp: Path) -> Proc:
    log = tmp / f"{name}.log"
    out = open(log, "wb")
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    return Proc(name, popen, log)


async def wait_http(url: str, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            proc.check()
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} not ready at {url} after {timeout}s")
            await asyncio.sleep(0.1)


def start_source(tmp: Path) -> tuple[Proc, int]:
    proc = spawn("source", [PY, str(HERE / "sse_upstream.py"), "--port", "0"], tmp)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc.check()
        m = re.search(r"LISTENING (\d+)", proc.log.read_text())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    raise BenchError("source did not start")


UVLOOP_MAIN = "import sys, uvloop; uvloop.install(); from gateway.cli import main; sys.exit(main(sys.argv[1:]))"


def start_gateway(name: str, upstream: str, tmp: Path, durability: str, uvloop: bool = False) -> tuple[Proc, int, int]:
    port, admin = free_port(), free_port()
    data = tmp / f"{name}-data"
    entry = ["-c", UVLOOP_MAIN] if uvloop else ["-m", "gateway"]
    argv = [PY, *entry, "--upstream", upstream, "--port", str(port), "--admin-port", str(admin),
            "--data-dir", str(data), "--log-level", "warning"]
    if durability != "fsync":
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(f"storage:\n  durability: {durability}\n")
        argv += ["--config", str(cfg)]
    return spawn(name, argv, tmp), port, admin


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream source {{
        server 127.0.0.1:{src};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://source;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def find_nginx() -> str:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("nginx missing: apt-get install -y nginx", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        raise BenchError("nginx not found (apt-get install -y nginx)")
    return exe


def start_nginx(src_port: int, tmp: Path) -> tuple[Proc, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, src=src_port, port=port))
    return spawn("nginx", [find_nginx(), "-p", str(tmp), "-c", str(conf)], tmp), port


# --- the client ----------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str
    gateway: bool
    proc: Proc | None = None
    admin: str | None = None

    def pids(self) -> list[int]:
        """The processes doing this target's proxying (nginx: master and worker)."""
        if self.proc is None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]


def verify(body: bytes, n: int, gateway: bool, expected: list[bytes]) -> None:
    """Every stream got exactly N `custom` events, in order; gateway ids strictly increase."""
    events = len(_EVENT.findall(body))
    if events != n:
        raise BenchError(f"got {events} custom events, expected {n}")
    values = _DATA_I.findall(body)
    if values != expected:
        raise BenchError("event payloads missing, duplicated or out of order")
    blocks = len(_BLOCK_END.findall(body))
    if blocks != n:
        raise BenchError(f"got {blocks} event blocks, expected {n}")
    if gateway:
        ids = _ID.findall(body)
        if len(ids) != n:
            raise BenchError(f"got {len(ids)} ids, expected {n}")
        prev = -1
        for raw in ids:
            seq = int(raw)  # ValueError on a non-integer id
            if seq <= prev:
                raise BenchError(f"id {seq} after {prev}: not strictly increasing")
            prev = seq


async def one_stream(session: aiohttp.ClientSession, t: Target, n: int, expected: list[bytes],
                     headers: dict[str, str] | None = None) -> int:
    tid = uuid.uuid4()
    hdrs = {"Accept": "text/event-stream", "X-Bench-Events": str(n)}
    if headers:
        hdrs.update(headers)
    async with session.post(f"{t.url}/threads/{tid}/runs/stream", json={"assistant_id": "bench", "input": {}},
                            headers=hdrs) as resp:
        if resp.status != 200:
            raise BenchError(f"{t.name}: HTTP {resp.status}: {(await resp.text())[:200]}")
        chunks = [c async for c in resp.content.iter_any()]
    verify(b"".join(chunks), n, t.gateway, expected)
    return n


async def cell(t: Target, clients: int, repeats: int, n: int) -> float:
    """C clients, each R streams one after another; returns events/s over the wall time."""
    expected = [b"%d" % k for k in range(n)]
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def client() -> int:
            got = 0
            for _ in range(repeats):
                got += await one_stream(session, t, n, expected)
            return got

        started = time.perf_counter()
        total = sum(await asyncio.gather(*(client() for _ in range(clients))))
        elapsed = time.perf_counter() - started
    if total != clients * repeats * n:
        raise BenchError(f"{t.name}: {total} events, expected {clients * repeats * n}")
    return total / elapsed


async def scrape(admin: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin}/metrics") as r:
            text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_log_commit") and " " in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def group_stats(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, float]:
    """(avg events per commit group, commits, avg commit ms) between two scrapes."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = d.get("gateway_log_commit_group_events_count", 0.0)
    ev = d.get("gateway_log_commit_group_events_sum", 0.0)
    secs = d.get("gateway_log_commit_seconds_sum", 0.0)
    return (ev / count if count else 0.0, count, 1000 * secs / count if count else 0.0)


async def idle_memory(t: Target, streams: int, seconds: int) -> dict[str, int]:
    """RSS of a gateway holding `streams` slow streams at once (one event per second)."""
    assert t.proc is not None
    pid = t.proc.pid
    base = proc_status(pid, "VmRSS")
    conn = aiohttp.TCPConnector(limit=0)
    opened = 0
    all_open = asyncio.Event()
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def slow() -> None:
            nonlocal opened
            tid = uuid.uuid4()
            async with session.post(f"{t.url}/threads/{tid}/runs/stream", json={},
                                    headers={"Accept": "text/event-stream", "X-Bench-Idle": str(seconds)}) as resp:
                if resp.status != 200:
                    raise BenchError(f"{t.name}: HTTP {resp.status}")
                first = await resp.content.readuntil(b"\n\n")
                if b"event: custom" not in first:
                    raise BenchError(f"{t.name}: odd first event {first[:80]!r}")
                opened += 1
                if opened == streams:
                    all_open.set()
                rest = await resp.read()
                body = first + rest
            verify(body, seconds, t.gateway, [b"%d" % k for k in range(seconds)])

        tasks = [asyncio.create_task(slow()) for _ in range(streams)]
        await asyncio.wait_for(all_open.wait(), timeout=seconds + 20)
        await asyncio.sleep(1.0)
        held = proc_status(pid, "VmRSS")
        await asyncio.gather(*tasks)
    return {"rss_before_kib": base, "rss_held_kib": held, "per_stream_kib": (held - base) // streams}


# --- profiling -------------------------------------------------------------------------------------

def summarize_pyspy(raw: Path, top: int = 12) -> list[str]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = [re.sub(r" \(.*?/(site-packages|lib/python3\.\d+|main)/", " (", f) for f in stack.split(";")]
        self_s[frames[-1]] = self_s.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    lines = [f"{total} samples"]
    lines += ["self  " + f"{100 * c / total:5.1f}%  {f}" for f, c in sorted(self_s.items(), key=lambda x: -x[1])[:top]]
    lines += ["incl  " + f"{100 * c / total:5.1f}%  {f}" for f, c in sorted(incl.items(), key=lambda x: -x[1])[:top]]
    return lines


# --- main ------------------------------------------------------------------------------------------

@dataclass
class Plan:
    events: int
    concurrency: list[int]
    repeats: dict[int, int]
    rounds: int
    idle_streams: int
    idle_seconds: int
    results: dict = field(default_factory=dict)


def plan_for(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(events=500, concurrency=[1, 16], repeats={1: 4, 16: 1}, rounds=1,
                    idle_streams=50, idle_seconds=3)
    # R per C keeps each cell around 40-130k events, a second or two per target.
    return Plan(events=args.events, concurrency=args.concurrency,
                repeats={c: max(1, 32 // c) if c < 64 else 1 for c in args.concurrency},
                rounds=args.rounds, idle_streams=200, idle_seconds=6)


async def bench(args: argparse.Namespace, tmp: Path) -> dict:
    plan = plan_for(args)
    procs: list[Proc] = []
    try:
        src, src_port = start_source(tmp)
        procs.append(src)
        src_url = f"http://127.0.0.1:{src_port}"
        ngx, ngx_port = start_nginx(src_port, tmp)
        procs.append(ngx)
        targets = [Target("direct", src_url, False), Target("nginx", f"http://127.0.0.1:{ngx_port}", False, ngx)]
        gateways = [("gw-fsync", "fsync", False), ("gw-none", "none", False)]
        if args.uvloop_gateway:
            gateways.append(("gw-none-uvloop", "none", True))
        for name, dur, uv in gateways:
            gw, port, admin = start_gateway(name, src_url, tmp, dur, uv)
            procs.append(gw)
            targets.append(Target(name, f"http://127.0.0.1:{port}", True, gw, f"http://127.0.0.1:{admin}"))
        for t in targets:
            await wait_http(f"{(t.admin or t.url)}/{'readyz' if t.admin else 'ok'}", t.proc or src)
        gws = [t for t in targets if t.gateway]

        out: dict = {"plan": {"events": plan.events, "concurrency": plan.concurrency, "repeats": plan.repeats,
                              "rounds": plan.rounds}, "memory": {}, "cells": {}}
        # Memory first, on fresh processes, so the idle figure is not hidden by the run's peak.
        for t in gws:
            assert t.proc is not None
            mem = {"rss_start_kib": proc_status(t.proc.pid, "VmRSS")}
            mem.update(await idle_memory(t, plan.idle_streams, plan.idle_seconds))
            mem["idle_streams"] = plan.idle_streams
            out["memory"][t.name] = mem
            print(f"{t.name}: {plan.idle_streams} idle streams: RSS {mem['rss_before_kib']} -> "
                  f"{mem['rss_held_kib']} KiB ({mem['per_stream_kib']} KiB/stream)", flush=True)

        for t in targets:  # warm-up: connections, code paths, LMDB pages
            await cell(t, 4, 1, plan.events)

        for c in plan.concurrency:
            r = plan.repeats[c]
            rows: dict[str, list[float]] = {t.name: [] for t in targets}
            groups: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in gws}
            cpu: dict[str, list[float]] = {t.name: [] for t in targets}
            for rnd in range(plan.rounds):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for t in order:
                    for p in procs:
                        p.check()
                    before = await scrape(t.admin) if t.admin else {}
                    cpu0 = cpu_seconds(t.pids())
                    eps = await cell(t, c, r, plan.events)
                    cpu[t.name].append((cpu_seconds(t.pids()) - cpu0) * 1e6 / (c * r * plan.events))
                    if t.admin:
                        groups[t.name].append(group_stats(before, await scrape(t.admin)))
                    rows[t.name].append(eps)
                    print(f"C={c:<3} round {rnd + 1}/{plan.rounds} {t.name:9s} {eps:>10,.0f} events/s", flush=True)
            cellout: dict = {"repeats": r, "events_per_s": rows, "median": {k: statistics.median(v) for k, v in rows.items()}}
            ratios: dict[str, float] = {}
            for g in gws:
                for base in ("direct", "nginx"):
                    per_round = [a / b for a, b in zip(rows[g.name], rows[base])]
                    ratios[f"{g.name}/{base}"] = statistics.median(per_round)
            cellout["ratios"] = ratios
            # CPU the proxy itself spent per event: robust to machine noise, 0 for direct.
            cellout["cpu_us_per_event"] = {k: statistics.median(v) for k, v in cpu.items()}
            cellout["commit_groups"] = {
                name: {"avg_events_per_group": statistics.mean(x[0] for x in v),
                       "commits_per_cell": statistics.mean(x[1] for x in v),
                       "avg_commit_ms": statistics.mean(x[2] for x in v)} for name, v in groups.items()}
            out["cells"][str(c)] = cellout

        for t in gws:
            assert t.proc is not None
            for f in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out["memory"][t.name][f] = proc_status(t.proc.pid, f)
            out["memory"][t.name]["peak_rss_after_run_kib"] = out["memory"][t.name]["VmHWM"]
        if ngx.popen.poll() is None:
            out["memory"]["nginx"] = {"peak_rss_after_run_kib": sum(
                proc_status(p, "VmHWM") for p in [ngx.pid, *children(ngx.pid)])}

        if args.profile:
            out["profile"] = await profile(targets, plan, tmp)
        return out
    finally:
        for p in reversed(procs):
            p.stop()


async def profile(targets: list[Target], plan: Plan, tmp: Path) -> dict:
    """py-spy on the gateway (durability none, then fsync) while C=16 clients stream through it."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.path.exists(spy):
        return {"error": "py-spy not installed (pip install py-spy)"}
    res = {}
    for t in targets:
        if not t.gateway:
            continue
        assert t.proc is not None
        raw = tmp / f"{t.name}.pyspy.txt"
        rec = subprocess.Popen([spy, "record", "--pid", str(t.proc.pid), "--rate", "200", "--format", "raw",
                                "--nonblocking", "--threads", "-o", str(raw), "-d", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(1.0)
        started = time.monotonic()
        while time.monotonic() - started < 8:
            await cell(t, 16, 1, plan.events)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=30)
        if not raw.exists():
            res[t.name] = {"error": err.decode()[-500:]}
            continue
        shutil.copy(raw, HERE / f"profile-{t.name}.txt") if os.environ.get("BENCH_KEEP_PROFILE") else None
        res[t.name] = summarize_pyspy(raw)
        print(f"--- py-spy {t.name}\n" + "\n".join(res[t.name]), flush=True)
    return res


def report(out: dict) -> str:
    first = next(iter(out["cells"].values()))
    names = list(first["median"])
    gws = [k for k in names if k.startswith("gw-")]
    ratio_cols = [f"{g}/{b}" for g in gws for b in ("direct", "nginx")]
    lines = ["| C | R×N per client | " + " | ".join(f"{n} ev/s" for n in names) + " | "
             + " | ".join(ratio_cols) + " | events/commit (" + ", ".join(gws) + ") |",
             "|---|---|" + "---|" * (len(names) + len(ratio_cols) + 1)]
    n = out["plan"]["events"]
    for c, cell_ in out["cells"].items():
        med, rat, grp = cell_["median"], cell_["ratios"], cell_["commit_groups"]
        lines.append(f"| {c} | {cell_['repeats']}×{n} | " + " | ".join(f"{med[k]:,.0f}" for k in names) + " | "
                     + " | ".join(f"{rat[k]:.2f}" for k in ratio_cols) + " | "
                     + ", ".join(f"{grp[g]['avg_events_per_group']:,.0f}" for g in gws) + " |")
    lines += ["", "Proxy CPU per event (µs, all threads, median of rounds) and commit latency:", "",
              "| C | " + " | ".join(names[1:]) + " | " + " | ".join(f"{g} avg commit ms" for g in gws) + " |",
              "|---|" + "---|" * (len(names) - 1 + len(gws))]
    for c, cell_ in out["cells"].items():
        cpu, grp = cell_["cpu_us_per_event"], cell_["commit_groups"]
        lines.append(f"| {c} | " + " | ".join(f"{cpu[k]:.2f}" for k in names[1:]) + " | "
                     + " | ".join(f"{grp[g]['avg_commit_ms']:.1f}" for g in gws) + " |")
    lines += ["", "| process | RSS at start | RSS with idle streams | KiB/idle stream "
              "| peak RSS (VmHWM) after run | RSS after run: anon / file (LMDB map) |",
              "|---|---|---|---|---|---|"]
    for name, m in out["memory"].items():
        if name == "nginx":
            lines.append(f"| nginx (master+worker) | | | | {m['peak_rss_after_run_kib'] / 1024:.1f} MiB | |")
            continue
        lines.append(f"| {name} | {m['rss_start_kib'] / 1024:.1f} MiB | {m['rss_held_kib'] / 1024:.1f} MiB "
                     f"({m['idle_streams']} streams) | {m['per_stream_kib']} | {m['VmHWM'] / 1024:.1f} MiB "
                     f"| {m['RssAnon'] / 1024:.1f} / {m['RssFile'] / 1024:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SSE throughput: gateway vs direct vs nginx")
    p.add_argument("--events", type=int, default=2000, help="events per stream (N)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny run (~20 s) to check the harness")
    p.add_argument("--profile", action="store_true", help="py-spy the gateways after the run")
    p.add_argument("--uvloop-gateway", action="store_true",
                   help="add a target: the gateway (durability none) on uvloop instead of asyncio's loop")
    p.add_argument("--json", metavar="FILE", help="write raw results here")
    args = p.parse_args(argv)
    try:
        import uvloop  # the client should not be the bottleneck
        uvloop.install()
    except ImportError:
        pass
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmpdir:
        try:
            out = asyncio.run(bench(args, Path(tmpdir)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    out["machine"] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                      "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "wall_s": round(time.monotonic() - started, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print()
    print(report(out))
    print(f"\n{out['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
