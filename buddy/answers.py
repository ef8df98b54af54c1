"""The answers the proxy makes itself (errors, refusals, 504s), and a stored entry as a client gets it.

Each is a ProxyResult shaped like an upstream's answer, so that coalesced requests can share it and every path
(the view, the hit path) sends it the same way.
"""
from __future__ import annotations

import json
import math
import time

from buddy import policy
from buddy.messages import ProxyResult
from buddy.settings import DomainSettings
from buddy.store.rate_limiter import Decision

WAITING_RETRY_AFTER = 2  # seconds: by then the request it would have waited on has often been answered


def json_result(status: int, reason: str, **body: object) -> ProxyResult:
    """An answer the proxy makes itself, with a JSON body naming what happened."""
    payload = json.dumps(body).encode()
    return ProxyResult(status, reason, [("Content-Type", "application/json")], payload)


def refused(domain: DomainSettings, decision: Decision) -> ProxyResult:
    """429 without consuming a slot: the next free slot is further off than the longest allowed delay."""
    wait = max(1, math.ceil(decision.delay))
    result = json_result(
        429, "Too Many Requests", error="rate limited", domain=domain.name,
        message=f"'{domain.name}' is at its rate limit; the next upstream slot is {decision.delay:.1f}s away",
        retry_after=wait,
    )
    result.headers += [
        ("Retry-After", str(wait)),
        ("X-RateLimit-Limit", str(decision.limit or domain.max_requests_per_hour)),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", str(wait)),
    ]
    return result


def too_many_waiting(domain: DomainSettings) -> ProxyResult:
    """429 for a request that would wait on an identical one while this worker has no thread to spare."""
    result = json_result(
        429, "Too Many Requests", error="too many waiting", domain=domain.name, retry_after=WAITING_RETRY_AFTER,
        message=f"too many requests to '{domain.name}' are waiting in this worker; try again shortly",
    )
    result.headers.append(("Retry-After", str(WAITING_RETRY_AFTER)))
    return result


def coalesce_timeout(domain: str, message: str) -> ProxyResult:
    result = json_result(504, "Gateway Timeout", error="coalesce timeout", domain=domain, message=message)
    result.cache = "COALESCE-TIMEOUT"
    return result


def internal_error(domain: DomainSettings) -> ProxyResult:
    return json_result(500, "Internal Server Error", error="internal error", domain=domain.name,
                       message="the proxy failed to handle this request; see its log")


def offline_miss(domain: DomainSettings) -> ProxyResult:
    result = json_result(
        504, "Gateway Timeout", error="offline", domain=domain.name,
        message=f"the proxy is offline and holds no answer to this request for '{domain.name}'; nothing was sent "
                "upstream (turn offline mode off with `api-buddy offline off`, or unset BUDDY_OFFLINE)",
    )
    result.cache = "OFFLINE"
    return result


def not_cached(domain: DomainSettings) -> ProxyResult:
    """504 for `Cache-Control: only-if-cached` when the cache cannot answer (RFC 9111 5.2.1.7)."""
    result = json_result(
        504, "Gateway Timeout", error="not cached", domain=domain.name,
        message="the request said only-if-cached and the cache holds no answer it accepts; nothing was sent upstream",
    )
    result.cache = "NOT-CACHED"
    return result


def from_cache(entry: ProxyResult, label: str) -> ProxyResult:
    """A stored entry as the client gets it: labelled (HIT, STALE, REVALIDATED...), with its true Age (RFC 9111
    4.2.3: its age when received plus the time since) and its own Date."""
    entry.cache = label
    entry.headers = [(name, value) for name, value in entry.headers if name.lower() != "age"]
    entry.extra.append(("Age", str(int(policy.age(entry, time.time())))))
    return entry
