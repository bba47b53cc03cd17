#!/usr/bin/env python3
"""Resume-storm benchmark: C clients reconnect at once with ``Last-Event-ID: -1`` to finished runs.

    .venv/bin/python bench/storm.py                                  # full: 3 targets, C=100,1000, 3 repeats (~3-5 min)
    .venv/bin/python bench/storm.py --json /tmp/storm.json           # also write every raw figure
    .venv/bin/python bench/storm.py --gateway-only --repeats 1      # quick re-check after a gateway change
    .venv/bin/python bench/storm.py --clients 10 --repeats 1 --skip-langgraph   # harness check, seconds

Scenario (the project's performance issue): RUNS=10 finished runs of N=2000 ``event: custom`` events
(data ~200 bytes) each; C clients (spread evenly over the runs) open at once
``GET /threads/{tid}/runs/{rid}/stream`` with ``Last-Event-ID: -1`` (replay from the start). Every
client must get all N custom events plus the run's leading metadata event, every event with an id,
ids strictly increasing, then a clean end of the body (terminal chunk). Targets:

- ``gateway``: ``python -m gateway`` (LMDB, durability fsync) in front of tests/fake_upstream.py
  (its own process, started by this script: ``storm.py _upstream PORT``). The 10 runs are streamed
  THROUGH the gateway first (POST .../runs/stream, read to the end), so its log holds them; the
  fake answers the access check the gateway makes on a resume (``GET /threads/{tid}/runs/{rid}``).
- ``ceiling``: ``storm serve`` (storm.c): single-threaded epoll C that answers every GET with one
  pre-built response: the same events, sizes and framing as the gateway's replay, with ids.
- ``langgraph``: a real ``langgraph dev`` (tests/support/langgraph_server.py) running the graph in
  bench/storm_graph/ (n custom events, no LLM); the runs are created on it directly with
  ``stream_resumable: true``. Its ids are ``<ms>-<seq>``, compared as pairs, and checked as
  non-decreasing only: langgraph_runtime_inmem stamps every event ``<ms>-0``, so events of one
  millisecond share an id (counted and reported; ``--strict-langgraph-ids`` makes them errors).
  C=1000 only runs when C=100's storm time x 10 stays under --langgraph-budget
  seconds (else reported as skipped).

The load client is storm.c (single-threaded epoll, built here with ``cc -O2``); it times every client
(TTFE = connect start -> first complete SSE event) and checks every event. Each storm sends a header
``X-Storm-Round`` of its own, so the gateway's cached access answers (authorize_ttl, keyed by all
headers) never carry over from one storm to the next; ``--distinct-clients`` gives every client its
own value as well (one access check per client, like C different users).

Per (target, C): 3 repeats, target order rotated per round, medians. events/s = all events of all
clients (metadata included) / time from the first connect to the end of the last stream. CPU µs/event =
utime+stime of the server's process tree (/proc/PID/stat, all threads) over the storm / events.
Everything listens on 127.0.0.1 on free ports; every process started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.ports import free_port, wait_port  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402

BENCH = REPO / "bench"
RUNS, N, SIZE = 10, 2000, 200
# The fake's custom data is {"i":k,"of":2000,"pad":"x.."}: 29 bytes + pad for a 4-digit k.
PAD = SIZE - 29


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)






def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def sse_counts(raw: bytes) -> dict[str, int]:
    """Events by name in a whole SSE body (blocks separated by a blank line; comments skipped)."""
    counts: dict[str, int] = {}
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln for ln in block.split(b"\n") if ln and not ln.startswith(b":")]
        if not lines:
            continue
        name = "message"
        for ln in lines:
            if ln.startswith(b"event:"):
                name = ln[6:].strip().decode()
        counts[name] = counts.get(name, 0) + 1
    return counts


def stream_run(port: int, tid: str, body: dict[str, Any]) -> tuple[str, dict[str, int], int]:
    """POST /threads/{tid}/runs/stream, read it to the end: (join path, events by name, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/threads/{tid}/runs/stream", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST runs/stream: {resp.status} {raw[:300]!r}")
        loc = resp.getheader("Content-Location") or ""
        if "/runs/" not in loc:
            raise RuntimeError(f"no run id in Content-Location {loc!r}")
        return loc.rstrip("/") + "/stream", sse_counts(raw), len(raw)
    finally:
        conn.close()


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def fill_runs(t: Target, assistant: str, extra: dict[str, Any]) -> None:
    """Stream RUNS runs of N custom events through ``t`` (each read to its end): what the storm replays."""
    t0 = time.monotonic()
    for _ in range(RUNS):
        status, doc = http_json(t.port, "POST", "/threads", {})
        if status != 200:
            raise RuntimeError(f"POST /threads on {t.name}: {status} {doc}")
        path, counts, nbytes = stream_run(t.port, doc["thread_id"], {
            "assistant_id": assistant, "input": {"n": N, "pad": PAD}, "stream_mode": ["custom"], **extra})
        if counts.get("custom") != N:
            raise RuntimeError(f"{t.name}: a run streamed {counts} from {path}")
        t.paths.append(path)
    log(f"{t.name}: filled {RUNS} runs in {time.monotonic() - t0:.2f} s; each original stream: {counts}, "
        f"{nbytes} bytes")
    t.fill = {"events": counts, "bytes": nbytes}  # type: ignore[attr-defined]


