#!/usr/bin/env python3
"""Capacity at a latency bound: the most token streams (50 events/s each) a target carries with
event latency p99 <= --bound ms, for the gateway (LMDB or Redis, 1 or N workers) and nginx.

    BENCH_WORK=/tmp/sse-bench .venv/bin/python bench/capacity.py gw-lmdb-1 gw-lmdb-2 gw-redis-1 gw-redis-2 nginx-1 nginx-2

Unpinned (every process may use every core, as a host runs them). Each target is started alone
in front of the bench's C upstream (../shared/bench/upstream.c) and driven with its C client
(sseclient.c): C streams x --events events x 200 B, 20 ms apart, starts spread over --ramp ms
(e_tokens' shape, shorter). C climbs a ladder until p99 is over the bound twice; a level counts
only with no error, gap or duplicate. Prints one markdown table row per run and the capacity
of each target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.ports import wait_port  # noqa: E402
from bench.shared import PORT, SHARED, config, start_redis, stop  # noqa: E402

NGINX_PORT = 18001
LADDER = [100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000]


def build(work: Path) -> Path:
    binaries = work / "bin"
    binaries.mkdir(parents=True, exist_ok=True)
    for name in ("upstream", "sseclient"):
        exe, src = binaries / name, SHARED / f"{name}.c"
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return binaries


def start_target(name: str, tmp: Path) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Start a target; returns its processes (stopped in reverse) and its port."""
    kind, _, n = name.rpartition("-")
    workers = int(n)
    if kind == "nginx":
        conf = (SHARED / "conf" / "nginx.conf").read_text().replace("worker_processes auto;",
                                                                     f"worker_processes {workers};")
        prefix = tmp / "nginx"
        prefix.mkdir(exist_ok=True)
        (prefix / "nginx.conf").write_text(conf)
        proc = subprocess.Popen(["nginx", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(NGINX_PORT)
        return [proc], NGINX_PORT
    backend = kind.split("-")[1]  # gw-lmdb, gw-redis
    procs: list[subprocess.Popen[bytes]] = []
    if backend == "redis":
        procs.append(start_redis(tmp / "redis", fsync=True))
    args = argparse.Namespace(backend=backend, durability="fsync", workers=workers)
    procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config(tmp, args))], cwd=REPO,
                                  stdout=open(tmp / "gateway.log", "wb"), stderr=subprocess.STDOUT))
    wait_port(PORT)
    time.sleep(1.0 if workers > 1 else 0.3)  # every worker listening
    return procs, PORT


def run(binaries: Path, port: int, c: int, events: int, ramp: int) -> dict[str, Any]:
    out = subprocess.run([str(binaries / "sseclient"), "-u", f"http://127.0.0.1:{port}", "-c", str(c),
                          "-n", str(events), "-s", "200", "-d", "20", "-r", str(ramp), "-t", "120"],
                         capture_output=True, timeout=300)
    result: dict[str, Any] = json.loads(out.stdout or b"{}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="gw-lmdb-N, gw-redis-N, nginx-N (N: workers)")
    p.add_argument("--bound", type=float, default=50.0, help="p99 latency bound, ms")
    p.add_argument("--events", type=int, default=400, help="events per stream (20 ms apart)")
    p.add_argument("--ramp", type=int, default=3000, help="starts spread over this many ms")
    p.add_argument("--ladder", default=",".join(map(str, LADDER)))
    args = p.parse_args()
    work = Path(os.environ.get("BENCH_WORK", "/tmp/sse-bench"))
    binaries = build(work)
    upstream = subprocess.Popen([str(binaries / "upstream"), "-p", "18000", "-T", "3600"], stdout=subprocess.DEVNULL)
    wait_port(18000)
    capacity: dict[str, int] = {}
    print("| target | streams | steady events/s (offered) | latency p50 / p99 ms | TTFE p99 ms | errors, gaps+dups |")
    print("|---|---|---|---|---|---|")
    try:
        for name in args.targets:
            tmp = Path(tempfile.mkdtemp(prefix="gw-cap-"))
            procs, port = start_target(name, tmp)
            over = 0
            try:
                for c in (int(x) for x in args.ladder.split(",")):
                    r = run(binaries, port, c, args.events, args.ramp)
                    lat, ttfe = r.get("lat_ms", {}), r.get("ttfe_ms", {})
                    bad = int(r.get("errors", 1)) if r else 1
                    holes = r.get("gaps", 0) + r.get("dups", 0)
                    print(f"| {name} | {c} | {r.get('steady_events_per_s', 0):,.0f} ({r.get('steady_offered_per_s', 0):,.0f}) "
                          f"| {lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} | {ttfe.get('p99', 0):.1f} | {bad}, {holes} |",
                          flush=True)
                    if lat.get("p99", 1e9) <= args.bound and not bad and not holes:
                        capacity[name] = max(capacity.get(name, 0), c)
                        over = 0
                    else:
                        over += 1
                        if over == 2:
                            break
            finally:
                stop(procs)
                shutil.rmtree(tmp, ignore_errors=True)
                time.sleep(1.0)
    finally:
        stop([upstream])
    print()
    print(f"| target | streams carried with p99 <= {args.bound:g} ms |")
    print("|---|---|")
    for name in args.targets:
        print(f"| {name} | {capacity.get(name, 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
