"""Cache policy as pure functions: every decision about keys, freshness, validation and invalidation.

The service asks, this package answers; nothing here touches Redis, Flask or the network.
- `keys`: which entry a request reads and writes, what a client's conditional is, what an unsafe request
  invalidates;
- `directives`: Cache-Control read once, strictly, and the fields around it (Age, dates, Retry-After);
- `storage`: the decision for an upstream answer (store it how long, keyed on what, with which rules; freshen a
  stored one from a 304);
- `reuse`: the decision for a request against what is stored (fresh, stale, or ask the upstream, conditionally),
  and the 304 a client's own conditional gets.
"""
from buddy.policy.directives import CacheControl, cache_control, field_value, retry_after_seconds
from buddy.policy.keys import (
    CACHEABLE_METHODS,
    SAFE_METHODS,
    cacheable_request,
    conditions,
    entry_for,
    follower_may_take,
    invalidated_urls,
    kept_for,
    namespaced,
    partition,
    response_vary,
    stored_request,
    variant_digest,
)
from buddy.policy.reuse import (
    ASK,
    RequestControl,
    Reuse,
    Use,
    age,
    as_not_modified,
    failed,
    not_modified,
    request_control,
    reuse,
    rules_of,
    staleness,
    usable,
)
from buddy.policy.storage import (
    NOT_SHARED,
    Storage,
    freshened,
    freshness_lifetime,
    has_validator,
    storage,
    ttl_for,
    upstream_fields,
    validators,
)

__all__ = [
    "ASK", "CACHEABLE_METHODS", "NOT_SHARED", "SAFE_METHODS", "CacheControl", "RequestControl", "Reuse", "Storage",
    "Use", "age", "as_not_modified", "cache_control", "cacheable_request", "conditions", "entry_for", "failed",
    "field_value", "follower_may_take", "freshened", "freshness_lifetime", "has_validator", "invalidated_urls",
    "kept_for", "namespaced", "not_modified", "partition", "request_control", "response_vary", "retry_after_seconds",
    "reuse", "rules_of", "staleness", "storage", "stored_request", "ttl_for", "upstream_fields", "usable", "validators",
    "variant_digest",
]
