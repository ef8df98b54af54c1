"""Every counter the proxy keeps and every upstream outcome it tells apart, declared once; every surface reads them.

A counter is one field of a mapping's `stats:{<name>}` hash (no TTL: its fields are this fixed set). Its one
declaration in `Counters` says all that the surfaces need: the field `metrics.count(domain, ...)` takes, the
section of /admin/metrics that shows it and under which names, its Prometheus counter and help, the dashboard
column and words that show it (the same in `stats`), whether it is a request outcome (their sum is a mapping's
requests) and whether it is also counted per minute (the dashboard's chart).

An upstream outcome is how one upstream call ended: an HTTP status (three digits, 100 to 599) or a failure kind
of FAILURES. It is counted as the field `status:<outcome>`; `Outcome.is_error` alone decides what is an error. A
field declared nowhere is never written (MetricsRecorder refuses it) and never read (`Tally.read` skips it,
whatever wrote it), so no odd answer can grow the hash or break a reader.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple


class Section(enum.Enum):
    """The sections of /admin/metrics that show counters."""

    CACHE = "cache"  # per mapping (`by_domain`, under `Counter.name`) and for the whole proxy (`Counter.whole`)
    UPSTREAM = "upstream"  # per mapping (`by_domain`) and `overall`, under the same name
    THROTTLING = "throttling"  # per mapping only


class Unit(enum.Enum):
    """What a counter adds up; MS counters are shown in seconds (JSON, Prometheus, dashboard alike)."""

    COUNT = "count"
    BYTES = "bytes"
    MS = "ms"


@dataclass(frozen=True)
class Counter:
    """One counter: `field` in Redis, `name` in its /admin/metrics section, `metric` in Prometheus."""

    field: str  # its field of `stats:{<name>}`, as metrics.count() takes it
    section: Section
    name: str | None  # its key per mapping in `section`; None: shown there only through derived figures
    metric: str  # its Prometheus counter (the exposition adds `_total`)
    help: str  # what it counts: the Prometheus HELP line
    total: str | None = None  # CACHE: its key among the whole proxy's figures, when that is not `name`
    unit: Unit = Unit.COUNT
    column: str | None = None  # the dashboard column (and `stats` line) that shows it; counters of one share it
    label: str = ""  # its words in that column; "" for its name, with spaces
    request: bool = False  # a request outcome: each request adds to exactly one, their sum is its requests
    per_minute: bool = False  # also counted per minute (`minutes:{<name>}:<minute>`), for the chart

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", (self.name or self.field).replace("_", " "))

    @property
    def whole(self) -> str | None:
        """Its key among the cache section's whole-proxy figures (hit_count, sets, ...), if it has one."""
        return (self.total or self.name) if self.section is Section.CACHE else None

    def shown(self, value: int) -> int | float:
        """The value as every surface shows it: milliseconds become seconds."""
        return round(value / 1000, 3) if self.unit is Unit.MS else value


CACHE, UPSTREAM, THROTTLING = Section.CACHE, Section.UPSTREAM, Section.THROTTLING
BYTES, MS = Unit.BYTES, Unit.MS


