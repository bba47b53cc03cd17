"""Reading the gateway's own /metrics, as Prometheus would scrape it."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def by_label(http: aiohttp.ClientSession, admin_url: str, sample: str, label: str) -> dict[str, float]:
    """Each value of ``sample`` (a sample name, e.g. ``gateway_resumes_total``) keyed by its ``label``."""
    async with http.get(admin_url + "/metrics") as r:
        text = await r.text()
    return {s.labels[label]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == sample}
