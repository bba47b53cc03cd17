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
from gateway.logview import Row, check, details, event_record, matches, public, resolve, stream_events
from gateway.sse import frame

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FOLLOW_POLL = 0.2  # seconds between looks at a followed stream


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


# The commands, one line each: their help here and in ``agent-gateway --help`` (gateway.cli).
COMMANDS: dict[str, str] = {
    "streams list": "one line per stream, in key order: --live/--finished, --upstream, --thread, "
                    "--older-than/--newer-than, --json; pages with --limit N and --after KEY",
    "streams show": "one stream: metadata, head, size, times, last upstream id, end, gap markers",
    "streams tail": "the last events of a stream (-n N); -f/--follow prints new ones until the stream ends",
    "streams export": "every event of a stream, as SSE (with ids) or JSON lines (with ids and times)",
    "check": "integrity check: one line per problem and exit 1, or one line saying what was checked",
}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1 (got {text!r})")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"a whole number, 0 or more (got {text!r})")
    return n


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
    ls = ss.add_parser("list", help=COMMANDS["streams list"], parents=[common])
    state = ls.add_mutually_exclusive_group()
    state.add_argument("--live", dest="state", action="store_const", const="live", help="only streams being captured")
    state.add_argument("--finished", dest="state", action="store_const", const="finished",
                       help="only streams that ended")
    ls.add_argument("--upstream", help="only this upstream's")
    ls.add_argument("--thread", help="only this thread's runs and thread stream")
    ls.add_argument("--older-than", type=_age, metavar="AGE", help="last updated at least AGE ago (30s, 10m, 2h, 1d)")
    ls.add_argument("--newer-than", type=_age, metavar="AGE", help="last updated at most AGE ago")
    ls.add_argument("--limit", type=_positive, metavar="N",
                    help="at most N streams; when more follow, stderr says 'next page: --after KEY'")
    ls.add_argument("--after", metavar="KEY", default="", help="the streams after this key (the next page)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = ss.add_parser("show", help=COMMANDS["streams show"], parents=[common])
    show.add_argument("stream", metavar="KEY-or-RUN-ID")
    show.add_argument("--json", action="store_true")
    for name in ("tail", "export"):
        q = ss.add_parser(name, help=COMMANDS[f"streams {name}"], parents=[common])
        q.add_argument("stream", metavar="KEY-or-RUN-ID")
        q.add_argument("--format", choices=["sse", "jsonl"], default="sse")
        if name == "tail":
            q.add_argument("-n", type=_count, default=20, metavar="N", help="how many (default 20)")
            q.add_argument("-f", "--follow", action="store_true",
                           help="then print new events as they are committed, until the stream ends")
    sub.add_parser("check", help=COMMANDS["check"], parents=[common])
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
        except KeyboardInterrupt:  # Ctrl-C ends a --follow: quietly, as tail -f
            code = EXIT_INTERRUPTED
        except BaseException:
            traceback.print_exc()  # a bug: shown as it is
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the child's to handle
    try:
        with os.fdopen(r, "rb") as f:
            said = f.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, interrupt)
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
        run: Action = _check if args.command == "check" else _ACTIONS[args.action]
        return run(view, args, out, err)
    except (StorageError, _Found) as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_PROBLEMS
    except UsageError as exc:
        print(f"agent-gateway: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        view.close()


def _list(view: LogView, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """In key order, as the admin listener's pages: a cursor stays valid while streams come and go."""
    now = time.time()
    metas = sorted((m for m in view.metas() if m.key > args.after and matches(
        m, state=args.state, upstream=args.upstream, thread=args.thread, older=args.older_than,
        newer=args.newer_than, now=now)), key=lambda m: m.key)
    more = args.limit is not None and len(metas) > args.limit
    metas = metas[:args.limit]
    if args.json:
        for m in metas:
            out.write(orjson.dumps(public(m)).decode() + "\n")
    else:
        rows = [("KEY", "STATE", "END", "EVENTS", "BYTES", "HEAD", "UPDATED")]
        rows += [(m.key, public(m)["state"], m.end or "-", str(m.count), str(m.size), str(m.head),
                  time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.updated_at))) for m in metas]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    if more:  # on stderr: stdout stays the listing (JSON lines stay JSON lines)
        err.write(f"next page: --after {metas[-1].key}\n")
    return EXIT_OK


def _stream(view: LogView, args: argparse.Namespace) -> StreamMeta:
    meta = resolve(view, args.stream, args.upstreams)
    if meta is None:
        raise UsageError(f"no stream {args.stream!r} in the log (a key from 'streams list', or a run or thread id)")
    return meta


def _show(view: LogView, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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


def _events(view: LogView, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    meta = _stream(view, args)
    rows = stream_events(view, meta)
    pos = rows[-1][0] if rows else 0
    if args.action == "tail":
        rows = rows[-args.n:] if args.n > 0 else []
    _write(rows, args.format, out)
    if args.action == "tail" and args.follow:
        _follow(view, meta.key, pos, args.format, out)
    return EXIT_OK


def _follow(view: LogView, key: str, pos: int, fmt: str, out: TextIO) -> None:
    """``tail -f``: what the log commits after ``pos``, as it comes, until the stream ends (or
    leaves the log)."""
    while (meta := view.meta(key)) is not None:
        if meta.head > pos:
            rows = [(seq, body, rec.time_ms) for rec in view.records(key, upto=meta.head, after=pos)
                    for seq, _uid, body in rec.events if seq > pos]
            _write(rows, fmt, out)
            pos = rows[-1][0] if rows else pos
        if not meta.open:
            return
        time.sleep(FOLLOW_POLL)


def _write(rows: list[Row], fmt: str, out: TextIO) -> None:
    for seq, body, t in rows:
        if fmt == "jsonl":
            out.write(orjson.dumps(event_record(seq, body, t)).decode() + "\n")
        else:
            out.write(frame([(seq, body)]).decode("utf-8", "replace"))
    out.flush()


def _check(view: LogView, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """A sound log: what was checked, on stdout. Otherwise one line per problem on stdout, and the
    summary naming the log as the error line."""
    report = check(view)
    for line in report.problems:
        out.write(line + "\n")
    if report.problems:
        raise _Found(report.summary())
    out.write(report.summary() + "\n")
    return EXIT_OK


Action = Callable[[LogView, argparse.Namespace, TextIO, TextIO], int]  # the log, the arguments, stdout, stderr
_ACTIONS: dict[str, Action] = {
    "list": _list, "show": _show, "tail": _events, "export": _events}
