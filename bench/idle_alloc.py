#!/usr/bin/env python3
"""Where an idle stream's memory goes: tracemalloc and gc object counts per idle stream.

    .venv/bin/python bench/idle_alloc.py                     # 250 idle runs, then 250 thread streams
    .venv/bin/python bench/idle_alloc.py --streams 500 --frames 8 --top 25

The gateway runs in this process (``gateway.app.Server``, LMDB, durability fsync, the same config
as ``bench/idle.py``) with tracemalloc on; the fake upstream and the client are the processes
``bench/idle.py`` starts. After a warm-up of 10 streams of each kind (kept open, so first-use
allocations are not counted), it opens ``--streams``/2 idle run streams, waits two heartbeat
periods, snapshots; then as many thread streams, and snapshots again. Each diff is divided by
the number of streams it added and reported grouped by file:line, by the gateway line that
led to the allocation (the innermost ``gateway/`` frame of the traceback), and as a gc type
histogram (count and ``sys.getsizeof`` bytes of gc-tracked objects). RSS here includes
tracemalloc's own overhead and is only indicative; ``bench/idle.py`` measures RSS.
"""

from __future__ import annotations

import tracemalloc

if not tracemalloc.is_tracing():
    tracemalloc.start(8)  # before anything is imported; --frames restarts it with its own depth

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.idle import Client, free_port, git_info, mem, start_upstream, stop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GATEWAY_DIR = str(REPO / "gateway")


def type_histogram() -> tuple[Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        detail = _whose(o)
        if detail:  # a frame, closure or task held per stream: say whose, it is what to cut
            name = f"{name} ({detail})"
        counts[name] += 1
        try:
            sizes[name] += sys.getsizeof(o)
        except TypeError:
            pass
        if t.__dictoffset__ and isinstance(t.__module__, str) and t.__module__.startswith(("gateway", "aiohttp", "asyncio")):
            # An instance __dict__ is a dict of its own: name its owner (a class without __slots__).
            d = getattr(o, "__dict__", None)
            if type(d) is dict:
                counts[f"builtins.dict (the __dict__ of a {name})"] += 1
                sizes[f"builtins.dict (the __dict__ of a {name})"] += sys.getsizeof(d)
    return counts, sizes


def _whose(o: Any) -> str:
    """The code a coroutine, generator, function, bound method or task belongs to."""
    if isinstance(o, (types.CoroutineType, types.AsyncGeneratorType, types.GeneratorType, types.FunctionType)):
        return str(o.__qualname__)
    if isinstance(o, types.MethodType):
        return str(getattr(o.__func__, "__qualname__", ""))
    if isinstance(o, asyncio.Task):
        return str(getattr(o.get_coro(), "__qualname__", ""))
    return ""


def short(filename: str) -> str:
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    if "/lib/python3." in filename:
        return filename.split("/lib/python3.", 1)[1].split("/", 1)[1]
    return filename.replace(str(REPO) + "/", "")


GROUPS = (
    ("aiohttp server side (web_*.py, http_writer, request parser)", ("aiohttp/web_", "aiohttp/http_writer",
                                                                      "aiohttp/http_parser", "aiohttp/_http_writer")),
    ("aiohttp client side (client*.py, connector, helpers)", ("aiohttp/client", "aiohttp/connector", "aiohttp/helpers",
                                                             "aiohttp/tracing", "aiohttp/cookiejar")),
    ("aiohttp StreamReader (streams.py, both sides)", ("aiohttp/streams",)),
    ("aiohttp other", ("aiohttp/",)),
    ("asyncio, selectors, socket", ("asyncio/", "selectors", "socket", "_weakrefset", "weakref", "contextvars")),
    ("gateway", ("gateway/",)),
    ("multidict, yarl", ("multidict/", "yarl/")),
)


def group(filename: str) -> str:
    for name, prefixes in GROUPS:
        if filename.startswith(prefixes):
            return name
    return f"other ({filename})"


def snap(path: Path) -> tuple[Counter[str], Counter[str]]:
    """gc type histogram, then a tracemalloc snapshot dumped to ``path`` (not kept in memory, so
    neither the snapshot nor the histogram counts itself in the next one)."""
    gc.collect()
    hist = type_histogram()
    s = tracemalloc.take_snapshot()
    s.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__),
                     tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
                     tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
                     tracemalloc.Filter(False, str(REPO / "bench") + "/*")]).dump(str(path))
    del s
    return hist


