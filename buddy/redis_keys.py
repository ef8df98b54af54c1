"""Every Redis key and channel name the proxy uses, with the configured prefix and per-domain hash tags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class EntryId(NamedTuple):
    """Which cached response: the domain (also the hash tag) and the request's fingerprint."""

    domain: str
    digest: str


@dataclass(frozen=True)
class RedisKeys:
    """Key names in one place; `{domain}` hash tags keep a domain's keys in one Redis Cluster slot."""

    prefix: str = "buddy:"

    def cache(self, domain: str, digest: str) -> str:
        return f"{self.prefix}cache:{{{domain}}}:{digest}"

    def index(self, domain: str) -> str:
        """Written by versions up to 0.2 only (digest -> expiry, no TTL); dropped on sight (prune_index.lua)."""
        return f"{self.prefix}index:{{{domain}}}"

    def sizes(self, domain: str) -> str:
        """Written by versions up to 0.2 only (digest -> bytes, no TTL); dropped on sight (prune_index.lua)."""
        return f"{self.prefix}sizes:{{{domain}}}"

    def stats(self, domain: str) -> str:
        """The domain's counters: hits, misses, coalesced, upstream calls and times, bytes, savings..."""
        return f"{self.prefix}stats:{{{domain}}}"

    def lock(self, entry: EntryId) -> str:
        """The fill lock: held by the one request that fetches this entry (SET NX PX, value = its token)."""
        return f"{self.prefix}lock:{{{entry.domain}}}:{entry.digest}"

    def successor(self, entry: EntryId, token: str) -> str:
        """Who took over from a leader that vanished: waiters of `token` follow the token stored here."""
        return f"{self.prefix}successor:{{{entry.domain}}}:{entry.digest}:{token}"

    def shared_result(self, entry: EntryId, token: str) -> str:
        """A leader's uncacheable result, kept briefly for the followers of that leader only."""
        return f"{self.prefix}result:{{{entry.domain}}}:{entry.digest}:{token}"

    def followers(self, entry: EntryId, token: str) -> str:
        """How many requests wait on this leader: an over-size body is relayed only when someone does."""
        return f"{self.prefix}followers:{{{entry.domain}}}:{entry.digest}:{token}"

    def relay(self, entry: EntryId, token: str) -> str:
        """A stream carrying an over-size body from its leader to the followers as it arrives."""
        return f"{self.prefix}relay:{{{entry.domain}}}:{entry.digest}:{token}"

    def rate_starts(self, domain: str) -> str:
        """Sorted set of reserved upstream start times (ms) for the domain's sliding windows."""
        return f"{self.prefix}rate:{{{domain}}}"

    def rate_penalty(self, domain: str) -> str:
        """Hash holding the domain's progressive penalty: until, level, last."""
        return f"{self.prefix}penalty:{{{domain}}}"

    @property
    def recent_errors(self) -> str:
        """A capped list of the latest upstream errors (JSON events), newest first."""
        return f"{self.prefix}errors"

    @property
    def workers(self) -> str:
        """Proxy processes seen lately: host:pid -> last flush time."""
        return f"{self.prefix}workers"

    @property
    def secure_key(self) -> str:
        """The generated access key (no TTL: it must survive restarts and never be evicted)."""
        return f"{self.prefix}secure_key"

    @property
    def fill_channel(self) -> str:
        """Pub/sub channel on which leaders announce finished (or started-streaming) fills."""
        return f"{self.prefix}fill"

    @property
    def cache_prefix(self) -> str:
        """What every cache key starts with; the `{domain}` tag and the digest follow."""
        return f"{self.prefix}cache:"

    @property
    def health_probe(self) -> str:
        """Written (with a 10 s TTL) by each health check: a full Redis that refuses writes refuses this one too."""
        return f"{self.prefix}health"

    def cache_pattern(self, domain: str | None = None) -> str:
        """A SCAN MATCH pattern for one domain's entries, or every domain's."""
        if domain is None:
            return f"{self.prefix}cache:*"
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in domain)
        return f"{self.prefix}cache:{{{escaped}}}:*"
