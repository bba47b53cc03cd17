#!/usr/bin/env python3
"""Run the shared SSE benchmark (../shared/bench: C load client, C upstream, nginx beside) against the
gateway, started here with a config for the variant to measure.

    .venv/bin/python bench/shared.py --label gw-lmdb                      # the full matrix, LMDB, fsync
    .venv/bin/python bench/shared.py --label gw-redis-2 --backend redis --workers 2
    .venv/bin/python bench/shared.py --label gw-lmdb --only c_lat_c1000   # one scenario
    .venv/bin/python bench/shared.py --label gw-5k --adhoc 5000,50,200,100   # one client run outside the
        matrix (C streams, N events, S bytes, D ms apart) with the bench's own C client and upstream;
        prints the client's summary and the gateway's CPU per event and peak RSS
    (cd ../shared/bench && BENCH_WORK=/tmp/sse-bench ./run.sh peers direct nginx)   # the peers, same run set
    (cd ../shared/bench && BENCH_WORK=/tmp/sse-bench ./run.sh report)                # the tables

Results go to $BENCH_WORK/results/<label>.json (default /tmp/sse-bench). The gateway listens on
127.0.0.1:18100 (admin 18101+) in front of the bench's upstream on 127.0.0.1:18000; redis-server
(for --backend redis) is started on 127.0.0.1:18379 with appendfsync always, in a fresh directory.
Every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.ports import wait_port  # noqa: E402
from bench.procstat import cpu_split  # noqa: E402

SHARED = Path(os.environ.get("BENCH_SHARED", REPO.parent / "shared" / "bench"))  # a worktree elsewhere: say where
PORT, ADMIN, REDIS = 18100, 18101, 18379
UVLOOP_MAIN = "import sys, uvloop; uvloop.install(); from gateway.cli import main; sys.exit(main(sys.argv[1:]))"




def config(work: Path, args: argparse.Namespace) -> Path:
    storage = [f"  backend: {args.backend}", f"  durability: {args.durability}", "  max_bytes: 50GiB",
               f"  path: {work / 'data'}"]
    if args.backend == "redis":
        storage += [f"  redis_url: redis://127.0.0.1:{REDIS}/0", "  redis_prefix: bench"]
    text = "\n".join([
        f"listen: {{host: 127.0.0.1, port: {PORT}}}", f"admin: {{host: 127.0.0.1, port: {ADMIN}}}",
        "log_level: warning", f"workers: {args.workers}",
        "upstreams:", "  default:", "    urls: [http://127.0.0.1:18000]", "    max_streams: 20000",
        "    max_connections: 20000", "clients:", "  backlog: 4096", "  max_connections: 20000",
        "storage:", *storage, ""])
    path = work / "gateway.yaml"
    path.write_text(text)
    return path


def tree(pid: int) -> list[int]:
    """The process and its descendants (the workers of --workers N)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def adhoc(bench_work: Path, gw_pid: int, spec: str, procs: list[subprocess.Popen[bytes]]) -> int:
    c, n, s, d, *rest = (int(x) for x in spec.split(","))
    ramp = ["-r", str(rest[0])] if rest else []  # starts spread over this many ms (e_tokens: 5000)
    binaries = bench_work / "bin"
    if not (binaries / "sseclient").exists():
        raise SystemExit(f"no {binaries}/sseclient: run the matrix once first (it builds the binaries)")
    try:
        socket.create_connection(("127.0.0.1", 18000), timeout=0.2).close()
    except OSError:
        procs.insert(0, subprocess.Popen([str(binaries / "upstream"), "-p", "18000", "-T", "900"]))
        wait_port(18000)
    pids = tree(gw_pid)
    (user0, sys0), peak = cpu_split(pids), rss_mb(pids)
    client = subprocess.Popen([str(binaries / "sseclient"), "-u", f"http://127.0.0.1:{PORT}", "-c", str(c), "-n", str(n),
                               "-s", str(s), "-d", str(d), "-t", "300", *ramp], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    while client.poll() is None:
        peak = max(peak, rss_mb(pids))
        time.sleep(0.05)
    out, err = client.communicate()
    user1, sys1 = cpu_split(pids)
    user, system = user1 - user0, sys1 - sys0
    used = user + system
    import json
    result = json.loads(out or b"{}")
    events = result.get("events", 0) or 1
    print(err.decode().strip())
    if ttfe := result.get("ttfe_ms"):  # the client's line gives its p50 only: new streams' tail here
        print(f"time to first event p50/p90/p99/max {ttfe['p50']:.2f}/{ttfe['p90']:.2f}/{ttfe['p99']:.2f}/{ttfe['max']:.2f} ms")
    print(f"gateway: cpu {used:.2f} s = {used / events * 1e6:.1f} us/event over {events} events "
          f"(user {user / events * 1e6:.1f}, system {system / events * 1e6:.1f}), peak RSS {peak:.0f} MB, "
          f"client exit {client.returncode}")
    return client.returncode


def commit_summary(workers: int) -> None:
    """Mean commit time and events per commit group over the run, from every worker's /metrics, in
    all and per worker (with several workers on one LMDB directory: whether one writer starves)."""
    import urllib.request
    names = ("gateway_log_commit_seconds_sum", "gateway_log_commit_seconds_count", "gateway_log_commit_group_events_sum")
    per: list[dict[str, float]] = []
    for i in range(workers):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN + i}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        sums: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                sums[name] = sums.get(name, 0.0) + float(value)
        per.append(sums)

    def show(what: str, sums: dict[str, float]) -> None:
        groups = sums.get("gateway_log_commit_seconds_count", 0.0)
        if groups:
            print(f"commits{what}: {groups:.0f} groups, mean {sums[names[0]] / groups * 1000:.1f} ms, "
                  f"{sums.get(names[2], 0.0) / groups:.0f} events per group, {sums.get(names[2], 0.0):.0f} events")

    show("", {n: sum(s.get(n, 0.0) for s in per) for n in names})
    if len(per) > 1:
        for i, sums in enumerate(per):
            show(f" (worker {i})", sums)


