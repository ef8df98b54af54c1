"""Every Redis key and channel name the proxy uses, with the configured prefix and per-domain hash tags.

KEY_KINDS declares what each kind holds and whether it expires; buddy.counters the fields of `stats:{<name>}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class EntryId(NamedTuple):
    """Which cached response: the domain (also the hash tag) and the request's fingerprint."""

    domain: str
    digest: str


class KeyKind(NamedTuple):
    """One kind of key: its name after the prefix, whether it expires by itself, and what it holds."""

    name: str
    expires: bool
    holds: str


# Every kind of key the proxy writes. A key that does not expire must be bounded by construction; a test
# runs a mixed workload and checks that Redis holds no other key, and none of these without its TTL.
KEY_KINDS = (
    KeyKind("cache", True, "a stored response (zstd blob), or a vary pointer to its variants; the mapping's TTL plus "
            "its stale grace"),
    KeyKind("lock", True, "the fill lock of a miss in flight (value: the leader's token); 3 s, renewed by its leader"),
    KeyKind("successor", True, "which waiter took over from a leader that vanished; lock TTL + 30 s"),
    KeyKind("result", True, "a leader's uncacheable answer (or a 'not for sharing' mark) for its followers; 30 s"),
    KeyKind("followers", True, "how many requests wait on one leader; 120 s"),
    KeyKind("relay", True, "a stream carrying an over-size body from its leader to the followers; 60 s"),
    KeyKind("rate", True, "the mapping's reserved upstream start times (sorted set); its longest window "
            "(`:<partition>`: one credential partition's, with per-credential limits)"),
    KeyKind("penalty", True, "the mapping's backoff after an upstream 429/503: until, level, last (`:<partition>`: "
            "one credential partition's)"),
    KeyKind("bug", True, "the latest error reply any worker got from Redis (a bug, not an outage), for health; 60 s"),
    KeyKind("key_failures", True, "one client address's refused access keys: wrong keys in a row, lock-outs in a "
            "row and the current one's end, refusals not yet logged; 2 minutes after its last event or lock-out"),
    KeyKind("session", True, "a dashboard session (its id, from a login); 12 h, deleted at sign-out"),
    KeyKind("health", True, "written by each /admin/health check (a full Redis refuses it); 10 s"),
    KeyKind("minutes", True, "one mapping's counters in one minute (hash of the counters.PER_MINUTE fields: hits, "
            "misses, upstream calls), for the dashboard's chart; expires 62 minutes after its minute ended"),
    KeyKind("uri", True, "the stored GET answers of one upstream URL (their cache keys, variants and vary pointers), "
            "so that an unsafe request to it removes them all; as long as the longest-lived of them"),
    KeyKind("ack", True, "how many workers heard an invalidation (a barrier before the unsafe request is answered); "
            "10 s"),
    KeyKind("stats", False, "the mapping's counters: a fixed set of fields (counters.DECLARED: each counter, and "
            "status:<outcome> per HTTP status or failure kind)"),
    KeyKind("errors", False, "the 50 latest upstream errors (JSON events), newest first; trimmed on every push"),
    KeyKind("workers", False, "proxy processes seen lately (host:pid -> time); trimmed to the last 15 s at each flush"),
    KeyKind("secure_key", False, "the generated access key: kept across restarts, never evicted"),
    KeyKind("key_source", False, "where the serving proxy's access key comes from (generated, or the variable or "
            "file that set it) and whether one is required; never the key; one key"),
    KeyKind("offline", False, "the run-time offline switch ('1' on, '0' off) set by `buddy offline`; one key"),
    KeyKind("archive_secret", False, "the installation's secret that seals the credentialed records of its WARC "
            "exports (HMAC-SHA256), so that an import takes only its own; generated once (SET NX) by the first "
            "export that needs it, never exported or logged; one key"),
)
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

    def url_index(self, domain: str, digest: str) -> str:
        """The cache keys of the GET answers stored for one upstream URL (fingerprint.url_digest): what an unsafe
        request to it invalidates."""
        return f"{self.prefix}uri:{{{domain}}}:{digest}"

    def ack(self, token: str) -> str:
        """How many workers have heard the invalidation `token` closed (see ResponseCache.invalidate)."""
        return f"{self.prefix}ack:{token}"

    def rate_starts(self, domain: str, partition: str = "") -> str:
        """Sorted set of reserved upstream start times (ms) for the domain's sliding windows; a credential
        partition's own, for a mapping with per-credential limits."""
        return f"{self.prefix}rate:{{{domain}}}" + (f":{partition}" if partition else "")

    def rate_penalty(self, domain: str, partition: str = "") -> str:
        """Hash holding the progressive penalty (until, level, last) of the domain, or of one credential partition
        of it (an upstream's 429 to requests with those credentials pauses only them)."""
        return f"{self.prefix}penalty:{{{domain}}}" + (f":{partition}" if partition else "")

    def minute_counts(self, domain: str, minute: int) -> str:
        """Hash of the domain's per-minute counters (counters.PER_MINUTE) in one minute (Unix time // 60)."""
        return f"{self.prefix}minutes:{{{domain}}}:{minute}"

    @property
    def recent_errors(self) -> str:
        """A capped list of the latest upstream errors (JSON events), newest first."""
        return f"{self.prefix}errors"

    @property
    def workers(self) -> str:
        """Proxy processes seen lately: host:pid -> last flush time."""
        return f"{self.prefix}workers"

    @property
    def last_bug(self) -> str:
        """The latest error reply (WRONGTYPE, a script error) any worker got: every worker's health reports it."""
        return f"{self.prefix}bug"

    @property
    def secure_key(self) -> str:
        """The generated access key (no TTL: it must survive restarts and never be evicted)."""
        return f"{self.prefix}secure_key"

    @property
    def key_source(self) -> str:
        """Where the serving proxy's key comes from, as JSON (no secret): read by `api-buddy key`."""
        return f"{self.prefix}key_source"

    def key_failures(self, address: str) -> str:
        """One client address's refused access keys (buddy.store.key_failures): its lock-out and log counts."""
        return f"{self.prefix}key_failures:{address}"

    def session(self, session: str) -> str:
        """A dashboard session, open until it expires or its browser signs out."""
        return f"{self.prefix}session:{session}"

    @property
    def offline(self) -> str:
        """The run-time offline switch: '1' or '0'; absent means as configured (cache.offline)."""
        return f"{self.prefix}offline"

    @property
    def archive_secret(self) -> str:
        """The secret that seals this installation's WARC exports of credentialed entries (no TTL: a lost one
        turns every earlier export into one from elsewhere)."""
        return f"{self.prefix}archive_secret"

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

    def kind(self, key: str) -> str:
        """The kind (KEY_KINDS' name) of one of our keys, or '' for a key without our prefix."""
        if not key.startswith(self.prefix):
            return ""
        return key[len(self.prefix):].split(":", 1)[0]

    def cache_pattern(self, domain: str | None = None, namespace: str | None = None) -> str:
        """A SCAN MATCH pattern for one domain's entries, or every domain's; in one namespace only, if named
        (see policy.namespaced)."""
        tag = "*" if domain is None else "{" + _glob_escape(domain) + "}"
        if namespace is None:
            return f"{self.prefix}cache:{tag}:*" if domain is not None else f"{self.prefix}cache:*"
        return f"{self.prefix}cache:{tag}:ns:{_glob_escape(namespace)}:*"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
