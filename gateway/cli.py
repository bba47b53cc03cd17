"""Command line: ``agent-gateway [--config FILE] [--upstream URL ...] [--port N] ...`` serves;
``agent-gateway streams ...`` and ``agent-gateway check`` are the operator tools (``gateway.tools``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace

from gateway import stopsignals
from gateway.config import DEFAULT_UPSTREAM_URL, Config, ConfigError, Overrides, load_config
from gateway.eventlog import StorageError
from gateway.workers import EXIT_CONFIG, EXIT_RUNTIME, supervise  # stdlib only: nothing heavy


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, our exit code
        raise _ArgError(message)


def _parser() -> _Parser:
    from gateway.tools import COMMANDS  # the tools' own one-line summaries

    width = max(len(c) for c in COMMANDS)
    p = _Parser(
        prog="agent-gateway",
        description="Durable, resumable SSE gateway in front of LangGraph Agent Servers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="operator tools (they read the log --config FILE or --data-dir DIR names, read-only):\n"
               + "".join(f"  {c.ljust(width)}  {what}\n" for c, what in COMMANDS.items())
               + "'agent-gateway streams tail --help' (and so on) shows a tool's options.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (see config/gateway.yaml)")
    d = Config()
    p.add_argument("--host", help=f"listen address (default {d.listen.host})")
    p.add_argument("--port", type=int, help=f"listen port (default {d.listen.port})")
    p.add_argument("--admin-host", help=f"admin listener address (default {d.admin.host})")
    p.add_argument("--admin-port", type=int,
                   help=f"admin listener port: /healthz /readyz /metrics (default {d.admin.port})")
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help=f"replica URL of the default upstream; repeat for several (default {DEFAULT_UPSTREAM_URL})")
    p.add_argument("--data-dir", metavar="DIR", help=f"event log directory (default {d.storage.path})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"], help="json: one object per line, for log shippers")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes serving the port, sharing the log (one LMDB directory, or Redis)")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    return p


TOOLS = ("streams", "check")
_VALUE_OPTIONS = {"--config", "--host", "--port", "--admin-host", "--admin-port", "--upstream", "--data-dir",
                  "--log-level", "--workers", "--worker-index", "--log-format"}


def _command(argv: list[str]) -> str | None:
    """The first word that is neither an option nor an option's value: a tool's name, or None."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in _VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C in a tool, or while loading when not started by __main__.run
        return 0


def _main(argv: list[str] | None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if _command(raw) in TOOLS:
        from gateway.tools import main as tools_main

        stopsignals.release()  # a tool stops on Ctrl-C as any command does (KeyboardInterrupt)
        return tools_main(raw)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        cfg = load_config(args.config, Overrides(
            host=args.host, port=args.port, admin_host=args.admin_host, admin_port=args.admin_port,
            upstreams=tuple(args.upstream), data_dir=args.data_dir, log_level=args.log_level, workers=args.workers,
            log_format=args.log_format))
    except _ArgError as exc:
        print(f"agent-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"agent-gateway: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Imported here, not at the top: gateway.logs brings aiohttp (0.2 s), which the tools above
    # (check, streams, ...) never need; each of them starts as its own short process.
    from gateway.logs import setup as setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    if cfg.workers > 1 and args.worker_index is None:
        return supervise(list(sys.argv[1:] if argv is None else argv), cfg.workers, cfg.shutdown_grace)
    if args.worker_index is not None:
        cfg = replace(cfg, worker_index=args.worker_index)
    from gateway.app import serve  # heavy imports only once the config is good

    try:
        asyncio.run(serve(cfg))
    except StorageError as exc:
        print(f"agent-gateway: storage error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"agent-gateway: cannot listen: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


if __name__ == "__main__":
    sys.exit(main())