class Counters:
    """Every counter, in the order the surfaces list them. Adding one is one line here."""

    HITS = Counter("hits", CACHE, "hits", "buddy_cache_hits", "Requests answered from the cache.",
                   total="hit_count", column="lookups", request=True, per_minute=True)
    MISSES = Counter("misses", CACHE, "misses", "buddy_cache_misses", "Cacheable requests that went upstream.",
                     total="miss_count", column="lookups", request=True, per_minute=True)
    COALESCED = Counter("coalesced", CACHE, "coalesced", "buddy_cache_coalesced",
                        "Requests answered with an identical request's upstream result.",
                        total="coalesced_count", column="lookups", request=True)
    PASSTHROUGH = Counter("passthrough", CACHE, None, "buddy_passthrough_requests",
                          "Uncacheable requests (PUT, DELETE, Range, ...) sent upstream.", request=True)
    COALESCE_TIMEOUTS = Counter("coalesce_timeouts", CACHE, None, "buddy_coalesce_timeouts",
                                "Requests that waited past the coalesce timeout for an identical one (504).",
                                request=True)
    SETS = Counter("sets", CACHE, None, "buddy_cache_sets", "Responses stored in the cache.", total="sets")
    BYTES_SAVED = Counter("bytes_saved", CACHE, "bytes_saved", "buddy_bytes_saved",
                          "Response bytes served without an upstream call.", unit=BYTES, column="saved")
    MS_SAVED = Counter("ms_saved", CACHE, "seconds_saved", "buddy_seconds_saved",
                       "Upstream time not spent thanks to hits and coalescing.", unit=MS, column="saved",
                       label="upstream time saved")
    STALE = Counter("stale", CACHE, "stale_answers", "buddy_stale_answers",
                    "Requests answered with an expired entry (X-Cache: STALE).", column="stale", request=True)
    STALE_IF_ERROR = Counter("stale_if_error", CACHE, "stale_if_error", "buddy_stale_if_error",
                             "Stale answers given instead of an upstream failure.")
    BACKGROUND_REFRESHES = Counter("background_refreshes", CACHE, "background_refreshes",
                                   "buddy_background_refreshes", "Stale-while-revalidate refreshes run.",
                                   column="stale")
    REFRESH_FAILURES = Counter("refresh_failures", CACHE, "background_refresh_failures",
                               "buddy_background_refresh_failures", "Background refreshes that failed.")
    OFFLINE_REFUSALS = Counter("offline_refusals", CACHE, "offline_refusals", "buddy_offline_refusals",
                               "Misses answered 504 in offline mode.", request=True)
    NOT_CACHED = Counter("not_cached", CACHE, "only_if_cached_misses", "buddy_only_if_cached_misses",
                         "Misses answered 504 for Cache-Control: only-if-cached.", request=True)
    MEMORY_HITS = Counter("memory_hits", CACHE, "memory_hits", "buddy_memory_hits",
                          "Cache lookups answered by a worker's in-memory copy (L1), not by Redis.")
    HIT_PATH_FAILURES = Counter("hit_path_failures", CACHE, "hit_path_failures", "buddy_hit_path_failures",
                                "Requests the hit path handed to the proxy view after an error of its own (a bug; "
                                "the log shows the first of each kind).")
    REVALIDATED_UNCHANGED = Counter("revalidated_unchanged", CACHE, "revalidated_unchanged",
                                    "buddy_revalidated_unchanged",
                                    "Conditional requests for an expired entry that the upstream answered 304.",
                                    column="revalidation")
    REVALIDATED_CHANGED = Counter("revalidated_changed", CACHE, "revalidated_changed", "buddy_revalidated_changed",
                                  "Conditional requests for an expired entry that the upstream answered in full (200).",
                                  column="revalidation")
    REVALIDATION_BYTES_SAVED = Counter("revalidation_bytes_saved", CACHE, "revalidation_bytes_saved",
                                       "buddy_revalidation_bytes_saved",
                                       "Body bytes the upstream did not send again thanks to its 304 answers.",
                                       unit=BYTES, column="revalidation")
    INVALIDATIONS = Counter("invalidations", CACHE, "invalidations", "buddy_invalidations",
                            "Invalidations after a non-error answer to POST, PUT, PATCH or DELETE.",
                            column="revalidation")
    UPSTREAM_REQUESTS = Counter("upstream_requests", UPSTREAM, "total_requests", "buddy_upstream_requests",
                                "Requests sent to the upstream.", per_minute=True, label="upstream calls")
    UPSTREAM_MS = Counter("upstream_ms", UPSTREAM, None, "buddy_upstream_response_seconds",
                          "Time spent waiting for upstreams.", unit=MS)
    THROTTLE_REFUSED = Counter("throttle_refused", THROTTLING, "violations", "buddy_throttle_refused",
                               "Requests refused with 429 by the rate limiter.")
    THROTTLE_DELAYED = Counter("throttle_delayed", THROTTLING, "delayed_requests", "buddy_throttle_delayed",
                               "Requests held for a rate-limit slot.")
    THROTTLE_DELAY_MS = Counter("throttle_delay_ms", THROTTLING, "total_delay_seconds", "buddy_throttle_delay_seconds",
                                "Time requests were held for a rate-limit slot.", unit=MS)
    CLIENT_GONE = Counter("client_gone", THROTTLING, None, "buddy_throttle_client_gone",
                          "Requests whose client left while held for a rate-limit slot (the slot went back).")