def analyse(label: str, n: int, before: Any, after: Any, top: int) -> list[str]:
    (p0, (c0, z0)), (p1, (c1, z1)) = before, after
    s0, s1 = tracemalloc.Snapshot.load(str(p0)), tracemalloc.Snapshot.load(str(p1))
    by_line = s1.compare_to(s0, "lineno")
    traced = sum(d.size_diff for d in by_line)
    out = [f"## {label}: {n} streams", "",
           f"traced memory: {traced / n / 1024:+.1f} KiB per stream (tracemalloc snapshot diff, after gc.collect)", ""]
    by_file = sorted(s1.compare_to(s0, "filename"), key=lambda d: -d.size_diff)
    groups: dict[str, float] = defaultdict(float)
    for st in by_file:
        groups[group(short(st.traceback[0].filename))] += st.size_diff
    out += ["### by part (file of the allocation site)", "", "| B/stream | part |", "|---:|---|"]
    for name, size in sorted(groups.items(), key=lambda kv: -kv[1]):
        if abs(size) / n >= 50:
            out.append(f"| {size / n:,.0f} | {name} |")
    out += ["", "### by file", "", "| B/stream | file |", "|---:|---|"]
    for st in by_file:
        if abs(st.size_diff) / n >= 100:
            out.append(f"| {st.size_diff / n:,.0f} | {short(st.traceback[0].filename)} |")
    out += ["", "### by allocation site (file:line)", "", "| B/stream | objs/stream | site |", "|---:|---:|---|"]
    for st in sorted(by_line, key=lambda d: -d.size_diff)[:top]:
        f = st.traceback[0]
        out.append(f"| {st.size_diff / n:,.0f} | {st.count_diff / n:.1f} | {short(f.filename)}:{f.lineno} |")
    # Attribution: the innermost gateway/ frame of each traceback, and where it allocated.
    gw_line: dict[str, float] = defaultdict(float)
    gw_pair: dict[tuple[str, str], float] = defaultdict(float)
    for st in s1.compare_to(s0, "traceback"):
        if st.size_diff == 0:
            continue
        frames = list(reversed(st.traceback))  # most recent first
        site = f"{short(frames[0].filename)}:{frames[0].lineno}"
        caller = next((f"{short(f.filename)}:{f.lineno}" for f in frames if f.filename.startswith(GATEWAY_DIR)),
                      "(no gateway frame within the traceback: event-loop callbacks)")
        gw_line[caller] += st.size_diff
        gw_pair[(caller, site)] += st.size_diff
    out += ["", "### by the innermost gateway line on the stack", "", "| B/stream | gateway line |", "|---:|---|"]
    for caller, size in sorted(gw_line.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {size / n:,.0f} | {caller} |")
    out += ["", "### gateway line -> allocation site", "", "| B/stream | gateway line | site |", "|---:|---|---|"]
    for (caller, site), size in sorted(gw_pair.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {size / n:,.0f} | {caller} | {site} |")
    out += ["", "### gc-tracked objects per stream (count, sys.getsizeof bytes)", "",
            "| objs/stream | B/stream (getsizeof) | type |", "|---:|---:|---|"]
    names = set(c1) | set(c0)
    rows = sorted(((c1[k] - c0[k], z1[k] - z0[k], k) for k in names), key=lambda r: -r[1])
    for dc, dz, k in rows[:top]:
        out.append(f"| {dc / n:.2f} | {dz / n:,.0f} | {k} |")
    own = [k for k in names if "(the __dict__ of" not in k]  # those dicts are in builtins.dict already
    total_c = sum(c1[k] - c0[k] for k in own)
    total_z = sum(z1[k] - z0[k] for k in own)
    out += ["", f"gc-tracked objects: {total_c / n:+.1f} per stream, {total_z / n / 1024:+.1f} KiB "
            "(getsizeof, shallow; bytes, str and untracked tuples not included)", ""]
    return out


async def run(args: argparse.Namespace) -> str:
    from prometheus_client import CollectorRegistry

    from gateway.app import Gateway, Server
    from gateway.config import build_config

    work = Path(tempfile.mkdtemp(prefix="gw-alloc-"))
    up_port = free_port()
    upstream = None
    clients: list[Client] = []
    server = None
    loop = asyncio.get_running_loop()
    hb = args.heartbeat
    try:
        upstream = start_upstream(work, up_port, hb)
        raw = {
            "listen": {"host": "127.0.0.1", "port": 0}, "admin": {"host": "127.0.0.1", "port": 0},
            "log_level": "warning",
            "upstreams": {"default": {"urls": [f"http://127.0.0.1:{up_port}"], "max_streams": 20000,
                                      "max_connections": 20000}},
            "clients": {"backlog": 4096, "max_connections": 20000},
            "storage": {"backend": "lmdb", "durability": "fsync", "path": str(work / "data")},
            "streams": {"heartbeat": hb},
        }
        server = Server(Gateway(build_config(raw), CollectorRegistry()))
        await server.start()
        url = "http://%s:%d" % server.addresses["main"]
        half = args.streams // 2

        async def open_with(share: float, n: int) -> None:
            c = Client(url, hb, share, work)
            clients.append(c)
            st = await loop.run_in_executor(None, c.ask, f"open {n}")
            if st["open"] != n:
                raise RuntimeError(f"only {st['open']} of {n} opened: {st}")
            await asyncio.sleep(2 * hb + 2)

        await open_with(0.0, 10)  # warm-up: 10 idle runs, 10 thread streams, kept open
        await open_with(1.0, 10)
        rss = [mem(os.getpid())["RssAnon"]]
        base = (work / "base.snap", snap(work / "base.snap"))
        await open_with(0.0, half)
        rss.append(mem(os.getpid())["RssAnon"])
        runs = (work / "runs.snap", snap(work / "runs.snap"))
        await open_with(1.0, half)
        rss.append(mem(os.getpid())["RssAnon"])
        threads = (work / "threads.snap", snap(work / "threads.snap"))
        g = git_info()
        lines = [f"# Idle-stream allocations (commit `{g['commit']}`{', dirty: ' + ', '.join(g['modified']) if g['dirty'] else ''}; "
                 f"tracemalloc {tracemalloc.get_traceback_limit()} frames, heartbeat {hb:g} s)", "",
                 f"RssAnon in this process (with tracemalloc): +{(rss[1] - rss[0]) / half:.1f} KiB per idle run, "
                 f"+{(rss[2] - rss[1]) / half:.1f} KiB per thread stream", ""]
        lines += analyse("idle run streams (POST /threads/{tid}/runs/stream)", half, base, runs, args.top)
        lines += analyse("thread streams (GET /threads/{tid}/stream)", half, runs, threads, args.top)
        lines += analyse("both kinds together", 2 * half, base, threads, args.top)
        return "\n".join(lines)
    finally:
        for c in clients:
            stop(c.proc)
        if server is not None:
            await server.stop()
        stop(upstream)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=500, help="idle streams in all, half runs, half threads (default 500)")
    p.add_argument("--frames", type=int, default=8, help="tracemalloc traceback depth (default 8)")
    p.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--out", metavar="FILE", help="also write the report here")
    args = p.parse_args()
    if args.frames != tracemalloc.get_traceback_limit():
        tracemalloc.stop()
        tracemalloc.start(args.frames)
    text = asyncio.run(run(args))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    t = time.monotonic()
    code = main()
    print(f"\n({time.monotonic() - t:.0f} s)", file=sys.stderr)
    sys.exit(code)