# --- the fake upstream, in its own process ---------------------------------------------------------

def upstream_main(port: int) -> None:
    from tests.fake_upstream import FakeAgentServer

    async def run() -> None:
        server = await FakeAgentServer().start(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(run())


# --- targets ----------------------------------------------------------------------------------------

class Target:
    name = ""
    port = 0
    id_mode = "int"
    client_timeout = 120
    paths: list[str]
    metadata = 1  # metadata events a replay begins with (measured by a probe)
    pids: list[int]

    def cpu_pids(self) -> list[int]:
        return [q for p in self.pids for q in proc_tree(p)]  # with any worker processes


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="storm-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.lg_server: Any = None
        self.storm_bin = self.work / "storm"
        self.rounds = 0

    # processes
    def spawn(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        out = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=kw.pop("stdout", out), stderr=out, stdin=subprocess.DEVNULL, **kw)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()
        if self.lg_server is not None:
            self.lg_server.stop()  # killpg of the session it started (its own pid)
            self.lg_server = None

    def build(self) -> None:
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(self.storm_bin), str(BENCH / "storm.c")], check=True)

    # gateway + fake upstream
    def start_gateway(self) -> Target:
        up_port, gw_port, admin = free_port(), free_port(), free_port()
        up = self.spawn("upstream", [sys.executable, str(Path(__file__).resolve()), "_upstream", str(up_port)], cwd=REPO)
        wait_port(up_port, up)
        cfg = self.work / "gateway.yaml"
        cfg.write_text("\n".join([
            f"listen: {{host: 127.0.0.1, port: {gw_port}}}", f"admin: {{host: 127.0.0.1, port: {admin}}}",
            "log_level: warning",
            "upstreams:", "  default:", f"    urls: [http://127.0.0.1:{up_port}]", "    max_streams: 20000",
            "    max_connections: 20000",
            "clients:", "  backlog: 4096", "  max_connections: 20000",
            "storage:", "  backend: lmdb", "  durability: fsync", "  max_bytes: 50GiB", f"  path: {self.work / 'data'}",
            ""]))
        gw = self.spawn("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg)], cwd=REPO)
        wait_port(gw_port, gw)
        deadline = time.monotonic() + 30
        while True:  # ready = the upstream is seen healthy
            try:
                if http_json(admin, "GET", "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway /readyz never answered 200")
            time.sleep(0.1)
        t = Target()
        t.name, t.port, t.pids = "gateway", gw_port, [gw.pid]
        t.paths = []
        fill_runs(t, "agent", {})
        return t

    def start_ceiling(self) -> Target:
        port = free_port()
        proc = self.spawn("ceiling", [str(self.storm_bin), "serve", "-p", str(port), "-n", str(N), "-s", str(SIZE),
                                      "-m", "1", "-T", "3600"])
        wait_port(port, proc)
        t = Target()
        t.name, t.port, t.pids, t.client_timeout = "ceiling", port, [proc.pid], 60
        t.paths = [f"/threads/{uuid.uuid4()}/runs/{uuid.uuid4()}/stream" for _ in range(RUNS)]
        return t

    def start_langgraph(self) -> Target:
        from tests.support.langgraph_server import LangGraphServer

        log("langgraph: starting langgraph dev (bench/storm_graph) ...")
        self.lg_server = LangGraphServer(app_dir=BENCH / "storm_graph").start()
        port = self.lg_server.port
        t = Target()
        t.name, t.port, t.id_mode, t.paths = "langgraph", port, ("seq" if self.args.strict_langgraph_ids else "seq-nondecreasing"), []
        t.pids = [self.lg_server.proc.pid]
        fill_runs(t, "storm", {"stream_resumable": True})
        return t

    # one storm
    def storm(self, t: Target, clients: int, expect_meta: int, label: str, timeout: int | None = None) -> dict[str, Any]:
        pfile = self.work / f"paths-{t.name}.txt"
        pfile.write_text("\n".join(t.paths) + "\n")
        self.rounds += 1
        cmd = [str(self.storm_bin), "-u", f"http://127.0.0.1:{t.port}", "-f", str(pfile), "-c", str(clients),
               "-n", str(N), "-m", str(expect_meta), "-L", "-1", "-i", t.id_mode,
               "-H", f"X-Storm-Round: {label}-{self.rounds}-{uuid.uuid4().hex[:8]}",
               "-t", str(timeout or t.client_timeout)]
        if self.args.distinct_clients:
            cmd += ["-k", "X-Storm-Client"]
        pids = t.cpu_pids()
        cpu0 = cpu_seconds(pids)
        w0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, timeout=(timeout or t.client_timeout) + 30)
        wall = time.monotonic() - w0
        cpu = cpu_seconds(pids) - cpu0
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            raise RuntimeError(f"storm client failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        res = json.loads(proc.stdout)
        res["server_cpu_s"] = cpu
        res["server_cpu_us_per_event"] = cpu * 1e6 / res["events"] if res["events"] else None
        res["client_wall_s"] = wall
        log(f"  {t.name:9} C={clients:<5} {proc.stderr.decode(errors='replace').strip()}, server cpu {cpu:.2f} s")
        return res


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def git_state() -> tuple[str, bool]:
    h = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return h, dirty


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="100,1000", help="concurrencies, comma-separated (default 100,1000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-langgraph", action="store_true")
    p.add_argument("--gateway-only", action="store_true", help="only the gateway (no ceiling, no langgraph)")
    p.add_argument("--distinct-clients", action="store_true",
                   help="every client sends its own X-Storm-Client value (one access check per client)")
    p.add_argument("--langgraph-budget", type=float, default=60.0,
                   help="run langgraph at C>100 only if C=100's storm time scaled to C stays under this (s)")
    p.add_argument("--strict-langgraph-ids", action="store_true",
                   help="require strictly increasing ids from langgraph too (its inmem ids repeat: all clients fail)")
    p.add_argument("--json", metavar="OUT", help="write every raw figure here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, LMDB)")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c]
    commit, dirty = git_state()
    bench = Bench(args)
    targets: list[Target] = []
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    skipped: dict[str, str] = {}
    probes: dict[str, Any] = {}
    started = time.time()
    try:
        bench.build()
        targets.append(bench.start_gateway())
        if not args.gateway_only:
            targets.append(bench.start_ceiling())
            if not args.skip_langgraph:
                targets.append(bench.start_langgraph())
        # Probe: one client per run, metadata not checked: learn how many metadata events a replay begins with.
        for t in targets:
            res = bench.storm(t, RUNS, -1, "probe")
            probes[t.name] = res
            if (res["events_data"] != RUNS * N or res["events_other"] or res["events_metadata"] % RUNS
                    or res["error_total"]):
                raise RuntimeError(f"{t.name}: probe replay is not {N} custom events per run: {res}")
            t.metadata = res["events_metadata"] // RUNS
            log(f"{t.name}: a replay is {t.metadata} metadata + {N} custom events, "
                f"{res['body_bytes'] // RUNS} body bytes per client")
        for c in clients:
            lg_c100 = results.get("langgraph", {}).get(100)
            for r in range(args.repeats):
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for t in order:
                    timeout = None
                    if t.name == "langgraph" and c > 100:
                        if t.name in skipped:
                            continue
                        base = [x["duration_s"] for x in (lg_c100 or [])]
                        est = med(base) * c / 100 if base else None
                        if est is None or est > args.langgraph_budget:
                            skipped[f"langgraph C={c}"] = (
                                f"C=100 storm took {fmt(med(base), '.1f')} s, so C={c} would take ~{fmt(est, '.0f')} s "
                                f"> {args.langgraph_budget:.0f} s budget" if est else "no C=100 result to scale from")
                            skipped[t.name] = "yes"
                            log(f"  langgraph C={c}: skipped ({skipped[f'langgraph C={c}']})")
                            continue
                        timeout = int(args.langgraph_budget * 2)
                    results.setdefault(t.name, {}).setdefault(c, []).append(
                        bench.storm(t, c, t.metadata, f"{t.name}-c{c}-r{r}", timeout))
                    time.sleep(0.5)
            skipped.pop("langgraph", None)
    finally:
        bench.stop_all()
        if args.keep:
            log(f"work directory kept: {bench.work}")
        else:
            shutil.rmtree(bench.work, ignore_errors=True)

    # report
    rows = []
    lines = [f"Resume storm: {RUNS} finished runs x {N} custom events (~{SIZE} B data), clients replay with "
             f"Last-Event-ID: -1; commit {commit}{' (worktree dirty)' if dirty else ''}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; {os.cpu_count()} CPUs; "
             f"medians of {args.repeats} repeats.", ""]
    for t in targets:
        reps = sum(x["id_repeats"] for rs in results.get(t.name, {}).values() for x in rs)
        evs = sum(x["events"] for rs in results.get(t.name, {}).values() for x in rs)
        lines.append(f"- {t.name}: a replay = {t.metadata} metadata + {N} custom events, "
                     f"{probes[t.name]['body_bytes'] // RUNS:,} body bytes per client, ids checked as {t.id_mode}"
                     + (f"; {reps:,} of {evs:,} events repeated the previous event's id" if reps else ""))
    lines += ["", "| target | C | events/s | TTFE p50 ms | TTFE p99 ms | last event ms | last end ms | exact clients | "
              "errors | server CPU µs/event |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in clients:
        for t in targets:
            rs = results.get(t.name, {}).get(c)
            if not rs:
                why = skipped.get(f"{t.name} C={c}", "not run")
                lines.append(f"| {t.name} | {c} | skipped: {why} | | | | | | | |")
                continue
            row = {
                "target": t.name, "clients": c, "repeats": len(rs),
                "events_per_s": med([x["events_per_s"] for x in rs]),
                "ttfe_p50_ms": med([x["ttfe_ms"]["p50"] for x in rs]),
                "ttfe_p99_ms": med([x["ttfe_ms"]["p99"] for x in rs]),
                "duration_ms": med([x["duration_s"] * 1000 for x in rs]),
                "last_event_ms": med([x["last_event_ms"] for x in rs]),
                "exact": sum(x["exact"] for x in rs), "total": sum(x["clients"] for x in rs),
                "errors": sum(x["error_total"] for x in rs),
                "cpu_us_per_event": med([x["server_cpu_us_per_event"] for x in rs]),
            }
            rows.append(row)
            lines.append(f"| {t.name} | {c} | {fmt(row['events_per_s'], ',.0f')} | {fmt(row['ttfe_p50_ms'], '.1f')} | "
                         f"{fmt(row['ttfe_p99_ms'], '.1f')} | {fmt(row['last_event_ms'], '.0f')} | "
                         f"{fmt(row['duration_ms'], '.0f')} | "
                         f"{row['exact']}/{row['total']} | {row['errors']} | {fmt(row['cpu_us_per_event'], '.2f')} |")
    ratios = []
    if "ceiling" in results and "gateway" in results:
        lines += ["", "| C | gateway/ceiling events/s | gateway/ceiling TTFE p99 | langgraph/ceiling events/s | "
                  "gateway/langgraph events/s |", "|---|---|---|---|---|"]
        for c in clients:
            g, ce, lg = (results.get(k, {}).get(c, []) for k in ("gateway", "ceiling", "langgraph"))
            n = min(len(g), len(ce))
            # ratios within a round (same minute), then the median over rounds
            eps = med([g[i]["events_per_s"] / ce[i]["events_per_s"] for i in range(n)])
            p99 = med([g[i]["ttfe_ms"]["p99"] / ce[i]["ttfe_ms"]["p99"] for i in range(n) if ce[i]["ttfe_ms"]["p99"] > 0])
            m = min(len(lg), n)
            lgr = med([lg[i]["events_per_s"] / ce[i]["events_per_s"] for i in range(m)]) if m else None
            glg = med([g[i]["events_per_s"] / lg[i]["events_per_s"] for i in range(m)]) if m else None
            ratios.append({"clients": c, "gateway_ceiling_eps": eps, "gateway_ceiling_ttfe_p99": p99,
                           "langgraph_ceiling_eps": lgr, "gateway_langgraph_eps": glg})
            lines.append(f"| {c} | {fmt(eps, '.3f')} | {fmt(p99, '.1f')}x | {fmt(lgr, '.3f')} | {fmt(glg, '.2f')} |")
    for k, v in skipped.items():
        if k != "langgraph":
            lines.append(f"\n{k} skipped: {v}")
    report = "\n".join(lines)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "commit": commit, "dirty": dirty, "started": started, "runs": RUNS, "events": N, "size": SIZE,
            "repeats": args.repeats, "clients": clients, "distinct_clients": args.distinct_clients,
            "targets": {t.name: {"metadata": t.metadata, "id_mode": t.id_mode, "fill": getattr(t, "fill", None)}
                        for t in targets},
            "probes": probes, "rows": rows, "ratios": ratios, "skipped": skipped, "raw": results,
            "report": report}, indent=1, default=str))
    bad = sum(r["total"] - r["exact"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_upstream":
        upstream_main(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