COUNTERS: tuple[Counter, ...] = tuple(c for c in vars(Counters).values() if isinstance(c, Counter))
REQUEST_OUTCOMES = tuple(c for c in COUNTERS if c.request)
PER_MINUTE = tuple(c for c in COUNTERS if c.per_minute)


class Column(NamedTuple):
    """Counters shown side by side: one cell per mapping on the dashboard, one line in `stats`."""

    name: str
    counters: tuple[Counter, ...]


COLUMNS = tuple(Column(name, tuple(c for c in COUNTERS if c.column == name))
                for name in dict.fromkeys(c.column for c in COUNTERS if c.column))

# -- upstream outcomes ----------------------------------------------------------------------------------------------

# How an upstream call can end without an answer to pass on (UpstreamError.kind, as service._fetch counts it).
FAILURES = {
    "timeout": "the upstream did not answer, or finish its body, in time (504)",
    "unreachable": "no answer: connection refused or reset, DNS or TLS failure, a body that broke off (502)",
    "malformed": "an answer that cannot be passed on: a status out of range, a status line with control "
                 "characters, an undecodable Location (502)",
}


@dataclass(frozen=True)
class Outcome:
    """How one upstream call ended: `status` for an HTTP answer, None for a failure kind."""

    name: str  # "200", "timeout"
    status: int | None = None

    @property
    def field(self) -> str:
        return f"status:{self.name}"

    @property
    def is_error(self) -> bool:
        """Counted against the upstream's success rate: every failure, a 429, a 5xx."""
        return self.status is None or self.status == 429 or self.status >= 500

    @property
    def listed(self) -> bool:
        """Listed in `errors_by_status`: every failure and every 4xx or 5xx answer."""
        return self.status is None or self.status >= 400

    @property
    def pushes_back(self) -> bool:
        """An answer that pauses the mapping (progressive throttling): 429 and 503."""
        return self.status in (429, 503)


OUTCOMES: dict[str, Outcome] = {
    **{str(status): Outcome(str(status), status) for status in range(100, 600)},
    **{kind: Outcome(kind) for kind in FAILURES},
}


def outcome(name: object) -> Outcome | None:
    """The declared outcome of that name ("404", "timeout"), or None for anything else."""
    return OUTCOMES.get(name) if isinstance(name, str) else None


# Every field `stats:{<name>}` may hold, and what it is.
DECLARED: dict[str, Counter | Outcome] = {
    **{c.field: c for c in COUNTERS},
    **{o.field: o for o in OUTCOMES.values()},
}


class UndeclaredCounter(ValueError):
    """A counter that Counters does not declare: a bug in the caller."""


def declared(name: Counter | Outcome | str) -> Counter | Outcome | None:
    """What a field (or the counter or outcome itself) counts, if it is declared; None if not."""
    return DECLARED.get(name if isinstance(name, str) else name.field)


@dataclass(frozen=True)
class Tally:
    """One mapping's counters (or several mappings', added up): every declared field counted so far."""

    fields: Mapping[str, int]

    @classmethod
    def read(cls, raw: Mapping[bytes, bytes]) -> Tally:
        """From HGETALL of `stats:{<name>}`: fields declared nowhere (or not integers) are left out."""
        fields = {}
        for name, value in raw.items():
            text = name.decode(errors="replace")
            if text in DECLARED:
                try:
                    fields[text] = int(value)
                except ValueError:
                    continue
        return cls(fields)

    @classmethod
    def sum(cls, tallies: Iterable[Tally]) -> Tally:
        added: dict[str, int] = {}
        for tally in tallies:
            for name, n in tally.fields.items():
                added[name] = added.get(name, 0) + n
        return cls(added)

    def __getitem__(self, counter: Counter) -> int:
        return self.fields.get(counter.field, 0)

    def shown(self, counter: Counter) -> int | float:
        return counter.shown(self[counter])

    @property
    def requests(self) -> int:
        return sum(self[c] for c in REQUEST_OUTCOMES)

    @property
    def outcomes(self) -> dict[Outcome, int]:
        """Upstream calls by outcome, in the order of their fields."""
        found = ((DECLARED[name], n) for name, n in sorted(self.fields.items()))
        return {kind: n for kind, n in found if isinstance(kind, Outcome)}
