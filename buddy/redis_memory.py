"""What a Redis's memory settings and state mean for a cache: warnings for settings that cannot evict, and why
writes are refused once it is full. Pure functions over INFO memory and error texts, for health and start-up."""
from __future__ import annotations

from typing import Any

import redis

FULL_FRACTION = 0.98  # used_memory above this share of maxmemory counts as full
_OOM_TEXT = "used memory > 'maxmemory'"  # in every form of the refusal: plain, pipelined, or inside a script


def warnings(info: dict[str, Any]) -> list[str]:
    """What is wrong with these memory settings for a cache; nothing for a server that does not say (fakeredis)."""
    if "maxmemory" not in info:
        return []
    policy = str(info.get("maxmemory_policy", ""))
    if int(info["maxmemory"]) == 0:
        return ["Redis has no maxmemory: the cache grows until the machine runs out of memory; "
                "set maxmemory (e.g. 1gb) and maxmemory-policy volatile-lru"]
    if policy == "noeviction":
        return ["Redis has maxmemory-policy noeviction: once full it refuses every write, so nothing new is cached "
                "and identical misses are no longer coalesced; set maxmemory-policy volatile-lru"]
    if policy.startswith("allkeys-"):
        return [f"Redis has maxmemory-policy {policy}: besides cached responses it may evict the proxy's counters, "
                "rate-limit windows and generated access key; volatile-lru evicts only keys with a TTL"]
    return []


def out_of_memory(error: BaseException | str) -> bool:
    """A refusal for lack of memory: redis-py's OutOfMemoryError (whose text has lost the OOM code), or the same
    refusal met inside a Lua script, which Redis 6 reports as a script error quoting it."""
    return isinstance(error, redis.exceptions.OutOfMemoryError) or _OOM_TEXT in str(error)


def full_without_eviction(info: dict[str, Any]) -> bool:
    """At maxmemory with a policy that may not evict: some writes fail now, and more will."""
    maxmemory = int(info.get("maxmemory", 0) or 0)
    return (maxmemory > 0 and info.get("maxmemory_policy") == "noeviction"
            and int(info.get("used_memory", 0)) >= FULL_FRACTION * maxmemory)


def full_reason(info: dict[str, Any]) -> str:
    """Why a full Redis refuses writes, what that costs, and what to do."""
    policy = info.get("maxmemory_policy", "?")
    advice = ("set maxmemory-policy volatile-lru so that old entries make room" if policy == "noeviction" else
              "nothing it may evict is left: keys without a TTL fill maxmemory")
    return (f"Redis is full (used_memory {info.get('used_memory', '?')} of maxmemory {info.get('maxmemory', '?')}, "
            f"policy {policy}) and refuses writes: nothing new is cached and identical misses are not coalesced; "
            f"{advice}")
