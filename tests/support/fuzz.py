"""Differential property-based fuzzing of the Agent Server API: the gateway against the server itself.

Schemathesis generates requests from the Agent Server's own OpenAPI spec. Each request is sent
twice at the same moment: through the gateway, and straight to the server. The two answers are
then compared. Each side has its own copy of every object a request can name:

* **Pools.** Threads, runs, a stateless run, assistants and event ids are created once per side
  before the fuzz. Generated requests name them through placeholder tokens such as `zqT0zq`.
  The token becomes the gateway-side object in the request sent to the gateway, and the
  direct-side twin in the one sent to the server. A request that mutates one pool therefore
  mutates the other in the same way.
* **Fresh ids.** Every UUID the fuzz made up is rewritten for the direct side (`direct_uuid`).
  A `POST /threads {"thread_id": X}` sent both ways creates two threads, not one and a 409.

The hooks (`_fixed_case`) make most run-creating requests valid on purpose: a real graph, a
small input, a thread that exists, and a `stream_mode` from the valid set. Without them almost
every generated request fails validation upstream, and the fuzz never reaches the gateway's
capture path. `sanitize` then bounds whatever the fuzz generated: it caps `n` and `delay` so
a run never outlives the test, drops `after_seconds`, and removes every `webhook`. The server
would call a webhook URL itself, and nothing here may talk to anything but 127.0.0.1.

Every response body is read up to a byte cap and a wall-clock cap. A thread stream never ends,
and a `/wait` may wait, so hitting the cap counts as a normal end, never a failure.

A last pass (`raw_requests`) sends bytes that no HTTP library would send: broken request lines,
odd bytes in targets and headers, and conflicting body framing. It goes over a plain socket,
because only there do the gateway's HTTP parser and uvicorn's meet.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.sse import dechunk

# --- placeholders -----------------------------------------------------------------------------

N_THREADS = 3  # threads per side; each has RUNS_PER_THREAD runs
RUNS_PER_THREAD = 3  # 0: streamed ticker (resumable), 1: failed, 2: background ticker
N_ASSISTANTS = 2
N_EVENT_IDS = 3  # first, middle and last id of thread 0's streamed run

GRAPHS = ("ticker", "fail", "interrupt")
RUN_MODES = ("values", "updates", "custom", "debug", "events", "tasks", "checkpoints", "messages-tuple")
_TOKEN = re.compile(r"zq([TRSAE])(\d+)(?:_(\d+))?zq")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def thread_tok(i: int) -> str:
    return f"zqT{i}zq"


def run_tok(i: int, j: int) -> str:
    return f"zqR{i}_{j}zq"


def stateless_tok(i: int) -> str:
    return f"zqS{i}zq"


def assistant_tok(i: int) -> str:
    return f"zqA{i}zq"


def event_tok(i: int) -> str:
    return f"zqE{i}zq"


THREAD_TOKENS = [thread_tok(i) for i in range(N_THREADS)]
RUN_TOKENS = [run_tok(i, j) for i in range(N_THREADS) for j in range(RUNS_PER_THREAD)]
ASSISTANT_TOKENS = [assistant_tok(i) for i in range(N_ASSISTANTS)]
EVENT_TOKENS = [event_tok(i) for i in range(N_EVENT_IDS)]


def direct_uuid(u: str) -> str:
    """The direct side's twin of a UUID the fuzz made up: the same shape, a different id."""
    tail = int(u[-4:], 16) ^ 0xD1EC
    return u[:-4] + (format(tail, "04X") if u[-4:].isupper() else format(tail, "04x"))


@dataclass
class Pool:
    """One side's objects, by placeholder token."""

    base: str
    ids: dict[str, str] = field(default_factory=dict)

    def resolve(self, text: str, *, direct: bool) -> str:
        if direct:
            text = _UUID.sub(lambda m: direct_uuid(m.group(0)), text)
        return _TOKEN.sub(lambda m: self.ids.get(m.group(0), m.group(0)), text)

    def resolve_value(self, value: Any, *, direct: bool) -> Any:
        if isinstance(value, str):
            return self.resolve(value, direct=direct)
        if isinstance(value, list):
            return [self.resolve_value(v, direct=direct) for v in value]
        if isinstance(value, tuple):
            return tuple(self.resolve_value(v, direct=direct) for v in value)
        if isinstance(value, dict):
            return {k: self.resolve_value(v, direct=direct) for k, v in value.items()}
        return value


# --- bounding what the fuzz may make the server do ----------------------------------------------

