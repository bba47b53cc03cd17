"""The Grafana dashboard only queries metrics the gateway really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import PrometheusMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "dashboard.json"
METRIC = re.compile(r"(?:gateway|process)_[a-z_]+")  # the gateway's own, and its process's (ProcessCollector)


def queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL string: panel target exprs (rows included) and templating queries."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            yield q if isinstance(q, str) else q["query"]


def exposed_samples() -> set[str]:
    """Sample names PrometheusMetrics exposes once every hook has run once."""
    registry = CollectorRegistry()
    m = PrometheusMetrics(registry)
    m.bind_gauges(lambda: 1024, lambda: 2, lambda: 3, lambda: 0, lambda: [("default", "stream", 1, 8, 0)], 1 << 30)
    m.request_done("default", "POST", 200)
    m.replica_health("default", "http://127.0.0.1:2024", True)
    m.committed(5, 0.002, True)
    m.committed(1, 0.5, False)
    m.overflowed(1)
    m.rejoined(True)
    m.rejoined(False)
    m.interrupted()
    m.resumed("hit")
    m.gap("replay_mismatch")
    m.replayed("shared")
    m.lease_lost("fenced")
    m.took_over()
    text = generate_latest(registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [v["name"] for v in ds_vars] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"], p["title"]


def test_every_dashboard_metric_is_exposed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    used = {name for q in queries(dash) for name in METRIC.findall(q)}
    assert len(used) >= 15  # sanity: the regex found the panels' metrics
    missing = used - exposed_samples()
    assert not missing, f"dashboard queries metrics the gateway does not expose: {sorted(missing)}"


def exposed_families() -> dict[str, set[str]]:
    """Every metric family the gateway exposes, with the sample names a query may use for it (a
    counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``, a gauge's own name)."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry).bind_gauges(lambda: 0, lambda: 0, lambda: 0, lambda: 0,
                                            lambda: [("default", "stream", 0, 8, 0)], 1 << 30)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name: {f.name + suffix for suffix in suffixes[f.type]} for f in registry.collect()}


def test_every_exposed_metric_has_a_panel() -> None:
    """A metric an operator cannot see on the dashboard might as well not exist (the takeover and
    lease metrics came with their panels)."""
    dash = json.loads(DASHBOARD.read_text())
    used = {name for q in queries(dash) for name in METRIC.findall(q)}
    unseen = sorted(family for family, samples in exposed_families().items() if not samples & used)
    assert not unseen, f"metrics no dashboard panel shows: {unseen}"


def test_readme_maps_every_panel() -> None:
    dash = json.loads(DASHBOARD.read_text())
    readme = (DASHBOARD.parent / "README.md").read_text()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["title"] in readme, f"grafana/README.md does not mention panel {p['title']!r}"
