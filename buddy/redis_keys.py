"""Every Redis key and channel name the proxy uses, with the configured prefix and per-domain hash tags."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """Key names in one place; `{domain}` hash tags keep a domain's keys in one Redis Cluster slot."""

    prefix: str = "buddy:"

    def cache(self, domain: str, digest: str) -> str:
        return f"{self.prefix}cache:{{{domain}}}:{digest}"

    def cache_pattern(self, domain: str | None = None) -> str:
        """A SCAN MATCH pattern for one domain's entries, or every domain's."""
        if domain is None:
            return f"{self.prefix}cache:*"
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in domain)
        return f"{self.prefix}cache:{{{escaped}}}:*"