def sanitize(value: Any) -> Any:
    """The body with every run bounded: small `n` and `delay`, no `after_seconds`, no `webhook`."""
    if isinstance(value, list):
        return [sanitize(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k in ("webhook", "after_seconds"):
            continue  # a webhook is an outbound call by the server; after_seconds parks a run
        if k == "n" and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 5:
            v = 3
        elif k == "delay" and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0.05:
            v = 0.01
        out[k] = sanitize(v)
    return out


# --- one exchange ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    connect: float = 3.0
    read: float = 2.0  # per socket read, and the wall-clock cap on one body
    body_bytes: int = 64 << 10


@dataclass
class Wire:
    """What one side answered (or how it failed)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    error: str | None = None  # transport failure before the status line, e.g. "connection: ..."
    unsendable: str | None = None  # the client library refused the request
    body_capped: bool = False  # stopped reading at a cap (normal for streams)
    body_cut: str | None = None  # the body broke mid-way (connection cut / bad chunking)
    version: str = "1.1"  # of the status line (raw requests only; requests refuses anything but 1.x)
    elapsed: float = 0.0

    @property
    def server(self) -> str:
        return self.headers.get("server", "")

    @property
    def by_gateway(self) -> bool:
        """Made by the gateway itself (aiohttp's Server header), not relayed from uvicorn."""
        return self.status is not None and "uvicorn" not in self.server.lower()

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def json(self) -> Any:
        return json.loads(self.body)

    def brief(self) -> str:
        if self.unsendable:
            return f"unsendable({self.unsendable})"
        if self.error:
            return f"error({self.error})"
        who = ("gateway" if self.by_gateway else "upstream") + ("" if self.version in ("1.0", "1.1")
                                                                 else f"; status line HTTP/{self.version}")
        body = self.body[:160].decode("utf-8", "replace")
        return f"{self.status} [{who}; {self.content_type or 'no content-type'}] {body!r}"


@dataclass(frozen=True)
class Sent:
    """A request as sent to one side, ready to replay."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    raw: bytes | None = None  # the exact bytes, for a raw HTTP request
    base: str = ""  # where a raw request goes

    def curl(self) -> str:
        if self.raw is not None:
            host, port = self.base.removeprefix("http://").rsplit(":", 1)
            return (f"python3 -c 'import socket; s = socket.create_connection((\"{host}\", {port})); "
                    f"s.sendall({self.raw!r}); print(s.recv(65536))'")
        parts = ["curl", "-sS", "-i", "--max-time", "5", "-X", self.method]
        for k, v in self.headers.items():
            if k.lower() in ("user-agent", "accept-encoding", "connection", "content-length",
                             "x-schemathesis-testcaseid"):
                continue
            parts += ["-H", f"{k}: {v}"]
        if self.body:
            parts += ["--data-binary", self.body.decode("utf-8", "surrogateescape")]
        parts.append(self.url)
        return " ".join(shlex.quote(p) for p in parts)

    def python(self) -> str:
        hdrs = {k: v for k, v in self.headers.items()
                if k.lower() not in ("user-agent", "accept-encoding", "connection", "content-length",
                                     "x-schemathesis-testcaseid")}
        return (f"requests.request({self.method!r}, {self.url!r}, headers={hdrs!r}, data={self.body!r}, "
                "timeout=5, stream=True)")


def prepare(kwargs: Mapping[str, Any]) -> Sent:
    """Schemathesis' requests kwargs as one exact request (URL with query, final headers, body bytes)."""
    req = requests.Request(method=kwargs["method"], url=kwargs["url"], headers=dict(kwargs.get("headers") or {}),
                           params=kwargs.get("params") or None, json=kwargs.get("json"), data=kwargs.get("data"),
                           files=kwargs.get("files"))
    p = req.prepare()
    raw = p.body
    if isinstance(raw, str):
        raw = raw.encode()
    if raw is not None and not isinstance(raw, bytes):
        raise TypeError(f"a streamed request body ({type(raw).__name__})")
    assert p.url is not None and p.method is not None
    headers = {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in p.headers.items()}
    return Sent(p.method, p.url, headers, raw)


def send(session: requests.Session, sent: Sent, limits: Limits) -> Wire:
    """Send one request; read at most `limits.body_bytes` of the body for at most `limits.read` seconds."""
    t0 = time.monotonic()
    try:
        resp = session.request(sent.method, sent.url, headers=sent.headers, data=sent.body, stream=True,
                               timeout=(limits.connect, limits.read), allow_redirects=False)
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema, UnicodeError, ValueError) as exc:
        return Wire(unsendable=f"{type(exc).__name__}: {str(exc)[:120]}")
    except requests.exceptions.RequestException as exc:
        return Wire(error=f"{type(exc).__name__}: {str(exc)[:200]}", elapsed=time.monotonic() - t0)
    wire = Wire(status=resp.status_code, headers={k.lower(): v for k, v in resp.headers.items()})
    buf = bytearray()
    deadline = time.monotonic() + limits.read
    try:
        for chunk in resp.raw.stream(4096, decode_content=False):
            buf += chunk
            if len(buf) >= limits.body_bytes or time.monotonic() >= deadline:
                wire.body_capped = True
                break
    except Exception as exc:  # urllib3's ReadTimeoutError, ProtocolError (a cut), ...
        if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
            wire.body_capped = True
        else:
            wire.body_cut = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        resp.close()
    wire.body = bytes(buf)
    wire.elapsed = time.monotonic() - t0
    return wire


# --- the pools ----------------------------------------------------------------------------------

def _json(resp: requests.Response) -> Any:
    resp.raise_for_status()
    return resp.json()


def _run_id_of(resp: requests.Response) -> str:
    loc = resp.headers.get("Content-Location") or resp.headers.get("Location") or ""
    m = re.search(r"/runs/([0-9a-fA-F-]{36})", loc)
    assert m, f"no run id in {dict(resp.headers)!r}"
    return m.group(1)


def _sse_ids(text: str) -> list[str]:
    return [line[3:].strip() for line in text.replace("\r\n", "\n").split("\n") if line.startswith("id:")]


def build_pool(base: str, tag: str) -> Pool:
    """One side's objects: threads with finished runs of each kind, a stateless run, assistants, ids.

    Each thread's runs are made one after another, as before; the threads (and the stateless run
    and the assistants) are independent of each other, so they are made side by side: most of the
    time is the server's queue picking each run up."""
    pool = Pool(base)
    with ThreadPoolExecutor(N_THREADS + 1, thread_name_prefix="fuzz-pool") as ex:
        parts = [ex.submit(_pool_thread, base, tag, i) for i in range(N_THREADS)] + [ex.submit(_pool_rest, base, tag)]
        for part in parts:
            pool.ids.update(part.result())
    return pool


def _pool_thread(base: str, tag: str, i: int) -> dict[str, str]:
    """Thread `i` of one side's pool with its runs (and, for thread 0, the event ids), by token."""
    ids: dict[str, str] = {}
    with requests.Session() as s:
        def post(path: str, body: Any, **kw: Any) -> requests.Response:
            return s.post(base + path, json=body, timeout=30, **kw)

        tid = _json(post("/threads", {"metadata": {"fuzz": tag, "slot": i}}))["thread_id"]
        ids[thread_tok(i)] = tid
        with post(f"/threads/{tid}/runs/stream", {
            "assistant_id": "ticker", "input": {"n": 3, "delay": 0.01}, "stream_mode": ["custom", "values"],
            "stream_resumable": True}, stream=False) as r:
            r.raise_for_status()
            ids[run_tok(i, 0)] = _run_id_of(r)
            if i == 0:
                eids = _sse_ids(r.text)
                assert len(eids) >= 3, f"no event ids on {base}: {r.text[:300]!r}"
                for k, eid in enumerate((eids[0], eids[len(eids) // 2], eids[-1])):
                    ids[event_tok(k)] = eid
        with post(f"/threads/{tid}/runs/wait", {"assistant_id": "fail", "input": {}}) as r:
            r.raise_for_status()
            ids[run_tok(i, 1)] = _run_id_of(r)
        bg = _json(post(f"/threads/{tid}/runs", {"assistant_id": "ticker", "input": {"n": 2, "delay": 0.01}}))
        ids[run_tok(i, 2)] = bg["run_id"]
        with s.get(f"{base}/threads/{tid}/runs/{bg['run_id']}/join", timeout=30) as r:
            r.raise_for_status()
    return ids


def _pool_rest(base: str, tag: str) -> dict[str, str]:
    """The stateless run and the assistants of one side's pool, by token."""
    ids: dict[str, str] = {}
    with requests.Session() as s:
        def post(path: str, body: Any, **kw: Any) -> requests.Response:
            return s.post(base + path, json=body, timeout=30, **kw)

        with post("/runs/stream", {"assistant_id": "ticker", "input": {"n": 2, "delay": 0.01}}) as r:
            r.raise_for_status()
            ids[stateless_tok(0)] = _run_id_of(r)
        for i in range(N_ASSISTANTS):
            ids[assistant_tok(i)] = _json(post("/assistants", {
                "graph_id": "ticker", "name": f"fuzz-{tag}-{i}", "metadata": {"fuzz": tag}}))["assistant_id"]
    return ids


def delete_crons(base: str) -> int:
    """Remove every cron (the fuzz may have made valid ones; they would fire for the rest of the session)."""
    n = 0
    with requests.Session() as s:
        for _ in range(20):
            with s.post(base + "/runs/crons/search", json={"limit": 100}, timeout=10) as r:
                crons = r.json() if r.status_code == 200 else []
            if not crons:
                break
            for c in crons:
                with s.delete(f"{base}/runs/crons/{c['cron_id']}", timeout=10):
                    n += 1
    return n


# --- generation ---------------------------------------------------------------------------------

# Operations whose body creates a run; the hooks make it valid most of the time.
RUN_OPS = {
    "POST /threads/{thread_id}/runs": False, "POST /threads/{thread_id}/runs/stream": False,
    "POST /threads/{thread_id}/runs/wait": False,
    "POST /runs": True, "POST /runs/stream": True, "POST /runs/wait": True,
}  # value: stateless
# The endpoints whose responses the gateway captures or serves from its log.
CAPTURE_OPS = ("POST /threads/{thread_id}/runs/stream", "POST /runs/stream", "POST /threads/{thread_id}/runs",
               "GET /threads/{thread_id}/runs/{run_id}/stream", "GET /runs/{run_id}/stream",
               "GET /threads/{thread_id}/stream")
# Assistant operations that change or delete an assistant: only ever aimed at the fuzz's own
# assistants, never at the graphs' system assistants that the rest of the suite uses.
ASSISTANT_MUTATIONS = ("DELETE /assistants/{assistant_id}", "PATCH /assistants/{assistant_id}",
                       "POST /assistants/{assistant_id}/latest")

GATEWAY_ONLY_PATH = "/runs/{run_id}/stream"
RAW_LABEL = "RAW HTTP"  # the label of the raw-bytes pass in reports and in the allow-list


def add_gateway_only_operations(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec plus `GET /runs/{run_id}/stream`, which only the gateway serves (stateless joins)."""
    spec = json.loads(json.dumps(spec))
    spec["paths"][GATEWAY_ONLY_PATH] = {"get": {
        "summary": "Join a stateless run stream (gateway only)",
        "operationId": "gateway_join_stateless_run_stream",
        "parameters": [
            {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "stream_mode", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "Success", "content": {"text/event-stream": {"schema": {
            "type": "string"}}}}},
    }}
    return spec


_LAST_EVENT_IDS = st.sampled_from([None, "-1", "0", "-", *EVENT_TOKENS, "1795399159360-0", "99999999999999999",
                                   "abc", "1-2-3"])
_RUN_STREAM_MODES = st.sampled_from([None, "custom", "values", "updates", '["custom","values"]', '["custom"]',
                                     "bogus", "[bad", "values,custom"])
_THREAD_STREAM_MODES = st.sampled_from([None, "run_modes", "lifecycle", "lifecycle,state_update",
                                        "run_modes,state_update", "values", "", "lifecycle,", " "])


def _run_body(draw: Callable[[st.SearchStrategy[Any]], Any], generated: Any, *, stateless: bool) -> dict[str, Any]:
    """A run-creating body that validates: a real graph, a small input, valid modes."""
    body: dict[str, Any] = dict(generated) if isinstance(generated, dict) and draw(st.booleans()) else {}
    for k in ("checkpoint", "command", "interrupt_before", "interrupt_after", "config", "context"):
        if draw(st.integers(0, 3)) > 0:
            body.pop(k, None)  # usually drop the parts that make a valid run fail at once
    body["assistant_id"] = draw(st.sampled_from(GRAPHS))
    body["input"] = {"n": draw(st.integers(0, 3)), "delay": draw(st.sampled_from([0, 0.01]))}
    mode = draw(st.one_of(st.none(), st.sampled_from(RUN_MODES), st.lists(st.sampled_from(RUN_MODES), min_size=1,
                                                                          max_size=3, unique=True)))
    if mode is None:
        body.pop("stream_mode", None)
    else:
        body["stream_mode"] = mode
    for key, values in (("stream_resumable", [True, False]), ("on_disconnect", ["continue", "cancel"])):
        choice = draw(st.sampled_from([None, *values]))
        if choice is None:
            body.pop(key, None)
        else:
            body[key] = choice
    if not stateless:
        ms = draw(st.sampled_from([None, "enqueue", "reject", "interrupt", "rollback"]))
        if ms is None:
            body.pop("multitask_strategy", None)
        else:
            body["multitask_strategy"] = ms
        if draw(st.integers(0, 4)) == 0:
            body["if_not_exists"] = "create"
    return body


@st.composite
def _fixed_case(draw: Callable[[st.SearchStrategy[Any]], Any], base: st.SearchStrategy[Any], label: str,
                fix_rate: int, mangle: bool) -> Any:
    """A generated case, usually pointed at real objects and given a valid run body (the hooks)."""
    case = draw(base)
    if draw(st.integers(0, 99)) >= fix_rate:
        return case
    method, path = label.split(" ", 1)
    pp = dict(case.path_parameters or {})
    thread_i = draw(st.integers(0, N_THREADS - 1))
    if "thread_id" in pp and draw(st.integers(0, 9)) < 9:
        pp["thread_id"] = thread_tok(thread_i)
    if "run_id" in pp and draw(st.integers(0, 9)) < 9:
        if path == GATEWAY_ONLY_PATH:
            pp["run_id"] = draw(st.sampled_from([stateless_tok(0), run_tok(0, 0), run_tok(1, 2)]))
        else:  # mostly a run of the chosen thread, sometimes one of another thread
            other = draw(st.integers(0, 5)) == 0
            pp["run_id"] = run_tok(draw(st.integers(0, N_THREADS - 1)) if other else thread_i,
                                   draw(st.integers(0, RUNS_PER_THREAD - 1)))
    if "assistant_id" in pp:
        if label in ASSISTANT_MUTATIONS:
            if draw(st.integers(0, 9)) < 8:
                pp["assistant_id"] = draw(st.sampled_from(ASSISTANT_TOKENS))
            else:
                pp["assistant_id"] = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
        elif draw(st.integers(0, 9)) < 8:
            pp["assistant_id"] = draw(st.sampled_from([*GRAPHS, *ASSISTANT_TOKENS]))
    if pp:
        case.path_parameters = pp
    query = dict(case.query or {})
    headers = dict(case.headers or {})
    if path.endswith("/runs/{run_id}/stream") or path == "/threads/{thread_id}/stream":
        lei = draw(_LAST_EVENT_IDS)
        headers.pop("Last-Event-ID", None)
        if lei is not None:
            if draw(st.integers(0, 4)) == 0:
                query["last_event_id"] = lei  # the EventSource spelling
            else:
                headers["Last-Event-ID"] = lei
        if path == "/threads/{thread_id}/stream":
            modes = draw(_THREAD_STREAM_MODES)
            query.pop("stream_modes", None)
            if modes is not None:
                query["stream_modes"] = modes
        else:
            mode = draw(_RUN_STREAM_MODES)
            query.pop("stream_mode", None)
            if mode is not None:
                query["stream_mode"] = mode
            if draw(st.integers(0, 5)) == 0:
                query["cancel_on_disconnect"] = "true"
    case.query = query
    case.headers = headers
    if label in RUN_OPS:
        case.body = _run_body(draw, case.body, stateless=RUN_OPS[label])
    elif label == "POST /runs/batch":
        n = draw(st.integers(1, 3))
        case.body = [_run_body(draw, None, stateless=True) for _ in range(n)]
    elif isinstance(case.body, dict):  # point id fields of other bodies at real objects
        body = dict(case.body)
        if "thread_id" in body and draw(st.booleans()):
            body["thread_id"] = thread_tok(thread_i)
        if "run_id" in body and draw(st.booleans()):
            body["run_id"] = run_tok(thread_i, draw(st.integers(0, RUNS_PER_THREAD - 1)))
        for key, pool in (("thread_ids", THREAD_TOKENS), ("run_ids", RUN_TOKENS)):
            if key in body and draw(st.booleans()):
                body[key] = draw(st.lists(st.sampled_from(pool), max_size=3))
        case.body = body
    if mangle and case.media_type is not None and draw(st.integers(0, 5)) == 0:
        # A cheap malformed variant of a valid request (schemathesis' negative mode is too slow for CI).
        case.body = draw(st.sampled_from([[], "x", 7, None, {"assistant_id": 5}, {"input": "x"}]))
    return case


# --- comparing the two answers ------------------------------------------------------------------

@dataclass
class Exchange:
    label: str
    gw_sent: Sent
    direct_sent: Sent
    gw: Wire
    direct: Wire
    replays: list[tuple[Wire, Wire]] = field(default_factory=list)

    @property
    def op(self) -> str:
        """The operation, also for a raw request aimed at one (`RAW HTTP GET /threads/...`)."""
        return self.label.removeprefix(RAW_LABEL).strip() or self.label

    @property
    def lei(self) -> str | None:
        """The Last-Event-ID the gateway got (header, else the last_event_id query parameter)."""
        from urllib.parse import unquote
        for k, v in self.gw_sent.headers.items():
            if k.lower() == "last-event-id":
                return v
        m = re.search(r"[?&]last_event_id=([^&]*)", self.gw_sent.url)
        return unquote(m.group(1)) if m else None

    def query(self, name: str) -> list[str]:
        from urllib.parse import parse_qs, urlsplit
        return parse_qs(urlsplit(self.gw_sent.url).query, keep_blank_values=True).get(name, [])

    def repro(self) -> str:
        lines = [f"{self.label}", f"  gateway: {self.gw.brief()}", f"  direct:  {self.direct.brief()}"]
        for k, (g, d) in enumerate(self.replays):
            lines.append(f"  replay {k + 1}: gateway {g.brief()} | direct {d.brief()}")
        lines += [f"  via gateway: {self.gw_sent.curl()}", f"  direct:      {self.direct_sent.curl()}"]
        return "\n".join(lines)


@dataclass(frozen=True)
class Allowance:
    """A difference between the gateway's answer and the server's that the test accepts, and why."""

    op: str  # an operation label, or "*"
    kind: str  # "documented" (the README says so) or "bug" (a known gateway bug, to fix)
    reason: str
    applies: Callable[[Exchange], bool]


@dataclass
class Finding:
    kind: str
    exchange: Exchange
    note: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.note}\n{self.exchange.repro()}"


def error_shape_ok(w: Wire) -> bool:
    """The API's own error shape: application/json with a string `detail`."""
    if not w.content_type.startswith("application/json"):
        return False
    try:
        doc = w.json()
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("detail"), str)


_ID_LINE = re.compile(rb"^id:\s?(.*?)\r?$", re.M)


def gateway_ids_ok(w: Wire) -> bool:
    """Every `id:` the gateway's own SSE carries is one of its decimal integers."""
    return all(re.fullmatch(rb"[0-9]{1,19}", m.group(1)) for m in _ID_LINE.finditer(w.body))


@dataclass
class Report:
    examples: int = 0
    unsendable: int = 0
    unsendable_why: Counter[str] = field(default_factory=Counter)
    by_op: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    allowed: Counter[tuple[str, str]] = field(default_factory=Counter)
    allowed_examples: dict[tuple[str, str], Exchange] = field(default_factory=dict)
    unstable: list[Exchange] = field(default_factory=list)
    captured_200: Counter[str] = field(default_factory=Counter)  # capture endpoints that streamed SSE
    task_counts: list[int] = field(default_factory=list)
    ops_cut_short: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self, allow: Iterable[Allowance]) -> str:
        lines = [f"{self.examples} exchanges over {len(self.by_op)} operations in {self.elapsed:.0f}s "
                 f"({self.unsendable} unsendable by the client: "
                 + ", ".join(f"{k} x{v}" for k, v in self.unsendable_why.most_common(4)) + ")"]
        for op in sorted(self.by_op):
            lines.append(f"  {op}: " + ", ".join(f"{k}x{v}" for k, v in sorted(self.by_op[op].items())))
        lines.append("capture path reached (200 event-stream through the gateway): "
                     + (", ".join(f"{k}: {v}" for k, v in sorted(self.captured_200.items())) or "never"))
        lines.append("allowed differences:")
        for a in allow:
            n = sum(v for (op, reason), v in self.allowed.items() if reason == a.reason)
            lines.append(f"  {n:4d}  [{a.kind}] {a.op}: {a.reason}")
        if self.unstable:
            lines.append(f"{len(self.unstable)} differences that went away on replay (timing/state):")
            lines += ["  " + e.repro().replace("\n", "\n  ") for e in self.unstable[:5]]
        if self.ops_cut_short:
            lines.append(f"operations cut short by the wall-clock budget: {self.ops_cut_short}")
        if self.task_counts:
            lines.append(f"gateway asyncio tasks during the run: min {min(self.task_counts)}, "
                         f"max {max(self.task_counts)}, last {self.task_counts[-1]}")
        return "\n".join(lines)


# --- raw HTTP: what no HTTP library would send -----------------------------------------------------

_RAW_TARGETS = ["/ok", "/info", f"/threads/{thread_tok(0)}", f"/threads/{thread_tok(1)}/runs",
                f"/threads/{thread_tok(0)}/stream", f"/threads/{thread_tok(0)}/runs/{run_tok(0, 0)}/stream",
                f"/runs/{stateless_tok(0)}/stream", "/threads/search", "/store/items?key=k"]
_ODD_BYTES = [b" ", b"\t", b"\x00", b"\x7f", b"\xff", b"\xc3\xa9", b"%", b"%zz", b"#", b"?", b"/", b"\\", b"\r",
              b"\n", b"\r\n", b"..", b"*", b":", b'"', b"\x1b"]


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """An HTTP/1.1 request, usually with one part broken at the byte level."""
    odd = st.lists(st.sampled_from(_ODD_BYTES), min_size=1, max_size=3).map(b"".join)
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"DELETE", b"OPTIONS", b"HEAD", b"G@T", b"get"]))
    target = draw(st.sampled_from(_RAW_TARGETS)).encode()
    if draw(st.booleans()):
        at = draw(st.integers(1, len(target)))
        target = target[:at] + draw(odd) + target[at:]
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""]))
    headers = [b"Host: 127.0.0.1", b"Connection: close"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([b"X-Fuzz", b"Last-Event-ID", b"Accept", b"Content-Type", b"Bad Name",
                                     b"X-\xff", b""]))
        value = draw(st.sampled_from([b"v", b"-1", b"1795399159360-0", event_tok(0).encode()]))
        if draw(st.booleans()):
            value += draw(odd)
        headers.append(name + b": " + value)
    body = b""
    if method == b"POST":
        body = b'{"limit": 1}'
        framing = draw(st.sampled_from(["length", "length", "chunked", "both", "short"]))
        if framing == "length":
            headers.append(b"Content-Length: %d" % len(body))
        elif framing == "chunked":
            headers.append(b"Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        elif framing == "both":
            headers += [b"Content-Length: 3", b"Transfer-Encoding: chunked"]
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:  # a body shorter than its Content-Length: the server waits, the read cap ends it
            headers.append(b"Content-Length: %d" % (len(body) + 5))
    line = method + b" " + target + (b" " + version if version else b"")
    return line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


def raw_sent(pool: Pool, text: str, *, direct: bool) -> Sent:
    """A raw request for one side, with its method, URL and headers parsed back out as far as they go."""
    raw = pool.resolve(text, direct=direct).encode("latin-1")
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = head[0].split(" ")
    headers: dict[str, str] = {}
    for line in head[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip()] = v.strip()
    target = parts[1] if len(parts) > 1 else ""
    return Sent(parts[0], pool.base + target, headers, None, raw=raw, base=pool.base)


_RAW_ROUTES = [
    (re.compile(r"^/threads/[^/?#]+/runs/[^/?#]+/stream(\?|$)"), "GET /threads/{thread_id}/runs/{run_id}/stream"),
    (re.compile(r"^/threads/[^/?#]+/stream(\?|$)"), "GET /threads/{thread_id}/stream"),
    (re.compile(r"^/runs/[^/?#]+/stream(\?|$)"), "GET /runs/{run_id}/stream"),
]


def raw_label(sent: Sent) -> str:
    """`RAW HTTP`, or `RAW HTTP <operation>` for a well-formed GET of a stream route (its allowances apply)."""
    target = sent.url[len(sent.base):]
    if sent.method == "GET":
        for pattern, op in _RAW_ROUTES:
            if pattern.match(target):
                return f"{RAW_LABEL} {op}"
    return RAW_LABEL


def send_raw(base: str, data: bytes, limits: Limits) -> Wire:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    t0 = time.monotonic()
    got = bytearray()
    wire = Wire()
    try:
        with socket.create_connection((host, int(port)), timeout=limits.connect) as sock:
            sock.settimeout(limits.read)
            sock.sendall(data)
            deadline = time.monotonic() + limits.read
            while len(got) < limits.body_bytes and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            else:
                wire.body_capped = True
    except TimeoutError:
        wire.body_capped = True
    except OSError as exc:
        if not got:
            wire.error = f"{type(exc).__name__}: {exc}"
    wire.elapsed = time.monotonic() - t0
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    m = re.match(rb"HTTP/(\d\.\d) (\d{3})", lines[0]) if lines and lines[0] else None
    if m is None:
        if not wire.error and got:
            wire.error = f"no status line: {bytes(got[:60])!r}"
        elif not wire.error:
            wire.error = "closed without an answer" if not wire.body_capped else "no answer within the read cap"
        return wire
    wire.version = m.group(1).decode()
    wire.status = int(m.group(2))
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        wire.headers[k.strip().lower()] = v.strip()
    if "chunked" in wire.headers.get("transfer-encoding", "").lower():
        body = dechunk(body)[0]
    wire.body = body
    return wire


# --- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    examples: int  # per operation
    capture_examples: int  # per capture endpoint (and run-creating operation)
    raw_examples: int  # raw HTTP requests with byte-level damage (request line, headers, framing)
    wall: float  # seconds for the whole fuzz; the rest of the operations are cut short after
    fix_rate: int = 80  # percent of cases the hooks point at real objects and make valid
    negative: bool = False  # also schemathesis' (slow) negative mode
    limits: Limits = Limits()


class Fuzzer:
    def __init__(self, schema: Any, gw_pool: Pool, direct_pool: Pool, allow: list[Allowance], budget: Budget,
                 probe_tasks: Callable[[], int], stop: threading.Event) -> None:
        self.schema = schema
        self.pools = {"gw": gw_pool, "direct": direct_pool}
        self.allow = allow
        self.budget = budget
        self.probe_tasks = probe_tasks
        self.stop = stop
        self.report = Report()
        self.sessions = {"gw": requests.Session(), "direct": requests.Session()}
        self.pair = ThreadPoolExecutor(2, thread_name_prefix="fuzz-send")

    def close(self) -> None:
        self.pair.shutdown(wait=True)
        for s in self.sessions.values():
            s.close()

    def operations(self) -> list[Any]:
        ops = [r.ok() for r in self.schema.get_all_operations()]
        # Deterministic order; the capture endpoints first, so a budget cut never skips them.
        return sorted(ops, key=lambda op: (op.label not in CAPTURE_OPS and op.label not in RUN_OPS, op.label))

    def run(self) -> Report:
        from schemathesis import GenerationMode

        t0 = time.monotonic()
        deadline = t0 + self.budget.wall
        try:
            for op in self.operations():
                if self.stop.is_set():
                    break
                if time.monotonic() > deadline:
                    self.report.ops_cut_short.append(op.label)
                    continue
                heavy = op.label in CAPTURE_OPS or op.label in RUN_OPS
                n = self.budget.capture_examples if heavy else self.budget.examples
                modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if self.budget.negative else [])
                for mode in modes:
                    try:
                        base = op.as_strategy(generation_mode=mode)
                    except Exception:  # some operations have no negative form
                        continue
                    self._fuzz_operation(op.label, base, n, deadline, mangle=not self.budget.negative)
                self.report.task_counts.append(self.probe_tasks())
            if not self.stop.is_set() and time.monotonic() < deadline:
                self._fuzz_raw(deadline)
                self.report.task_counts.append(self.probe_tasks())
        finally:
            self.report.elapsed = time.monotonic() - t0
        return self.report

    def _fuzz_operation(self, label: str, base: Any, n: int, deadline: float, *, mangle: bool) -> None:
        from hypothesis.errors import Unsatisfiable

        strategy = _fixed_case(base, label, self.budget.fix_rate, mangle)

        @settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
                  report_multiple_bugs=False)
        @given(case=strategy)
        def one(case: Any) -> None:
            if self.stop.is_set() or time.monotonic() > deadline:
                if label not in self.report.ops_cut_short:
                    self.report.ops_cut_short.append(label)
                return
            self.exchange(label, case)

        try:
            one()
        except Unsatisfiable:
            pass  # an operation with nothing to vary (GET /info, ...) in a mode that needs variation

    def _fuzz_raw(self, deadline: float) -> None:
        @settings(max_examples=self.budget.raw_examples, derandomize=True, database=None, deadline=None,
                  print_blob=False, phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
                  report_multiple_bugs=False)
        @given(data=raw_requests())
        def one(data: bytes) -> None:
            if self.stop.is_set() or time.monotonic() > deadline:
                if RAW_LABEL not in self.report.ops_cut_short:
                    self.report.ops_cut_short.append(RAW_LABEL)
                return
            sent = [raw_sent(pool, data.decode("latin-1"), direct=side == "direct")
                    for side, pool in self.pools.items()]
            self._record(raw_label(sent[0]), sent[0], sent[1])

        one()

    def _both(self, kwargs: Mapping[str, Any]) -> tuple[Sent, Sent] | str:
        sent: dict[str, Sent] = {}
        for side, pool in self.pools.items():
            direct = side == "direct"
            kw = dict(kwargs)
            kw["url"] = pool.resolve(str(kw["url"]).replace("http://fuzz.invalid", pool.base, 1), direct=direct)
            kw["headers"] = {k: pool.resolve(str(v), direct=direct) for k, v in (kw.get("headers") or {}).items()}
            if kw.get("params") is not None:
                kw["params"] = pool.resolve_value(kw["params"], direct=direct)
            if "json" in kw:
                kw["json"] = sanitize(pool.resolve_value(kw["json"], direct=direct))
            if isinstance(kw.get("data"), (bytes, str)):
                data = kw["data"]
                text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
                kw["data"] = pool.resolve(text, direct=direct).encode("utf-8", "surrogateescape")
            try:
                sent[side] = prepare(kw)
            except (ValueError, TypeError, UnicodeError, requests.exceptions.RequestException) as exc:
                return f"prepare: {type(exc).__name__}"
        return sent["gw"], sent["direct"]

    def _send_pair(self, gw: Sent, direct: Sent) -> tuple[Wire, Wire]:
        if gw.raw is not None and direct.raw is not None:
            f_gw = self.pair.submit(send_raw, gw.base, gw.raw, self.budget.limits)
            f_direct = self.pair.submit(send_raw, direct.base, direct.raw, self.budget.limits)
        else:
            f_gw = self.pair.submit(send, self.sessions["gw"], gw, self.budget.limits)
            f_direct = self.pair.submit(send, self.sessions["direct"], direct, self.budget.limits)
        return f_gw.result(), f_direct.result()

    def _unsendable(self, why: str) -> None:
        self.report.unsendable += 1
        self.report.unsendable_why[why] += 1

    def exchange(self, label: str, case: Any) -> None:
        try:
            kwargs = case.as_transport_kwargs(base_url="http://fuzz.invalid")
        except Exception as exc:
            self._unsendable(f"schemathesis: {type(exc).__name__}")
            return
        pair = self._both(kwargs)
        if isinstance(pair, str):
            self._unsendable(pair)
            return
        self._record(label, *pair)

    def _record(self, label: str, gw_sent: Sent, direct_sent: Sent) -> None:
        gw, direct = self._send_pair(gw_sent, direct_sent)
        if gw.unsendable or direct.unsendable:
            self._unsendable(f"requests: {(gw.unsendable or direct.unsendable or '').split(':')[0]}")
            return
        self.report.examples += 1
        ex = Exchange(label, gw_sent, direct_sent, gw, direct)
        counts = self.report.by_op.setdefault(label, Counter())
        counts[f"{gw.status or 'err'}/{direct.status or 'err'}"] += 1
        if gw.status == 200 and gw.is_event_stream and label in CAPTURE_OPS:
            self.report.captured_200[label] += 1
        self.judge(ex)

    # --- the properties ---

    def _allowed(self, ex: Exchange) -> bool:
        for a in self.allow:
            if a.op in ("*", ex.label, ex.op) or (a.op == RAW_LABEL and ex.label.startswith(RAW_LABEL)):
                if not a.applies(ex):
                    continue
                key = (ex.label, a.reason)
                self.report.allowed[key] += 1
                self.report.allowed_examples.setdefault(key, ex)
                return True
        return False

    def judge(self, ex: Exchange) -> None:
        gw, direct = ex.gw, ex.direct
        findings: list[tuple[str, str]] = []
        if gw.error and not direct.error:
            findings.append(("gateway transport failure", "the gateway failed the exchange; the server did not"))
        if gw.version not in ("1.0", "1.1") and direct.version in ("1.0", "1.1"):
            findings.append(("gateway status line not HTTP/1.x", f"HTTP/{gw.version} {gw.status}"))
        if gw.body_cut and not direct.body_cut:
            findings.append(("gateway cut the body", gw.body_cut))
        if gw.status is not None and gw.by_gateway:
            if gw.status >= 500:
                findings.append(("gateway-made 5xx", f"status {gw.status}"))
            elif gw.status >= 400 and not error_shape_ok(gw):
                findings.append(("gateway-made non-JSON error", f"content-type {gw.content_type!r}"))
        if gw.status == 200 and gw.is_event_stream and ex.op in CAPTURE_OPS and not gateway_ids_ok(gw):
            # Captured streams carry the gateway's ids, also when the 200 kept the upstream's headers.
            findings.append(("gateway SSE id not one of the gateway's integers", ""))
        if (gw.status is not None and direct.status is not None and not gw.by_gateway
                and gw.status == direct.status and gw.content_type != direct.content_type):
            findings.append(("forwarded Content-Type changed", f"{direct.content_type!r} -> {gw.content_type!r}"))
        if gw.status != direct.status and gw.status is not None and direct.status is not None:
            findings.append(("status differs", f"{gw.status} vs {direct.status}"))
        if not findings:
            return
        if self._allowed(ex):
            return
        # Unexplained: replay the same request both ways to tell timing/state from a real difference.
        for _ in range(2):
            ex.replays.append(self._send_pair(ex.gw_sent, ex.direct_sent))
        if findings[0][0] == "status differs" and len(findings) == 1 and any(
                g.status == d.status for g, d in ex.replays):
            self.report.unstable.append(ex)
            return
        for kind, note in findings:
            self.report.findings.append(Finding(kind, ex, note))
