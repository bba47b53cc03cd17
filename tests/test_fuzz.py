"""Property-based fuzzing of the Agent Server OpenAPI, through the gateway and straight to `langgraph dev`.

Schemathesis generates requests from the server's own spec (`GET /openapi.json`). Each request
goes to the gateway and, at the same moment, straight to the server, and the two answers are
compared (see tests/support/fuzz.py for how each side gets its own twin objects). The properties:

* No response the gateway makes itself (aiohttp's `Server` header, not the relayed
  `server: uvicorn`) is a 5xx. The upstream is healthy throughout, so 502/503/504 have no cause.
* Every error the gateway makes itself is the API's shape, `application/json` `{"detail": str}`.
* A relayed response keeps the server's `Content-Type`, and the gateway never cuts an exchange
  that the server completes.
* The status equals the server's, except where `ALLOWED` below says why. Each entry is either
  documented in the README, or a known gateway bug that is listed so the test stays honest.
* Nothing logs an ERROR meanwhile (the gateway's loggers, aiohttp's, asyncio's). Afterwards the
  gateway is healthy: `/healthz` answers 200, every capture has ended, and its asyncio tasks are
  back near where they started.

After the spec's operations (and `GET /runs/{run_id}/stream`, which only the gateway serves), a
raw pass sends byte-level broken HTTP over a socket to both.

`test_fuzz_openapi` is the CI-sized run: deterministic (derandomized Hypothesis, fixed pools),
about a minute and a half on two cores. `test_fuzz_openapi_long` runs more examples and
schemathesis' negative mode. It is marked `fuzz_long` and runs only with GATEWAY_FUZZ_LONG=1:

    GATEWAY_FUZZ_LONG=1 .venv/bin/python -m pytest -q tests/test_fuzz.py -m fuzz_long -p no:cacheprovider

GATEWAY_FUZZ_EXAMPLES and GATEWAY_FUZZ_BUDGET_S (seconds) override the long run's size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from tests.conftest import RunningGateway, gateway_config
from tests.support.fuzz import (
    GATEWAY_ONLY_PATH,
    RAW_LABEL,
    Allowance,
    Budget,
    Exchange,
    Fuzzer,
    Limits,
    Report,
    add_gateway_only_operations,
    build_pool,
    delete_crons,
)

# Schemathesis registers its own strategy for the `email` format when it builds strategies, and
# Hypothesis warns that a standard format is being overridden. That is schemathesis' intent.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Overriding standard format:hypothesis.errors.HypothesisWarning")

LONG_ENV = "GATEWAY_FUZZ_LONG"


# --- the allow-list: every way the gateway's status may differ from the server's, and why ----------

def _lei_refused(ex: Exchange) -> bool:
    """The gateway refused the Last-Event-ID itself, with its own 422 `{"detail"}`."""
    return ex.gw.status == 422 and ex.gw.by_gateway and ex.lei is not None and b"Last-Event-ID" in ex.gw.body


def _gateway_detail(ex: Exchange, status: int, text: bytes) -> bool:
    """The gateway itself answered `status`, with `text` in its `{"detail"}`."""
    return ex.gw.status == status and ex.gw.by_gateway and text in ex.gw.body


RUN_JOIN = "GET /threads/{thread_id}/runs/{run_id}/stream"
THREAD_STREAM = "GET /threads/{thread_id}/stream"
STATELESS_JOIN = f"GET {GATEWAY_ONLY_PATH}"

ALLOWED: list[Allowance] = [
    # README, "What the gateway does to streams": POST /runs/stream's Location, /runs/{rid}/stream,
    # "is served from the log, so stateless runs become resumable. The upstream answers 404 there."
    Allowance(STATELESS_JOIN, "documented",
              "stateless run joins are served from the gateway's log; the server has no such route (404)",
              lambda ex: ex.direct.status == 404 and ex.gw.by_gateway and ex.gw.status == 200),
    # README, "Errors": 422 for "a malformed run id on GET /runs/{rid}/stream (the route the gateway
    # serves for stateless runs), as the Agent Server answers malformed ids". The server: no route, 404.
    Allowance(STATELESS_JOIN, "documented",
              "stateless run join with a malformed run id: the gateway's 422, as the server's other routes",
              lambda ex: ex.direct.status == 404 and _gateway_detail(ex, 422, b"Invalid run ID")),
    # The same join with an id the gateway cannot place: README, "A malformed id gets 422, and so does
    # an id the gateway has not sent yet". The gateway checks the id before it looks the run up, so
    # this holds for runs it does not hold too; the server answers 404 for the route.
    Allowance(STATELESS_JOIN, "documented",
              "stateless run join with a Last-Event-ID outside the gateway's ids: the gateway's 422",
              lambda ex: ex.direct.status == 404 and _lei_refused(ex)),
    # README, resume semantics: the ids on the join endpoints are the gateway's own integers; "A
    # malformed id gets 422 {"detail": ...}, and so does an id the gateway has not sent yet." The
    # server takes its own `ms-seq` ids (and digits it never sent) with a 200, and ignores the
    # `last_event_id` query parameter that the gateway reads for EventSource clients.
    Allowance(RUN_JOIN, "documented",
              "run join: Last-Event-ID is in the gateway's id space; others get the gateway's 422",
              lambda ex: ex.direct.status == 200 and _lei_refused(ex)),
    Allowance(THREAD_STREAM, "documented",
              "thread stream: Last-Event-ID is in the gateway's id space; others get the gateway's 422",
              lambda ex: ex.direct.status == 200 and _lei_refused(ex)),
    # README, resume semantics: "-1, - or 0: from the beginning" on both join endpoints. The server's
    # thread stream refuses -1 ("must be a valid Redis stream ID") and takes only - and 0. (When the
    # gateway opens the capture for this request, the 200 carries the upstream's headers.)
    Allowance(THREAD_STREAM, "documented",
              "thread stream: Last-Event-ID -1 means 'from the beginning' at the gateway; the server's 422",
              lambda ex: ex.lei is not None and ex.lei.strip() == "-1" and ex.direct.status == 422
              and ex.gw.status == 200),
    # README, "Replays keep the upstream's auth": before serving a held stream from its log, the
    # gateway asks the upstream for the run (or thread) and "relays the upstream's 401/403/404 if it
    # refuses". So a held run or thread that was deleted since gets that 404 (JSON, from uvicorn).
    # The server answers a join of an unknown run with 200 and an `error` event ("404: Run not
    # found"), and an unknown thread's stream with 200 and heartbeats.
    Allowance(RUN_JOIN, "documented",
              "run join of a held run deleted upstream since: the upstream's 404 from the access check",
              lambda ex: ex.gw.status == 404 and not ex.gw.by_gateway and ex.direct.status == 200
              and b"404: Run not found" in ex.direct.body),
    Allowance(THREAD_STREAM, "documented",
              "thread stream of a held thread deleted upstream since: the upstream's 404 from the access check",
              lambda ex: ex.gw.status == 404 and not ex.gw.by_gateway and ex.direct.status == 200
              and b"not found" in ex.gw.body),
    # README, "Errors": 502 when "the upstream broke the exchange". The server fails some
    # requests itself (a store search with a huge offset: a reset, or its own 500), and not always
    # the same way twice: where it failed the gateway's request, the gateway's 502 says so.
    Allowance("*", "documented",
              "the server failed the request itself (a reset or a 5xx): the gateway's 502 with a detail",
              lambda ex: _gateway_detail(ex, 502, b"detail") and (ex.direct.error is not None
                                                                  or (ex.direct.status or 0) >= 500)),
    # README, "The public listener": "A malformed request gets 400 {"detail": "malformed HTTP
    # request"}". aiohttp's parser refuses some requests that uvicorn takes (e.g. `GET *`).
    Allowance(RAW_LABEL, "documented",
              "raw HTTP the gateway's parser refuses: its 400 'malformed HTTP request'",
              lambda ex: _gateway_detail(ex, 400, b"malformed HTTP request")),
]


# --- plumbing ---------------------------------------------------------------------------------------

def fetch_spec(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/openapi.json", timeout=30) as r:
        spec: dict[str, Any] = json.loads(r.read())
    return spec


class _GatewayErrors(logging.Handler):
    """Every ERROR logged while the fuzz runs: 'never crashes' includes 'never logs a crash'."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _gateway_tasks() -> int:
    return len(asyncio.all_tasks())


