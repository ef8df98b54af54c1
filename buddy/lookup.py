"""Where a request's answer lives: its primary entry, or the variant a vary pointer there leads to."""
from __future__ import annotations

from typing import NamedTuple

from buddy import policy
from buddy.codec import VaryPointer
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId
from buddy.store.response_cache import ResponseCache


class Lookup(NamedTuple):
    """Where a request's answer lives: its primary entry, or the variant a vary pointer there leads to."""

    primary: EntryId
    entry: EntryId
    hit: ProxyResult | None


class Looked(NamedTuple):
    """A lookup made for a request before it reached the view (the hit path): what it found, when it asked."""

    found: Lookup
    asked: float


def look_up(cache: ResponseCache, request: ProxyRequest, primary: EntryId) -> Lookup:
    """Read the request's entry, following a vary pointer to the variant for this request's headers."""
    return follow_pointer(cache, request, primary, cache.get(primary))


def follow_pointer(
    cache: ResponseCache, request: ProxyRequest, primary: EntryId, found: ProxyResult | VaryPointer | None
) -> Lookup:
    """What was read at the primary entry, or, for a vary pointer, the variant for this request's headers."""
    if isinstance(found, VaryPointer):
        entry = EntryId(primary.domain, policy.variant_digest(primary.digest, found.names, request.forwarded))
        found = cache.get(entry)
        return Lookup(primary, entry, found if isinstance(found, ProxyResult) else None)
    return Lookup(primary, primary, found)
