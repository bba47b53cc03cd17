"""Configuration: defaults, then YAML, then ${VAR} expansion, then validation.

This is the only module that reads YAML or the environment; everything else
receives the typed, frozen sections below.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

import yaml
from yarl import URL

from gateway.sse import DEFAULT_MAX_EVENT


class ConfigError(ValueError):
    """A config value is wrong: names the field, the value and what is expected."""

    def __init__(self, field_name: str, value: object, expected: str, *, show_value: bool = True) -> None:
        self.field = field_name
        self.value = value
        self.expected = expected
        super().__init__(f"{field_name}: {expected}" + (f" (got {value!r})" if show_value else ""))


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/ok"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    urls: tuple[URL, ...]
    health: HealthCheck = HealthCheck()
    connect_timeout: float = 5.0
    # Well above the agent server's 5 s heartbeat, so only a dead upstream trips it.
    read_timeout: float = 60.0
    max_connections: int = 512  # plain forwarded requests in flight at once
    # Upstream legs of captured streams open at once (each live run or thread stream holds one).
    max_streams: int = 1024
    # How long a request waits for a free connection before it gets 503 "pool is full".
    pool_timeout: float = 5.0
    # An idle connection to this upstream is closed after this long: under the upstream's own idle
    # timeout (uvicorn's 5 s), and under that of anything in front of it (a load balancer). A request
    # sent on a connection as the other side closes it meets a reset, and a POST is never sent
    # twice. 0: a connection is never reused.
    keepalive: float = 4.0
    # Added to the requests the gateway makes on its own (health checks, and re-joins and
    # cancels when no client's credentials are at hand, e.g. after a restart). Never used
    # to decide whether a client may read a stream.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    upstream: str


@dataclass(frozen=True, slots=True)
class Storage:
    # "lmdb": one gateway process, embedded. "redis": any number of gateway replicas share the log.
    backend: Literal["lmdb", "redis"] = "lmdb"
    path: Path = Path("./data")
    durability: Literal["fsync", "none"] = "fsync"
    map_size: int = 1 << 30  # initial LMDB map; grows on demand
    max_bytes: int = 8 << 30  # disk budget for event payloads
    retention: float = 24 * 3600.0  # seconds a finished stream is kept
    sweep_interval: float = 60.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "agw"  # every key is "{<prefix>}:...": one hash tag, one cluster slot
    # A replica capturing a stream holds a lease this long, renewed at a third of it; a replica
    # that stops renewing (crashed, frozen) loses its streams to another one after this.
    lease_ttl: float = 6.0
    # LMDB only: several gateway processes on this host serve from this data directory (set by
    # workers > 1; set it by hand for separate services sharing one directory).
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Streams:
    # Ask the upstream to keep its own replay buffer for runs created through
    # the gateway, so a dropped upstream leg (or a gateway restart) can be re-joined.
    request_resumable: bool = True
    heartbeat: float = 15.0  # idle comment to clients when nothing else was sent
    subscriber_buffer: int = 10_000  # events queued per client before it catches up from the log
    # Bytes queued per client before it catches up from the log: 1,000 stalled clients' queues stay
    # within about 256 MiB.
    subscriber_buffer_bytes: int = 256 << 10
    # Replayed pages kept framed, so clients replaying the same range share one read (0: off).
    replay_cache_bytes: int = 64 << 20
    max_event_bytes: int = DEFAULT_MAX_EVENT  # an upstream event bigger than this is a broken upstream
    thread_linger: float = 60.0  # keep a thread stream's upstream leg this long after its last client
    # A stream taken over from a process that stopped waits this long for one of the clients it cut
    # to come back; then nobody following it is a disconnect (a cancel on disconnect applies).
    reconnect_window: float = 60.0
    reattach_attempts: int = 5
    reattach_backoff: float = 0.5
    max_request_body: int = 16 << 20
    # Ask the upstream (with the client's credentials) before serving a held stream from the log.
    authorize_replay: bool = True
    authorize_ttl: float = 10.0  # how long a yes from the upstream is reused
    # Credential headers the gateway reuses for its own re-joins and cancels, and hashes to
    # recognise the client that started a capture.
    auth_headers: tuple[str, ...] = ("Authorization", "X-Api-Key", "Cookie")


@dataclass(frozen=True, slots=True)
class Clients:
    """Limits on the client side of the public listener."""

    # A client that stops reading for this long is cut: a stream (it can resume), or a forwarded
    # body (its upstream connection is freed).
    write_timeout: float = 30.0
    header_timeout: float = 10.0  # a connection must finish its request headers within this
    # A request body up to body_buffer_bytes is read whole, within body_timeout, before any upstream
    # connection is taken for it: a client that trickles its body holds its own connection, not one
    # of the upstream's. Bigger bodies stream through, each read within body_timeout of the last.
    body_timeout: float = 60.0
    body_buffer_bytes: int = 1 << 20
    max_connections: int = 10_000  # client connections at once; beyond, a 503 and a close
    # Connections the kernel queues before the gateway accepts them: a reconnect storm of a
    # thousand clients fits, instead of waiting for SYN retries.
    backlog: int = 4096
    # One header line, and the number of headers: more than the Agent Server itself refuses.
    max_header_bytes: int = 1 << 20
    max_headers: int = 1000
    # Peers whose X-Forwarded-Host/-Proto are passed on; from anyone else they are replaced.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = Listen()
    admin: Listen = Listen(port=8081)
    upstreams: tuple[Upstream, ...] = ()
    routes: tuple[Route, ...] = ()
    storage: Storage = Storage()
    streams: Streams = Streams()
    clients: Clients = Clients()
    # Processes serving the same port (SO_REUSEPORT), each a replica of the shared log: one
    # gateway host uses every core. With LMDB they share its data directory (storage.shared).
    workers: int = 1
    # Which of them this process is (0 for a single process); its admin port is admin.port + index.
    worker_index: int = 0
    shutdown_grace: float = 10.0
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log shippers

    def upstream(self, name: str) -> Upstream:
        for up in self.upstreams:
            if up.name == name:
                return up
        raise KeyError(name)


DEFAULT_UPSTREAM_URL = "http://127.0.0.1:2024"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
}
_SIZE_MAX = (1 << 63) - 1  # what a C size (and LMDB's map) can hold
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# Query parameters that carry a secret in the URLs redis-py (and others) accept.
_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "secret", "token", "auth"})


def shown_url(url: str) -> str:
    """A URL as logs and error messages may show it: its user info and secret query values masked.

    The password may contain ``@`` (the host follows the *last* one), or come as a query
    parameter (``redis://host/0?password=...``, which redis-py accepts).
    """
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at else host
    query = "&".join(f"{name}=***" if name.lower() in _SECRET_PARAMS else f"{name}{eq}{value}"
                     for name, eq, value in (p.partition("=") for p in parts.query.split("&") if p))
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


# A real config is a few hundred nodes; aliases of aliases can multiply past any real one.
_MAX_NODES = 100_000


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of a parsed YAML tree.

    The tree is a graph when the file uses aliases: one that names a node it sits inside
    (``a: &x [*x]``) never ends, and nested aliases can expand exponentially; both are errors
    naming where, not a RecursionError or a hang."""
    left = [_MAX_NODES]
    inside: set[int] = set()  # the lists and mappings being expanded, outermost to here

    def walk(v: Any, where: str) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise ConfigError(where or "<root>", None, f"more than {_MAX_NODES} values: YAML aliases expanding "
                              "into copies of copies; write the values out", show_value=False)
        if isinstance(v, str):
            return _expand_str(v, env, where)
        if not isinstance(v, (list, dict)):
            return v
        if id(v) in inside:
            raise ConfigError(where or "<root>", None, "a YAML alias inside the very node it names "
                              "(it would expand forever)", show_value=False)
        inside.add(id(v))
        try:
            if isinstance(v, list):
                return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
            return {k: walk(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        finally:
            inside.discard(id(v))

    return walk(value, path)


def _expand_str(value: str, env: Mapping[str, str], path: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(path or "<root>", m.group(0), f"environment variable {name} is not set")
    return _VAR.sub(sub, value)


# --- field converters: each raises ConfigError naming the field -------------------------------

def parse_duration(name: str, v: Any, *, allow_zero: bool = False) -> float:
    if isinstance(v, bool):
        raise ConfigError(name, v, "a duration such as 5, 500ms, 30s, 10m or 24h")
    if isinstance(v, (int, float)):
        secs = float(v)
    elif isinstance(v, str) and (m := _DURATION.match(v)):
        secs = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(name, v, "a duration such as 5, 500ms, 30s, 10m or 24h")
    if not math.isfinite(secs) or secs < 0 or (secs == 0 and not allow_zero):
        raise ConfigError(name, v, "a positive duration" if math.isfinite(secs) else "a finite duration")
    return secs


def _size(name: str, v: Any, *, allow_zero: bool = False) -> int:
    if isinstance(v, bool):
        raise ConfigError(name, v, "a size such as 1048576, 512MiB or 10GiB")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and (m := _SIZE.match(v)):
        scaled = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
        n = int(scaled) if scaled <= _SIZE_MAX else _SIZE_MAX + 1  # a long digit string is inf
    else:
        raise ConfigError(name, v, "a size such as 1048576, 512MiB or 10GiB")
    if n > _SIZE_MAX:
        raise ConfigError(name, v, "a size up to 8EiB")
    if n < 0 or (n == 0 and not allow_zero):
        raise ConfigError(name, v, "a positive size" if not allow_zero else "a size (0 turns it off)")
    return n


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    try:
        if isinstance(v, bool) or isinstance(v, float):
            raise ValueError
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(name, v, "an integer") from None
    if n < lo or (hi is not None and n > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(name, v, f"an integer {rng}")
    return n


def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ConfigError(name, v, "true or false")


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(name, v, "a non-empty string")
    return v


def _path(name: str, v: Any) -> Path:
    text = _str(name, v)
    if "\0" in text:  # no file system takes one: os.makedirs would raise at start-up
        raise ConfigError(name, v, "a path without a NUL character")
    return Path(text)


def _url(name: str, v: Any) -> URL:
    if not isinstance(v, str):
        raise ConfigError(name, v, "an http:// or https:// URL")
    try:
        url = URL(v)
    except ValueError:
        raise ConfigError(name, v, "an http:// or https:// URL") from None
    if url.scheme not in ("http", "https") or not url.host or " " in url.host:
        raise ConfigError(name, v, "an http:// or https:// URL")
    if url.query_string or url.fragment:
        raise ConfigError(name, v, "a base URL without query string or fragment")
    return url.with_path(url.path.rstrip("/"))


def _mapping(name: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(name, v, "a mapping")
    return v


def _reject_unknown(section: str, given: Mapping[str, Any], known: set[str]) -> None:
    for key in given:
        if key not in known:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(where, given[key], f"a known key (one of: {', '.join(sorted(known))})")


def _listen(name: str, raw: Any, default: Listen) -> Listen:
    raw = _mapping(name, raw)
    _reject_unknown(name, raw, {"host", "port"})
    return Listen(
        host=_str(f"{name}.host", raw.get("host", default.host)),
        port=_int(f"{name}.port", raw.get("port", default.port), 0, 65535),
    )


def _health(name: str, raw: Any) -> HealthCheck:
    raw = _mapping(name, raw)
    _reject_unknown(name, raw, {"path", "interval", "timeout", "unhealthy_threshold", "healthy_threshold"})
    d = HealthCheck()
    path = _str(f"{name}.path", raw.get("path", d.path))
    if not path.startswith("/"):
        raise ConfigError(f"{name}.path", path, "a path starting with /")
    return HealthCheck(
        path=path,
        interval=parse_duration(f"{name}.interval", raw.get("interval", d.interval)),
        timeout=parse_duration(f"{name}.timeout", raw.get("timeout", d.timeout)),
        unhealthy_threshold=_int(f"{name}.unhealthy_threshold", raw.get("unhealthy_threshold", d.unhealthy_threshold), 1),
        healthy_threshold=_int(f"{name}.healthy_threshold", raw.get("healthy_threshold", d.healthy_threshold), 1),
    )


def _upstream(name: str, raw: Any) -> Upstream:
    field_name = f"upstreams.{name}"
    if not _NAME.match(name):
        raise ConfigError(field_name, name, "an upstream name of letters, digits, '.', '_' or '-'")
    if isinstance(raw, (str, list)):
        raw = {"urls": raw}
    raw = _mapping(field_name, raw)
    _reject_unknown(field_name, raw, {"url", "urls", "health", "connect_timeout", "read_timeout", "max_connections",
                                      "max_streams", "pool_timeout", "keepalive", "headers"})
    urls_raw = raw.get("urls", raw.get("url"))
    if isinstance(urls_raw, str):
        urls_raw = [urls_raw]
    if not isinstance(urls_raw, list) or not urls_raw:
        raise ConfigError(f"{field_name}.urls", urls_raw, "a list of one or more replica URLs")
    d = Upstream(name=name, urls=())
    return Upstream(
        name=name,
        urls=tuple(_url(f"{field_name}.urls[{i}]", u) for i, u in enumerate(urls_raw)),
        health=_health(f"{field_name}.health", raw.get("health")),
        connect_timeout=parse_duration(f"{field_name}.connect_timeout", raw.get("connect_timeout", d.connect_timeout)),
        read_timeout=parse_duration(f"{field_name}.read_timeout", raw.get("read_timeout", d.read_timeout)),
        max_connections=_int(f"{field_name}.max_connections", raw.get("max_connections", d.max_connections), 1),
        max_streams=_int(f"{field_name}.max_streams", raw.get("max_streams", d.max_streams), 1),
        pool_timeout=parse_duration(f"{field_name}.pool_timeout", raw.get("pool_timeout", d.pool_timeout)),
        keepalive=parse_duration(f"{field_name}.keepalive", raw.get("keepalive", d.keepalive), allow_zero=True),
        headers=_headers(f"{field_name}.headers", raw.get("headers")),
    )


def _headers(name: str, v: Any) -> tuple[tuple[str, str], ...]:
    v = _mapping(name, v)
    out = []
    for k, val in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z0-9-]+", k):
            raise ConfigError(f"{name}.{k}", k, "an HTTP header name")
        if not isinstance(val, (str, int)) or "\n" in str(val) or "\r" in str(val):
            raise ConfigError(f"{name}.{k}", "<hidden>", "a single-line header value")
        out.append((k, str(val)))
    return tuple(out)


def _routes(raw: Any, upstreams: tuple[Upstream, ...]) -> tuple[Route, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError("routes", raw, "a list of {prefix, upstream}")
    names = {u.name for u in upstreams}
    routes: list[Route] = []
    for i, item in enumerate(raw):
        fname = f"routes[{i}]"
        item = _mapping(fname, item)
        _reject_unknown(fname, item, {"prefix", "upstream"})
        prefix = _str(f"{fname}.prefix", item.get("prefix"))
        if not prefix.startswith("/") or "?" in prefix or "{" in prefix:
            raise ConfigError(f"{fname}.prefix", prefix, "a literal path starting with /")
        prefix = prefix.rstrip("/") or "/"
        target = _str(f"{fname}.upstream", item.get("upstream"))
        if target not in names:
            raise ConfigError(f"{fname}.upstream", target, f"the name of a configured upstream ({', '.join(sorted(names))})")
        if any(r.prefix == prefix for r in routes):
            raise ConfigError(f"{fname}.prefix", prefix, "a prefix not used by another route")
        routes.append(Route(prefix=prefix, upstream=target))
    if not any(r.prefix == "/" for r in routes):
        default = "default" if "default" in names else upstreams[0].name
        routes.append(Route(prefix="/", upstream=default))
    # Longest prefix first so /deployments/a/x never falls to the "/" route.
    routes.sort(key=lambda r: len(r.prefix), reverse=True)
    return tuple(routes)


def _storage(raw: Any) -> Storage:
    raw = _mapping("storage", raw)
    _reject_unknown("storage", raw, set(Storage.__dataclass_fields__))
    d = Storage()
    durability = raw.get("durability", d.durability)
    if durability not in ("fsync", "none"):
        raise ConfigError("storage.durability", durability, "'fsync' or 'none'")
    backend = raw.get("backend", d.backend)
    if backend not in ("lmdb", "redis"):
        raise ConfigError("storage.backend", backend, "'lmdb' or 'redis'")
    redis_url = _str("storage.redis_url", raw.get("redis_url", d.redis_url))
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("storage.redis_url", shown_url(redis_url), "a redis://, rediss:// or unix:// URL")
    prefix = _str("storage.redis_prefix", raw.get("redis_prefix", d.redis_prefix))
    if not _NAME.match(prefix):
        raise ConfigError("storage.redis_prefix", prefix, "letters, digits, '.', '_' or '-'")
    return Storage(
        backend=backend,
        redis_url=redis_url,
        redis_prefix=prefix,
        lease_ttl=parse_duration("storage.lease_ttl", raw.get("lease_ttl", d.lease_ttl)),
        path=_path("storage.path", raw.get("path", str(d.path))),
        durability=durability,
        map_size=_size("storage.map_size", raw.get("map_size", d.map_size)),
        max_bytes=_size("storage.max_bytes", raw.get("max_bytes", d.max_bytes)),
        retention=parse_duration("storage.retention", raw.get("retention", d.retention)),
        sweep_interval=parse_duration("storage.sweep_interval", raw.get("sweep_interval", d.sweep_interval)),
        shared=_bool("storage.shared", raw.get("shared", d.shared)),
    )


def _streams(raw: Any) -> Streams:
    raw = _mapping("streams", raw)
    d = Streams()
    _reject_unknown("streams", raw, set(Streams.__dataclass_fields__) | {"write_timeout"})
    return Streams(
        request_resumable=_bool("streams.request_resumable", raw.get("request_resumable", d.request_resumable)),
        heartbeat=parse_duration("streams.heartbeat", raw.get("heartbeat", d.heartbeat)),
        subscriber_buffer=_int("streams.subscriber_buffer", raw.get("subscriber_buffer", d.subscriber_buffer), 1),
        subscriber_buffer_bytes=_size("streams.subscriber_buffer_bytes",
                                      raw.get("subscriber_buffer_bytes", d.subscriber_buffer_bytes)),
        replay_cache_bytes=_size("streams.replay_cache_bytes", raw.get("replay_cache_bytes", d.replay_cache_bytes),
                                 allow_zero=True),
        max_event_bytes=_size("streams.max_event_bytes", raw.get("max_event_bytes", d.max_event_bytes)),
        thread_linger=parse_duration("streams.thread_linger", raw.get("thread_linger", d.thread_linger), allow_zero=True),
        reconnect_window=parse_duration("streams.reconnect_window", raw.get("reconnect_window", d.reconnect_window),
                                        allow_zero=True),
        reattach_attempts=_int("streams.reattach_attempts", raw.get("reattach_attempts", d.reattach_attempts), 0),
        reattach_backoff=parse_duration("streams.reattach_backoff", raw.get("reattach_backoff", d.reattach_backoff)),
        max_request_body=_size("streams.max_request_body", raw.get("max_request_body", d.max_request_body)),
        authorize_replay=_bool("streams.authorize_replay", raw.get("authorize_replay", d.authorize_replay)),
        authorize_ttl=parse_duration("streams.authorize_ttl", raw.get("authorize_ttl", d.authorize_ttl), allow_zero=True),
        auth_headers=_header_names("streams.auth_headers", raw.get("auth_headers", list(d.auth_headers))),
    )


def _header_names(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(h, str) and re.fullmatch(r"[A-Za-z0-9-]+", h) for h in v):
        raise ConfigError(name, v, "a list of HTTP header names")
    return tuple(v)


def _clients(raw: Any, old_write_timeout: Any) -> Clients:
    raw = _mapping("clients", raw)
    d = Clients()
    _reject_unknown("clients", raw, set(Clients.__dataclass_fields__))
    # streams.write_timeout is the setting's old name; clients.write_timeout wins when both are given.
    write_timeout = raw.get("write_timeout", d.write_timeout if old_write_timeout is None else old_write_timeout)
    name = "clients.write_timeout" if "write_timeout" in raw or old_write_timeout is None else "streams.write_timeout"
    return Clients(
        write_timeout=parse_duration(name, write_timeout),
        header_timeout=parse_duration("clients.header_timeout", raw.get("header_timeout", d.header_timeout)),
        body_timeout=parse_duration("clients.body_timeout", raw.get("body_timeout", d.body_timeout)),
        body_buffer_bytes=_size("clients.body_buffer_bytes", raw.get("body_buffer_bytes", d.body_buffer_bytes)),
        max_connections=_int("clients.max_connections", raw.get("max_connections", d.max_connections), 1),
        backlog=_int("clients.backlog", raw.get("backlog", d.backlog), 1, 65535),
        max_header_bytes=_size("clients.max_header_bytes", raw.get("max_header_bytes", d.max_header_bytes)),
        max_headers=_int("clients.max_headers", raw.get("max_headers", d.max_headers), 1),
        trusted_proxies=_networks("clients.trusted_proxies", raw.get("trusted_proxies", [])),
    )


def _networks(name: str, v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(v, list):
        raise ConfigError(name, v, "a list of addresses or networks (CIDR), e.g. [10.0.0.0/8]")
    out = []
    for i, item in enumerate(v):
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{name}[{i}]", item, "an address or network (CIDR), e.g. 10.0.0.0/8") from None
    return tuple(out)


def build_config(raw: Any) -> Config:
    """Validate an already-expanded tree (defaults fill whatever is missing)."""
    raw = _mapping("<root>", raw)
    _reject_unknown("", raw, {"listen", "admin", "upstreams", "routes", "storage", "streams", "clients",
                              "workers", "shutdown_grace", "log_level", "log_format"})
    ups_raw = raw.get("upstreams")
    if ups_raw is None:
        ups_raw = {"default": {"urls": [DEFAULT_UPSTREAM_URL]}}
    if not isinstance(ups_raw, dict) or not ups_raw:
        raise ConfigError("upstreams", ups_raw, "a mapping of upstream name to {urls: [...]}")
    upstreams = tuple(_upstream(str(name), v) for name, v in ups_raw.items())
    d = Config()
    log_level = str(raw.get("log_level", d.log_level)).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level", log_level, "one of debug, info, warning, error")
    storage = _storage(raw.get("storage"))
    listen = _listen("listen", raw.get("listen"), d.listen)
    workers = _int("workers", raw.get("workers", d.workers), 1, 64)
    if workers > 1 and storage.backend == "lmdb":
        storage = replace(storage, shared=True)  # every worker serves from the one data directory
    if workers > 1 and listen.port == 0:
        raise ConfigError("listen.port", 0, "a fixed port when workers > 1 (they all listen on it)")
    return Config(
        workers=workers,
        listen=listen,
        admin=_listen("admin", raw.get("admin"), d.admin),
        upstreams=upstreams,
        routes=_routes(raw.get("routes"), upstreams),
        storage=storage,
        streams=_streams(raw.get("streams")),
        clients=_clients(raw.get("clients"), _mapping("streams", raw.get("streams")).get("write_timeout")),
        shutdown_grace=parse_duration("shutdown_grace", raw.get("shutdown_grace", d.shutdown_grace), allow_zero=True),
        log_level=log_level,
        log_format=_log_format(raw.get("log_format", d.log_format)),
    )


def _log_format(v: Any) -> Literal["text", "json"]:
    if v == "text":
        return "text"
    if v == "json":
        return "json"
    raise ConfigError("log_format", v, "text or json")


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints here
    """PyYAML's safe loader, but a key given twice in one mapping is an error (YAML forbids it;
    PyYAML keeps the last, so the first section would vanish without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be followed by keys that override the merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor below says so
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "<yaml>") -> dict[str, Any]:
    """Parse YAML text and expand ${VAR}; returns the raw tree for build_config.

    A syntax error names the file, line and column, never the line's text (it may hold a secret).
    """
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        raise ConfigError(where, None, f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                          show_value=False) from None
    expanded: dict[str, Any] = expand_env(_mapping("<root>", raw), os.environ if env is None else env)
    return expanded


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags, applied on top of the file."""

    host: str | None = None
    port: int | None = None
    admin_host: str | None = None
    admin_port: int | None = None
    upstreams: tuple[str, ...] = field(default_factory=tuple)
    data_dir: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    workers: int | None = None


def load_config(path: str | None, overrides: Overrides = Overrides(), env: Mapping[str, str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--config", path, f"a readable YAML file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(path, None, f"not UTF-8 text (byte {exc.start + 1} is 0x{exc.object[exc.start]:02x})",
                              show_value=False) from None
        raw = parse_config(text, env, source=path)
    if overrides.host is not None or overrides.port is not None:
        listen = dict(_mapping("listen", raw.get("listen")))
        if overrides.host is not None:
            listen["host"] = overrides.host
        if overrides.port is not None:
            listen["port"] = overrides.port
        raw["listen"] = listen
    if overrides.admin_host is not None or overrides.admin_port is not None:
        admin = dict(_mapping("admin", raw.get("admin")))
        if overrides.admin_host is not None:
            admin["host"] = overrides.admin_host
        if overrides.admin_port is not None:
            admin["port"] = overrides.admin_port
        raw["admin"] = admin
    if overrides.upstreams:
        ups = dict(_mapping("upstreams", raw.get("upstreams")))
        # --upstream replaces the replicas of the default route's upstream.
        target = "default" if "default" in ups or not ups else next(iter(ups))
        entry = ups.get(target)
        entry = dict(entry) if isinstance(entry, dict) else {}
        entry.pop("url", None)
        entry["urls"] = list(overrides.upstreams)
        ups[target] = entry
        raw["upstreams"] = ups
    if overrides.data_dir is not None:
        storage = dict(_mapping("storage", raw.get("storage")))
        storage["path"] = overrides.data_dir
        raw["storage"] = storage
    if overrides.log_level is not None:
        raw["log_level"] = overrides.log_level
    if overrides.log_format is not None:
        raw["log_format"] = overrides.log_format
    if overrides.workers is not None:
        raw["workers"] = overrides.workers
    cfg = build_config(raw)
    if overrides.data_dir is not None and cfg.storage.backend != "lmdb":  # else dropped without a word
        raise ConfigError("--data-dir", overrides.data_dir,
                          f"an LMDB data directory, but storage.backend is {cfg.storage.backend!r}")
    return cfg