def start_redis(where: Path, *, fsync: bool) -> subprocess.Popen[bytes]:
    """redis-server on REDIS with its AOF in ``where`` (fsync on every write, as the gateway's log asks)."""
    where.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(REDIS), "--bind", "127.0.0.1", "--dir", str(where),
         "--appendonly", "yes", "--appendfsync", "always" if fsync else "everysec",
         "--save", "", "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
    wait_port(REDIS)
    return proc


def stop(procs: list[subprocess.Popen[bytes]], grace: float = 30) -> None:
    """Stop what a benchmark started, newest first: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--backend", choices=["lmdb", "redis"], default="lmdb")
    p.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--uvloop", action="store_true", help="run the gateway on uvloop instead of asyncio's loop")
    p.add_argument("--only", default="", help="BENCH_ONLY: scenarios to run, comma-separated")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (Python's own CPU; a thread waiting for the GIL is not counted as busy)")
    p.add_argument("--adhoc", metavar="C,N,S,D[,R]",
                   help="one sseclient run with these parameters instead of the matrix (R: starts spread over R ms)")
    p.add_argument("--profile", metavar="OUT", help="py-spy record the gateway into OUT meanwhile (svg; collapsed stacks if OUT ends in .txt)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    env = dict(os.environ, BENCH_WORK=os.environ.get("BENCH_WORK", "/tmp/sse-bench"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.backend == "redis":
            procs.append(start_redis(work / "redis", fsync=args.durability == "fsync"))
        entry = ["-c", UVLOOP_MAIN] if args.uvloop else ["-m", "gateway"]
        gw = subprocess.Popen([sys.executable, *entry, "--config", str(config(work, args))], cwd=REPO,
                              stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(gw)
        wait_port(PORT)
        spy = None
        if args.profile:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(gw.pid), "--subprocesses", "--rate", "200",
                                    "-o", args.profile] + (["--format", "raw"] if args.profile.endswith(".txt") else [])
                                   + (["--gil"] if args.profile_gil else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if args.adhoc:
            code = adhoc(Path(env["BENCH_WORK"]), gw.pid, args.adhoc, procs)
        else:
            run_env = dict(env, LABEL=args.label, **({"BENCH_ONLY": args.only} if args.only else {}))
            code = subprocess.call([str(SHARED / "run.sh"), f"http://127.0.0.1:{PORT}", str(gw.pid)], env=run_env)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        commit_summary(args.workers)
        return code
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