async def _settle(gw: RunningGateway, timeout: float = 30.0) -> bool:
    """Wait until the gateway holds no live capture and no client; False if it still does after `timeout`."""
    hub = gw.gw.hub
    deadline = time.monotonic() + timeout
    while (hub.live_count() or hub.followers) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return not (hub.live_count() or hub.followers)


async def fuzz(gw: RunningGateway, upstream_url: str, budget: Budget) -> tuple[Report, list[str]]:
    """Run the fuzz against `gw` and its upstream; returns the report and every property violated."""
    import schemathesis

    loop = asyncio.get_running_loop()
    spec = await asyncio.to_thread(fetch_spec, upstream_url)
    via_gateway = await asyncio.to_thread(fetch_spec, gw.url)
    assert via_gateway == spec, "the gateway changed the server's /openapi.json"
    schema = schemathesis.openapi.from_dict(add_gateway_only_operations(spec))
    tag = uuid.uuid4().hex[:8]
    gw_pool, direct_pool = await asyncio.gather(asyncio.to_thread(build_pool, gw.url, tag),
                                                asyncio.to_thread(build_pool, upstream_url, tag))
    hub = gw.gw.hub
    await _settle(gw)
    baseline = len(asyncio.all_tasks())

    def probe() -> int:
        return asyncio.run_coroutine_threadsafe(_gateway_tasks(), loop).result(10)

    errors = _GatewayErrors()
    # The gateway's own loggers, aiohttp's (an exception that escaped a handler), and asyncio's (a
    # task that died with nobody to see it): the gateway runs on this test's loop.
    loggers = [logging.getLogger(name) for name in ("gateway", "aiohttp.server", "aiohttp.web", "asyncio")]
    for lg in loggers:
        lg.addHandler(errors)
    stop = threading.Event()
    fuzzer = Fuzzer(schema, gw_pool, direct_pool, ALLOWED, budget, probe, stop)
    try:
        report = await asyncio.to_thread(fuzzer.run)
    finally:
        stop.set()
        await asyncio.to_thread(fuzzer.close)
        for lg in loggers:
            lg.removeHandler(errors)
        await asyncio.to_thread(delete_crons, upstream_url)

    problems = [str(f) for f in report.findings]
    problems += [f"[gateway logged an error] {r.name}: {r.getMessage()}" for r in errors.records]
    # The gateway is still well: alive, every capture over, its tasks back near the baseline.
    if not await _settle(gw):
        problems.append(f"[gateway leak] {hub.live_count()} captures and {len(hub.followers)} followers "
                        "still live 30s after the fuzz ended")
    await asyncio.sleep(0.5)
    after = len(asyncio.all_tasks())
    if after > baseline + 5:
        names = sorted(t.get_name() for t in asyncio.all_tasks())
        problems.append(f"[gateway leak] {after} asyncio tasks after the fuzz, {baseline} before: {names}")
    if report.task_counts and max(report.task_counts) > baseline + 200:
        problems.append(f"[gateway leak] asyncio tasks peaked at {max(report.task_counts)} (baseline {baseline})")

    def health() -> int:
        with urllib.request.urlopen(gw.admin_url + "/healthz", timeout=10) as r:
            return int(r.status)

    status = await asyncio.to_thread(health)
    if status != 200:
        problems.append(f"[gateway unhealthy] /healthz answered {status}")
    return report, problems


