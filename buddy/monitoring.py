"""The operator's view, read from Redis so that it describes the whole proxy: the seed's MonitoringManager sections.

`cache`, `upstream` and `throttling` show the counters of buddy.counters, each where its declaration says, plus
figures derived from them (rates, calls avoided, money saved); `database` and health describe Redis itself
(buddy.redis_health); `proxy_health` the processes; `timeline` the per-minute counters for the dashboard's chart.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import redis
from redis.exceptions import RedisClusterException

from buddy.background import DEAD, STOPPED, Watched
from buddy.counters import COUNTERS, PER_MINUTE, Counters, Section, Tally, outcome
from buddy.errors import StoreUnavailable
from buddy.redis_health import RedisHealth
from buddy.redis_keys import RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.guard import StoreGuard
from buddy.store.metrics import RECENT_ERRORS, TIMELINE_MINUTES, WORKER_SEEN_SECONDS
from buddy.store.offline import OfflineSwitch
from buddy.store.redis_url import redacted
from buddy.store.response_cache import ResponseCache

HITS, MISSES, COALESCED = Counters.HITS, Counters.MISSES, Counters.COALESCED


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def redacted_url(url: str) -> str:
    """A Redis URL fit to show: the password replaced, whether in the user part or a ?password= parameter; a
    cluster's or Sentinel's list of hosts is kept as it is."""
    return redacted(url)


def shown(tally: Tally, section: Section) -> dict[str, int | float]:
    """The section's counters as one mapping's figures there (`overall` too, for upstream), by their names."""
    return {c.name: tally.shown(c) for c in COUNTERS if c.section is section and c.name is not None}


def whole_proxy(total: Tally) -> dict[str, int | float]:
    """The cache section's counters as the whole proxy's figures (hit_count, sets, bytes_saved, ...)."""
    return {c.whole: total.shown(c) for c in COUNTERS if c.whole is not None}


def lookups(tally: Tally) -> int:
    return tally[HITS] + tally[MISSES] + tally[COALESCED]


def cache_of(tally: Tally, domain: DomainSettings) -> dict[str, Any]:
    """One mapping's share of the cache section; money saved is calls avoided times its cost_per_call."""
    avoided, cost = tally[HITS] + tally[COALESCED], domain.cost_per_call
    return {
        "requests": tally.requests,
        **shown(tally, Section.CACHE),
        "hit_rate": _rate(tally[HITS], lookups(tally)),
        "upstream_calls_avoided": avoided,
        "cost_per_call": cost, "cost_currency": domain.cost_currency,
        "money_saved": None if cost is None else round(avoided * cost, 4),
    }


def upstream_of(tally: Tally, per_hour: int) -> dict[str, Any]:
    """One mapping's (or every mapping's) upstream calls: how many, how long, how they ended."""
    total, outcomes = tally[Counters.UPSTREAM_REQUESTS], tally.outcomes
    failed = sum(n for kind, n in outcomes.items() if kind.is_error)
    return {
        **shown(tally, Section.UPSTREAM),
        "avg_response_time_ms": round(tally[Counters.UPSTREAM_MS] / total, 1) if total else 0.0,
        "success_rate": _rate(total - failed, total),
        "error_rate": _rate(failed, total),
        "requests_per_hour": per_hour,
        "errors_by_status": {kind.name: n for kind, n in outcomes.items() if kind.listed},
    }


