"""The operator commands: ``agent-gateway streams list|show|tail|export`` and ``agent-gateway check``.

They read the log the config names (``--config``, or ``--data-dir`` for LMDB) read-only,
through ``gateway.logview``, so they work while a gateway is serving it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

import orjson

from gateway.config import Config, ConfigError, Overrides, load_config, parse_duration
from gateway.eventlog import LogView, StorageError, StreamMeta, open_view
from gateway.logview import check, details, event_record, matches, public, resolve, stream_events
from gateway.sse import frame

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument: one line, exit 2."""


class _Found(Exception):
    """Problems found: the line that says so, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, our exit code
        raise UsageError(message)


def _age(text: str) -> float:
    try:
        return parse_duration("age", text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"an age such as 30s, 10m, 2h or 1d (got {text!r})") from None


def _parser() -> _Parser:
    # Which log: accepted before the command or after it (agent-gateway streams list --config F).
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="the gateway's YAML config (which log to read)")
    common.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="an LMDB data directory (instead of --config)")
    p = _Parser(prog="agent-gateway", description="Inspect and check the gateway's event log.", parents=[common])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    streams = sub.add_parser("streams", help="list, show, tail or export captured streams")
    ss = streams.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ls = ss.add_parser("list", help="one line per stream (or JSON with --json)", parents=[common])
    state = ls.add_mutually_exclusive_group()
    state.add_argument("--live", dest="state", action="store_const", const="live", help="only streams being captured")
    state.add_argument("--finished", dest="state", action="store_const", const="finished",
                       help="only streams that ended")
    ls.add_argument("--upstream", help="only this upstream's")
    ls.add_argument("--thread", help="only this thread's runs and thread stream")
    ls.add_argument("--older-than", type=_age, metavar="AGE", help="last updated at least AGE ago (30s, 10m, 2h, 1d)")
    ls.add_argument("--newer-than", type=_age, metavar="AGE", help="last updated at most AGE ago")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = ss.add_parser("show", help="one stream: metadata, head, size, times, last upstream id, end, gap markers",
                         parents=[common])
    show.add_argument("stream", metavar="KEY-or-RUN-ID")
    show.add_argument("--json", action="store_true")
    for name, what in (("tail", "the last events"), ("export", "every event")):
        q = ss.add_parser(name, help=f"{what} of a stream, as SSE (with ids) or JSON lines (with ids and times)",
                          parents=[common])
        q.add_argument("stream", metavar="KEY-or-RUN-ID")
        q.add_argument("--format", choices=["sse", "jsonl"], default="sse")
        if name == "tail":
            q.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    sub.add_parser("check", help="offline integrity check: one line per problem, exit 1 if any", parents=[common])
    return p


def main(argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        args = _parser().parse_args(argv)
        cfg = load_config(getattr(args, "config", None), Overrides(data_dir=getattr(args, "data_dir", None)))
    except UsageError as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"agent-gateway: config error: {exc}", file=err)
        return EXIT_USAGE
    args.upstreams = [u.name for u in cfg.upstreams]  # a run or thread id is resolved under these
    if cfg.storage.backend == "lmdb":
        return _isolated(lambda: _run(cfg, args, out, err), str(Path(cfg.storage.path) / "data.mdb"), err)
    return _run(cfg, args, out, err)


def _isolated(run: Callable[[], int], where: str, err: TextIO) -> int:
    """``run()`` in a child process. On some damaged pages LMDB does not return an error but
    aborts the process (a failed assertion, a bad pointer followed): the parent turns that into
    the one line every other damage gets."""
    sys.stdout.flush()
    err.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its stderr, LMDB's included, goes to the parent
        os.close(r)
        os.dup2(w, 2)
        code = EXIT_PROBLEMS
        try:
            code = run()
        except BaseException:
            traceback.print_exc()  # a bug: shown as it is
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        last = said.strip().splitlines()[-1:]
        why = signal.Signals(os.WTERMSIG(status)).name + "".join(f": {line.strip()}" for line in last)
        print(f"agent-gateway: {where}: damaged, LMDB stopped reading it ({why})", file=err)
        return EXIT_PROBLEMS
    err.write(said)
    return os.waitstatus_to_exitcode(status)


def _run(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        view = open_view(cfg.storage)
    except StorageError as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_PROBLEMS
    try:
        run: Callable[[LogView, argparse.Namespace, TextIO], int] = (
            _check if args.command == "check" else _ACTIONS[args.action])
        return run(view, args, out)
    except (StorageError, _Found) as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_PROBLEMS
    except UsageError as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_USAGE
    finally:
        view.close()


def _list(view: LogView, args: argparse.Namespace, out: TextIO) -> int:
    now = time.time()
    metas = sorted((m for m in view.metas() if matches(m, state=args.state, upstream=args.upstream,
                                                         thread=args.thread, older=args.older_than,
                                                         newer=args.newer_than, now=now)),
                   key=lambda m: m.updated_at)
    if args.json:
        for m in metas:
            out.write(orjson.dumps(public(m)).decode() + "\n")
        return EXIT_OK
    rows = [("KEY", "STATE", "EVENTS", "BYTES", "HEAD", "UPDATED")]
    rows += [(m.key, public(m)["state"], str(m.count), str(m.size), str(m.head),
              time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.updated_at))) for m in metas]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    return EXIT_OK


def _stream(view: LogView, args: argparse.Namespace) -> StreamMeta:
    meta = resolve(view, args.stream, args.upstreams)
    if meta is None:
        raise UsageError(f"no stream {args.stream!r} in the log (a key from 'streams list', or a run or thread id)")
    return meta


def _show(view: LogView, args: argparse.Namespace, out: TextIO) -> int:
    d = details(view, _stream(view, args))
    doc: dict[str, Any] = {**d.meta, "events_held": d.events, "first_event_at": d.first_event_at,
                           "last_event_at": d.last_event_at, "gap_markers": d.gaps, "error_events": d.errors}
    if args.json:
        out.write(orjson.dumps(doc).decode() + "\n")
        return EXIT_OK
    for k, v in doc.items():
        if k in ("first_event_at", "last_event_at", "created_at", "updated_at") and isinstance(v, (int, float)):
            v = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(v))}.{int(v * 1000) % 1000:03d} UTC"
        out.write(f"{k + ':':18} {v}\n")
    return EXIT_OK


def _events(view: LogView, args: argparse.Namespace, out: TextIO) -> int:
    rows = stream_events(view, _stream(view, args))
    if args.action == "tail":
        rows = rows[-args.n:] if args.n > 0 else []
    for seq, body, t in rows:
        if args.format == "jsonl":
            out.write(orjson.dumps(event_record(seq, body, t)).decode() + "\n")
        else:
            out.write(frame([(seq, body)]).decode("utf-8", "replace"))
    return EXIT_OK


def _check(view: LogView, args: argparse.Namespace, out: TextIO) -> int:
    """A sound log: what was checked, on stdout. Otherwise one line per problem on stdout, and the
    summary naming the log as the error line."""
    report = check(view)
    for line in report.problems:
        out.write(line + "\n")
    if report.problems:
        raise _Found(report.summary())
    out.write(report.summary() + "\n")
    return EXIT_OK


_ACTIONS: dict[str, Callable[[LogView, argparse.Namespace, TextIO], int]] = {
    "list": _list, "show": _show, "tail": _events, "export": _events}