async def _start_gateway(make_gateway: Callable[..., Awaitable[RunningGateway]], upstream_url: str,
                         tmp_path: Path) -> RunningGateway:
    # A short thread_linger, so thread-stream captures end soon after the fuzz and the leak check
    # can ask for zero live captures.
    return await make_gateway(gateway_config(tmp_path, {"default": {"urls": [upstream_url]}},
                                             streams={"thread_linger": "500ms"}))


def _verdict(report: Report, problems: list[str], *, min_captures: int) -> None:
    summary = report.summary(ALLOWED)
    print(summary)
    for (op, reason), ex in report.allowed_examples.items():
        print(f"\nallowed, first example ({reason}):\n{ex.repro()}")
    # A budget cut (a slow machine) is reported in the summary, not failed: what ran was still checked.
    # The hooks must really reach the capture path, or the fuzz tests nothing that matters.
    for op in ("POST /threads/{thread_id}/runs/stream", "POST /runs/stream",
               "GET /threads/{thread_id}/runs/{run_id}/stream", "GET /threads/{thread_id}/stream"):
        assert report.captured_200[op] >= min_captures, f"the fuzz rarely reached the capture path of {op}:\n{summary}"
    assert not problems, f"{len(problems)} problem(s):\n\n" + "\n\n".join(problems[:30]) + "\n\n" + summary


# --- the tests ------------------------------------------------------------------------------------

# About 400 exchanges: 4 per operation, 14 per capture endpoint and run-creating operation, 40 raw
# (the long fuzz, GATEWAY_FUZZ_LONG=1, is the deep one; this one keeps every operation in reach).
CI_BUDGET = Budget(examples=4, capture_examples=14, raw_examples=40, wall=240.0, limits=Limits(read=1.5))


@pytest.fixture(autouse=True)
def _hypothesis_home(tmp_path: Path) -> Any:
    """Keep Hypothesis' caches (charmap, constants) out of the work tree."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.mark.timeout(420)
async def test_fuzz_openapi(make_gateway: Callable[..., Awaitable[RunningGateway]], langgraph_server: Any,
                            tmp_path: Path) -> None:
    gw = await _start_gateway(make_gateway, langgraph_server.url, tmp_path)
    report, problems = await fuzz(gw, langgraph_server.url, CI_BUDGET)
    _verdict(report, problems, min_captures=3)


@pytest.mark.fuzz_long
@pytest.mark.timeout(int(os.environ.get("GATEWAY_FUZZ_BUDGET_S", "900")) + 300)
async def test_fuzz_openapi_long(make_gateway: Callable[..., Awaitable[RunningGateway]], langgraph_server: Any,
                                 tmp_path: Path) -> None:
    if not os.environ.get(LONG_ENV):
        pytest.skip(f"the long fuzz runs only with {LONG_ENV}=1")
    examples = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "25"))
    budget = Budget(examples=examples, capture_examples=2 * examples, raw_examples=10 * examples,
                    wall=float(os.environ.get("GATEWAY_FUZZ_BUDGET_S", "900")), negative=True,
                    limits=Limits(read=2.0))
    gw = await _start_gateway(make_gateway, langgraph_server.url, tmp_path)
    report, problems = await fuzz(gw, langgraph_server.url, budget)
    _verdict(report, problems, min_captures=10)
