"""Prometheus exposition: one custom collector that reads the proxy-wide counters from Redis at scrape time.

Every counter of buddy.counters is a family of its own (`<metric>_total{domain}`, milliseconds in seconds), and
the upstream outcomes one family labelled by status; entries, sizes and delays are gauges.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from buddy.counters import COUNTERS, FAILURES, Counters
from buddy.errors import StoreUnavailable
from buddy.monitoring import MonitoringManager

RESPONSES_HELP = f"Upstream outcomes by status: an HTTP status, or {', '.join(FAILURES)}."


class BuddyCollector:
    """Reads Redis on every scrape, so every worker reports the same, whole-proxy numbers."""

    def __init__(self, monitoring: MonitoringManager) -> None:
        self.monitoring = monitoring

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("buddy_redis_up", "1 when the proxy's Redis answers.")
        try:
            tallies = self.monitoring.tallies()
            described = {name: self.monitoring.cache.describe(name) for name in tallies}
            throttling = self.monitoring.get_throttling_stats()
        except StoreUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for counter in COUNTERS:
            family = CounterMetricFamily(counter.metric, counter.help, labels=["domain"])
            for domain, tally in tallies.items():
                family.add_metric([domain], tally.shown(counter))
            yield family
        avoided = CounterMetricFamily(
            "buddy_upstream_calls_avoided", "Hits plus coalesced requests.", labels=["domain"]
        )
        responses = CounterMetricFamily("buddy_upstream_responses", RESPONSES_HELP, labels=["domain", "status"])
        for domain, tally in tallies.items():
            avoided.add_metric([domain], tally[Counters.HITS] + tally[Counters.COALESCED])
            for outcome, n in tally.outcomes.items():
                responses.add_metric([domain, outcome.name], n)
        yield from (avoided, responses)
        entries = GaugeMetricFamily("buddy_cache_entries", "Cached responses.", labels=["domain"])
        size = GaugeMetricFamily("buddy_cache_size_bytes", "Bytes of cached (compressed) responses.", labels=["domain"])
        delay = GaugeMetricFamily("buddy_throttle_current_delay_seconds", "Current backoff pause.", labels=["domain"])
        for domain, d in described.items():
            entries.add_metric([domain], d.entries)
            size.add_metric([domain], d.size_bytes)
            delay.add_metric([domain], throttling[domain]["current_delay_seconds"])
        yield from (entries, size, delay)


def exposition(monitoring: MonitoringManager) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BuddyCollector(monitoring))
    return generate_latest(registry)
