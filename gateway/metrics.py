"""The metrics seam: one ``Metrics`` protocol every part reports through, a no-op default, and
the Prometheus implementation. Labels stay bounded: never a run or thread id."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The closed label sets, named once: the parts that report use these types, and PrometheusMetrics
# creates every child of each at 0 at start-up. A series that first appears at 1 is invisible to
# increase() and rate() (they need a sample before the increment), so an alert on the first gap
# marker, or a panel of the first resumes, would stay silent.
GapReason = Literal["no_upstream_ids", "replay_mismatch", "empty_rejoin"]
ResumeOutcome = Literal["hit", "not_held", "truncated"]
RejoinOutcome = Literal["ok", "failed"]
PageSource = Literal["log", "shared"]  # a replayed page read from the log, or shared with another client
# How this process learned that another replica holds a stream it captured: its lease renewal
# found the lease gone, or the log refused a write with the fencing check.
LeaseLoss = Literal["renewal", "fenced"]

# The methods HTTP defines (RFC 9110, PATCH): each its own value of gateway_requests_total's
# ``method``. A client may send any token as a method (aiohttp's pure-Python parser takes them all):
# the rest share "other", or each client could add series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})

# (upstream, kind, in use, limit, refused so far): one connection budget, read at scrape time.
PoolUse = tuple[str, str, int, int, int]


class Metrics(Protocol):
    """What the gateway reports; each part is handed one of these (``NoMetrics`` by default)."""

    def request_done(self, upstream: str, method: str, status: int) -> None: ...
    def replica_health(self, upstream: str, replica: str, healthy: bool) -> None: ...
    def committed(self, events: int, seconds: float, ok: bool) -> None: ...
    def overflowed(self, n: int) -> None: ...
    def rejoined(self, ok: bool) -> None: ...
    def interrupted(self) -> None: ...
    def resumed(self, outcome: ResumeOutcome) -> None: ...
    def gap(self, reason: GapReason) -> None: ...
    def replayed(self, source: PageSource) -> None: ...
    def lease_lost(self, how: LeaseLoss) -> None: ...
    def took_over(self) -> None: ...


class NoMetrics:
    """Reports nothing: the default wherever no metrics are wired in (tests of one part, tools)."""

    def request_done(self, upstream: str, method: str, status: int) -> None: ...
    def replica_health(self, upstream: str, replica: str, healthy: bool) -> None: ...
    def committed(self, events: int, seconds: float, ok: bool) -> None: ...
    def overflowed(self, n: int) -> None: ...
    def rejoined(self, ok: bool) -> None: ...
    def interrupted(self) -> None: ...
    def resumed(self, outcome: ResumeOutcome) -> None: ...
    def gap(self, reason: GapReason) -> None: ...
    def replayed(self, source: PageSource) -> None: ...
    def lease_lost(self, how: LeaseLoss) -> None: ...
    def took_over(self) -> None: ...


class PrometheusMetrics:
    """The metrics as Prometheus series in an injected registry, all prefixed ``gateway_``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The process's own CPU, memory, file descriptors and start time (``process_*``): the CPU
        # one process uses is what capacity is planned on (README), a proxy out of descriptors
        # refuses connections, and a start time that keeps moving is a worker in a crash loop.
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "gateway_requests", "Requests answered, by upstream, method and status class",
            ["upstream", "method", "status"], registry=registry)
        self.replica_healthy = Gauge(
            "gateway_upstream_replica_healthy", "1 when the replica is in rotation",
            ["upstream", "replica"], registry=registry)
        self.events_appended = Counter(
            "gateway_log_events_appended", "SSE events committed to the event log", registry=registry)
        self.commits = Counter("gateway_log_commits", "Event log commit groups", registry=registry)
        self.commit_errors = Counter("gateway_log_commit_errors", "Failed event log commits", registry=registry)
        self.commit_seconds = Histogram(
            "gateway_log_commit_seconds", "Time to commit one group (one fsync)", registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.commit_group_events = Histogram(
            "gateway_log_commit_group_events", "Events per commit group", registry=registry,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
        self.subscribers_overflowed = Counter(
            "gateway_subscribers_overflowed", "Slow clients switched to catch-up from the log", registry=registry)
        self.rejoins = _at_zero(Counter("gateway_upstream_rejoins", "Upstream legs re-joined, by outcome",
                                        ["outcome"], registry=registry), RejoinOutcome)
        self.interruptions = Counter(
            "gateway_streams_interrupted", "Streams ended with a CaptureInterrupted error event", registry=registry)
        self.resumes = _at_zero(Counter("gateway_resumes", "Client resumes with Last-Event-ID, by outcome",
                                        ["outcome"], registry=registry), ResumeOutcome)
        self.gaps = _at_zero(Counter("gateway_gap_markers", "Gap markers written: events an upstream leg may "
                                     "have lost, by reason", ["reason"], registry=registry), GapReason)
        self.replayed_pages = _at_zero(Counter(
            "gateway_replay_pages", "Pages of events replayed to clients, by where they came from: read from the "
            "log, or shared with another client replaying the same range", ["source"], registry=registry),
            PageSource)
        self.leases_lost = _at_zero(Counter(
            "gateway_leases_lost", "Streams this process stopped capturing because another replica holds them "
            "now (this one stalled past storage.lease_ttl), by how it learned: at lease renewal, or by a write "
            "the fencing check refused", ["how"], registry=registry), LeaseLoss)
        self.taken_over = Counter(
            "gateway_streams_taken_over", "Open streams this process took over from a gateway process that "
            "stopped capturing them (it died, restarted or lost its lease)", registry=registry)

    def bind_gauges(self, log_bytes: Callable[[], float], live_streams: Callable[[], float],
                    subscribers: Callable[[], float], storage_failing: Callable[[], float],
                    pools: Callable[[], Iterable[PoolUse]] = lambda: (), log_budget: float = 0) -> None:
        self.registry.register(_PoolCollector(pools))
        Gauge("gateway_log_budget_bytes", "storage.max_bytes: the disk budget for event payloads",
              registry=self.registry).set(log_budget)
        Gauge("gateway_log_bytes", "Bytes held in the event log", registry=self.registry).set_function(log_bytes)
        Gauge("gateway_streams_live", "Upstream streams being captured", registry=self.registry).set_function(live_streams)
        Gauge("gateway_subscribers", "Client streams connected", registry=self.registry).set_function(subscribers)
        Gauge("gateway_storage_failing", "1 while event log commits fail (a full disk, an I/O error)",
              registry=self.registry).set_function(storage_failing)

    def request_done(self, upstream: str, method: str, status: int) -> None:
        self.requests.labels(upstream, method if method in METHODS else "other", f"{status // 100}xx").inc()

    def replica_health(self, upstream: str, replica: str, healthy: bool) -> None:
        self.replica_healthy.labels(upstream, replica).set(1 if healthy else 0)

    def committed(self, events: int, seconds: float, ok: bool) -> None:
        # Once per commit group, not per chunk: a counter's lock per token showed in profiles.
        if ok:
            self.commits.inc()
            self.commit_seconds.observe(seconds)
            self.commit_group_events.observe(events)
            self.events_appended.inc(events)
        else:
            self.commit_errors.inc()

    def overflowed(self, n: int) -> None:
        self.subscribers_overflowed.inc(n)

    def rejoined(self, ok: bool) -> None:
        outcome: RejoinOutcome = "ok" if ok else "failed"
        self.rejoins.labels(outcome).inc()

    def interrupted(self) -> None:
        self.interruptions.inc()

    def resumed(self, outcome: ResumeOutcome) -> None:
        self.resumes.labels(outcome).inc()

    def gap(self, reason: GapReason) -> None:
        self.gaps.labels(reason).inc()

    def replayed(self, source: PageSource) -> None:
        self.replayed_pages.labels(source).inc()

    def lease_lost(self, how: LeaseLoss) -> None:
        self.leases_lost.labels(how).inc()

    def took_over(self) -> None:
        self.taken_over.inc()


def _at_zero(counter: Counter, label_set: object) -> Counter:
    """Create the child of every value of the closed ``label_set`` (a Literal) now, at 0."""
    for value in get_args(label_set):
        counter.labels(value)
    return counter


class _PoolCollector(Collector):
    """Upstream connection budgets: in use, limit, and requests refused because the pool was full."""

    def __init__(self, pools: Callable[[], Iterable[PoolUse]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        use = GaugeMetricFamily("gateway_upstream_connections", "Upstream connections in use, by kind of traffic",
                                labels=["upstream", "kind"])
        limit = GaugeMetricFamily("gateway_upstream_connections_limit", "Upstream connections allowed, by kind",
                                  labels=["upstream", "kind"])
        refused = CounterMetricFamily("gateway_upstream_pool_full", "Requests refused with 503 because the "
                                      "upstream's connection pool stayed full", labels=["upstream", "kind"])
        for upstream, kind, in_use, cap, n in self._pools():
            use.add_metric([upstream, kind], in_use)
            limit.add_metric([upstream, kind], cap)
            refused.add_metric([upstream, kind], n)
        yield use
        yield limit
        yield refused
