"""Prometheus exposition: one custom collector that reads the proxy-wide counters from Redis at scrape time."""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from buddy.errors import StoreUnavailable
from buddy.monitoring import MonitoringManager

COUNTERS = (
    ("hits", "buddy_cache_hits", "Requests answered from the cache."),
    ("misses", "buddy_cache_misses", "Cacheable requests that went upstream."),
    ("coalesced", "buddy_cache_coalesced", "Requests answered with an identical request's upstream result."),
    ("passthrough", "buddy_passthrough_requests", "Uncacheable requests (PUT, DELETE, Range, ...) sent upstream."),
    ("upstream_requests", "buddy_upstream_requests", "Requests sent to the upstream."),
    ("bytes_saved", "buddy_bytes_saved", "Response bytes served without an upstream call."),
    ("throttle_refused", "buddy_throttle_refused", "Requests refused with 429 by the rate limiter."),
    ("throttle_delayed", "buddy_throttle_delayed", "Requests held for a rate-limit slot."),
    ("stale", "buddy_stale_answers", "Requests answered with an expired entry (X-Cache: STALE)."),
    ("stale_if_error", "buddy_stale_if_error", "Stale answers given instead of an upstream failure."),
    ("background_refreshes", "buddy_background_refreshes", "Stale-while-revalidate refreshes run."),
    ("refresh_failures", "buddy_background_refresh_failures", "Background refreshes that failed."),
    ("offline_refusals", "buddy_offline_refusals", "Misses answered 504 in offline mode."),
    ("not_cached", "buddy_only_if_cached_misses", "Misses answered 504 for Cache-Control: only-if-cached."),
    ("memory_hits", "buddy_memory_hits", "Cache lookups answered by a worker's in-memory copy (L1), not by Redis."),
)


class BuddyCollector:
    """Reads Redis on every scrape, so every worker reports the same, whole-proxy numbers."""

    def __init__(self, monitoring: MonitoringManager) -> None:
        self.monitoring = monitoring

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("buddy_redis_up", "1 when the proxy's Redis answers.")
        try:
            counters = self.monitoring.counters()
            described = {name: self.monitoring.cache.describe(name) for name in counters}
            throttling = self.monitoring.get_throttling_stats()
        except StoreUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for field, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["domain"])
            for domain, c in counters.items():
                family.add_metric([domain], c.get(field, 0))
            yield family
        avoided = CounterMetricFamily(
            "buddy_upstream_calls_avoided", "Hits plus coalesced requests.", labels=["domain"]
        )
        saved = CounterMetricFamily("buddy_seconds_saved", "Upstream time not spent thanks to hits and coalescing.",
                                    labels=["domain"])
        spent = CounterMetricFamily("buddy_upstream_response_seconds", "Time spent waiting for upstreams.",
                                    labels=["domain"])
        responses = CounterMetricFamily("buddy_upstream_responses", "Upstream outcomes by status (or timeout, "
                                        "unreachable).", labels=["domain", "status"])
        for domain, c in counters.items():
            avoided.add_metric([domain], c.get("hits", 0) + c.get("coalesced", 0))
            saved.add_metric([domain], c.get("ms_saved", 0) / 1000)
            spent.add_metric([domain], c.get("upstream_ms", 0) / 1000)
            for key, n in sorted(c.items()):
                if key.startswith("status:"):
                    responses.add_metric([domain, key.split(":", 1)[1]], n)
        yield from (avoided, saved, spent, responses)
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