class MonitoringManager:
    """get_cache_stats / get_upstream_stats / get_database_stats / get_proxy_health / get_throttling_stats."""

    def __init__(
        self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, settings: Settings, cache: ResponseCache,
        redis_url: str, version: str, offline: OfflineSwitch | None = None,
        threads: Mapping[str, Watched] | None = None,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.settings = settings
        self.cache = cache
        self.redis_url = redis_url
        self.version = version
        self.offline = offline
        self.threads = dict(threads or {})  # this process's kinds of background thread, by name (see health)
        self.redis = RedisHealth(client, guard, keys, redis_url, version, offline)

    def tallies(self) -> dict[str, Tally]:
        """Every configured mapping's counters."""
        names = list(self.settings.domains)

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.stats(name))
            return pipe.execute()

        return {name: Tally.read(raw) for name, raw in zip(names, self.guard.run(read))}

    def counters(self) -> dict[str, dict[str, int]]:
        """Every configured mapping's counters by field, as counted (a field never counted is absent)."""
        return {name: dict(tally.fields) for name, tally in self.tallies().items()}

    def get_cache_stats(self) -> dict[str, Any]:
        tallies = self.tallies()
        total = Tally.sum(tallies.values())
        census = self.cache.census()
        described = {name: census.describe(name) for name in self.settings.domains}
        ttl: dict[str, int] = {}
        for entries in described.values():
            for bucket, n in entries.ttl_buckets.items():
                ttl[bucket] = ttl.get(bucket, 0) + n
        redis_stats = self.redis.info("stats")
        by_domain = {name: cache_of(tally, self.settings.domains[name]) for name, tally in tallies.items()}
        money: dict[str, float] = {}
        for entry in by_domain.values():
            if entry["money_saved"] is not None:
                currency = entry["cost_currency"] or ""
                money[currency] = round(money.get(currency, 0.0) + entry["money_saved"], 4)
        return {
            "total_entries": sum(e.entries for e in described.values()),
            "entries_per_domain": {name: e.entries for name, e in described.items()},
            "cache_size_bytes": sum(e.size_bytes for e in described.values()),
            "cache_size_per_domain": {name: e.size_bytes for name, e in described.items()},
            **whole_proxy(total),
            "hit_rate": _rate(total[HITS], lookups(total)),
            "miss_rate": _rate(total[MISSES], lookups(total)),
            "compressed": total[Counters.SETS],  # every stored entry is zstd-compressed
            "ttl_distribution": ttl,
            "expired_entries": int(redis_stats.get("expired_keys", 0)),
            "evicted_entries": int(redis_stats.get("evicted_keys", 0)),
            "counted": {"exact": census.exact, "keys_read": census.keys_read, "keys_total": census.keys_total},
            "upstream_calls_avoided": total[HITS] + total[COALESCED],
            "money_saved": money,  # by currency, from the mappings that set cost_per_call
            "by_domain": by_domain,
        }

    def _last_hour(self) -> dict[str, int]:
        names = list(self.settings.domains)

        def read() -> list:
            now = self.client.time()
            since = int(now[0]) * 1000 - 3_600_000
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.zcount(self.keys.rate_starts(name), since, "+inf")
            return pipe.execute()

        return dict(zip(names, map(int, self.guard.run(read))))

    def get_upstream_stats(self) -> dict[str, Any]:
        tallies, hour = self.tallies(), self._last_hour()
        return {
            "overall": upstream_of(Tally.sum(tallies.values()), sum(hour.values())),
            "by_domain": {name: upstream_of(tally, hour[name]) for name, tally in tallies.items()},
        }

    def get_database_stats(self) -> dict[str, Any]:
        return self.redis.database()

    def health(self) -> dict[str, Any]:
        """ok, or degraded with the reason: Redis (buddy.redis_health), or a background thread of the process that
        answers (`pid`) that has died or was stopped; `threads` says how each kind is doing there."""
        report = self.redis.health()
        threads = {kind: thread.report() for kind, thread in self.threads.items()}
        down = [f"{kind} ({shown['name']}) is {shown['state']}" for kind, shown in threads.items()
                if shown["state"] in (DEAD, STOPPED)]
        if down:
            reason = f"background threads of process {os.getpid()} not running: {', '.join(down)}"
            report["status"] = "degraded"
            report["reason"] = f"{report['reason']}; {reason}" if report.get("reason") else reason
        report["pid"] = os.getpid()
        report["threads"] = threads
        return report

    def get_proxy_health(self) -> dict[str, Any]:
        health = self.health()
        try:
            since = time.time() - WORKER_SEEN_SECONDS
            workers = self.guard.run(lambda: self.client.zcount(self.keys.workers, since, "+inf"))
            errors = [json.loads(e) for e in self.guard.run(lambda: self.client.lrange(self.keys.recent_errors, 0, 19))]
        except StoreUnavailable:
            workers, errors = 0, []
        return {
            "status": health["status"],
            "uptime_seconds": health["uptime_seconds"],
            "version": self.version,
            "active_workers": int(workers),
            "threads_per_worker": int(os.environ.get("BUDDY_THREADS", "64")),
            "offline": self.offline.on() if self.offline is not None else False,
            "recent_errors": errors,
        }


    def get_throttling_stats(self) -> dict[str, Any]:
        tallies = self.tallies()
        names = list(self.settings.domains)

        def read() -> tuple[list, float]:
            seconds, micros = self.client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for window in (1_000, 60_000, 3_600_000):
                    pipe.zcount(self.keys.rate_starts(name), now - window, "+inf")
                pipe.hmget(self.keys.rate_penalty(name), ["until", "level", "last"])
            pipe.lrange(self.keys.recent_errors, 0, RECENT_ERRORS - 1)
            return pipe.execute(), now

        values, now = self.guard.run(read)
        pushed_back = self._last_pushed_back(values.pop())
        out = {}
        for i, name in enumerate(names):
            second, minute, hour, (until, level, last) = values[i * 4 : i * 4 + 4]
            domain = self.settings.domains[name]
            out[name] = {
                "limits": {"per_second": domain.max_requests_per_second,
                           "per_minute": domain.max_requests_per_minute, "per_hour": domain.max_requests_per_hour},
                "window_use": {"last_second": int(second), "last_minute": int(minute), "last_hour": int(hour)},
                **shown(tallies[name], Section.THROTTLING),
                "current_delay_seconds": round(max(0, int(until or 0) - now) / 1000, 3),
                "penalty_level": int(level or 0),
                # The latest upstream 429/503 (among the recent errors) and the pause it set, while the penalty
                # lasts: the upstream's Retry-After when it sent one, else the exponential backoff.
                "last_pushed_back": pushed_back.get(name),
                "penalty_since": round(int(last) / 1000, 3) if last else None,
                "penalty_pause_seconds": round(max(0, int(until or 0) - int(last)) / 1000, 3) if last else None,
            }
        return out

    @staticmethod
    def _last_pushed_back(events: list[bytes]) -> dict[str, dict[str, Any]]:
        """Each mapping's newest 429/503 among the recent errors (newest first): time, status, Retry-After."""
        found: dict[str, dict[str, Any]] = {}
        for raw in events:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            kind = outcome(event.get("status")) if isinstance(event, dict) else None
            if kind is not None and kind.pushes_back and event.get("domain") not in found:
                found[event["domain"]] = {"time": event.get("time"), "status": event["status"],
                                          "retry_after": event.get("retry_after")}
        return found

    def timeline(self) -> dict[str, Any]:
        """The PER_MINUTE counters (hits, misses, upstream calls) per minute over the last TIMELINE_MINUTES
        minutes (the current one last, still filling), per mapping and in all, as every process flushes them."""
        names = list(self.settings.domains)
        current = int(time.time() // 60)
        minutes = list(range(current - TIMELINE_MINUTES + 1, current + 1))
        fields = [c.field for c in PER_MINUTE]

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for minute in minutes:
                    pipe.hmget(self.keys.minute_counts(name, minute), fields)
            return pipe.execute()

        values = self.guard.run(read)
        by_domain: dict[str, dict[str, list[int]]] = {}
        for i, name in enumerate(names):
            rows = values[i * len(minutes) : (i + 1) * len(minutes)]
            by_domain[name] = {field: [int(row[j] or 0) for row in rows] for j, field in enumerate(fields)}
        total = {field: [sum(series[field][k] for series in by_domain.values()) for k in range(len(minutes))]
                 for field in fields}
        return {"minute_starts": [minute * 60 for minute in minutes], "total": total, "by_domain": by_domain}


    def get_all(self) -> dict[str, Any]:
        """Every section; a section that needs Redis while it is down says so instead of failing the rest."""
        out: dict[str, Any] = {}
        for name, read in (("cache", self.get_cache_stats), ("upstream", self.get_upstream_stats),
                           ("database", self.get_database_stats), ("proxy_health", self.get_proxy_health),
                           ("throttling", self.get_throttling_stats), ("timeline", self.timeline)):
            try:
                out[name] = read()
            except (StoreUnavailable, redis.RedisError, RedisClusterException) as exc:
                out[name] = {"error": f"Redis unavailable: {exc}"}
        return out
