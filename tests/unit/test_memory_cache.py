"""The per-worker L1 (buddy.store.memory_cache): what it admits, how long a copy is used, and that no copy
outlives an invalidation, even one that raced the read it came from."""
from __future__ import annotations

import time

from buddy.codec import VaryPointer
from buddy.messages import ProxyResult
from buddy.store.memory_cache import EVERYTHING, MAX_AGE_SECONDS, MemoryCache


class Subscription:
    """The hub's side of it: which subscription is confirmed (None while there is none)."""

    def __init__(self) -> None:
        self.epoch: int | None = 1

    def current(self) -> int | None:
        return self.epoch


def entry(body: bytes = b"{}", fresh_for: int | None = 60, stored_at: float | None = None) -> ProxyResult:
    return ProxyResult(200, "OK", [("Content-Type", "application/json")], body,
                       stored_at=time.time() if stored_at is None else stored_at, fresh_for=fresh_for)


def read(memory: MemoryCache, key: str, value: ProxyResult | VaryPointer, domain: str = "up") -> None:
    """What ResponseCache.get does on an L1 miss: a ticket, the Redis read, then the admission."""
    memory.admit(memory.ticket(key, domain), value)


def test_an_entry_is_kept_on_its_second_read_and_then_served_from_memory() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    read(memory, "k", entry(b"first"))
    assert memory.get("k") is None  # read once: maybe a one-off, not worth a place
    read(memory, "k", entry(b"second"))
    copy = memory.get("k")
    assert copy is not None and copy.body == b"second"


def test_each_reader_gets_its_own_copy() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    for _ in range(2):
        read(memory, "k", entry())
    first = memory.get("k")
    assert first is not None
    first.extra.append(("Age", "5"))
    first.headers.append(("X-Cache", "HIT"))
    second = memory.get("k")
    assert second is not None and second.extra == [] and second.headers == [("Content-Type", "application/json")]


def test_memory_is_bounded_in_bytes_and_the_least_recently_used_goes_first() -> None:
    body = b"x" * 1000
    memory = MemoryCache(20 * 1600, Subscription())  # room for about 20 of these
    for i in range(20):
        for _ in range(2):
            read(memory, f"k{i}", entry(body))
    assert memory.stats()["entries"] == 20
    assert memory.get("k0") is not None  # k0 is now the most recently used; k1 the least
    for i in range(20, 25):
        for _ in range(2):
            read(memory, f"k{i}", entry(body))
    assert memory.stats()["bytes"] <= 20 * 1600
    assert memory.get("k24") is not None and memory.get("k0") is not None
    assert memory.get("k1") is None


def test_an_entry_too_large_for_its_share_is_never_kept() -> None:
    memory = MemoryCache(16_000, Subscription())
    for _ in range(3):
        read(memory, "big", entry(b"x" * 2000))  # over max_bytes / 16
    assert memory.get("big") is None


def test_an_invalidation_heard_during_the_read_refuses_what_the_read_returned() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    read(memory, "k", entry(b"old"))
    ticket = memory.ticket("k", "up")  # the read begins...
    memory.invalidate("k")  # ... a store elsewhere is announced while it runs ...
    memory.admit(ticket, entry(b"old"))  # ... and it returns the value from before the store
    assert memory.get("k") is None
    read(memory, "k", entry(b"new"))
    copy = memory.get("k")
    assert copy is not None and copy.body == b"new"


def test_an_invalidation_of_another_key_does_not_refuse_an_admission() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    read(memory, "k", entry())
    ticket = memory.ticket("k", "up")
    memory.invalidate("other")
    memory.admit(ticket, entry())
    assert memory.get("k") is not None


def test_a_mapping_cleared_or_everything_cleared_drops_its_copies_and_refuses_racing_reads() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    for key, domain in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        for _ in range(2):
            read(memory, key, entry(), domain)
    racing = memory.ticket("a1", "a")
    memory.invalidate(EVERYTHING, "a")
    memory.admit(racing, entry())
    assert memory.get("a1") is None and memory.get("a2") is None and memory.get("b1") is not None
    racing = memory.ticket("b1", "b")
    memory.clear()
    memory.admit(racing, entry())
    assert memory.get("b1") is None and memory.stats()["entries"] == 0


def test_copies_are_used_only_under_the_subscription_they_were_kept_under() -> None:
    subscription = Subscription()
    memory = MemoryCache(1 << 20, subscription)
    for _ in range(2):
        read(memory, "k", entry())
    subscription.epoch = None  # the subscription is lost: a store may go unheard
    assert memory.get("k") is None and memory.ticket("k", "up") is None
    subscription.epoch = 2  # subscribed again: what was kept before may have been missed
    assert memory.get("k") is None


def test_an_expired_entry_is_not_kept_and_a_copy_is_used_only_while_fresh(monkeypatch) -> None:
    memory = MemoryCache(1 << 20, Subscription())
    for _ in range(2):
        read(memory, "old", entry(fresh_for=60, stored_at=time.time() - 61))
    assert memory.get("old") is None  # Redis and the freshness rules (stale-while-revalidate...) answer for it
    for _ in range(2):
        read(memory, "soon", entry(fresh_for=60, stored_at=time.time() - 50))  # fresh for 10 s more at most
    assert memory.get("soon") is not None
    now = time.monotonic()  # the clock the copies are kept by, moved on rather than slept on (a busy machine
    monkeypatch.setattr(time, "monotonic", lambda: now + 10)  # may stall between two lines for a while)
    assert memory.get("soon") is None


def test_no_copy_is_used_longer_than_the_bound_even_for_an_entry_fresh_for_days(monkeypatch) -> None:
    memory = MemoryCache(1 << 20, Subscription())
    for _ in range(2):
        read(memory, "k", entry(fresh_for=7 * 86400))
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + MAX_AGE_SECONDS + 1)
    assert memory.get("k") is None


def test_vary_pointers_are_kept_like_entries() -> None:
    memory = MemoryCache(1 << 20, Subscription())
    for _ in range(2):
        read(memory, "p", VaryPointer(("accept-language",)))
    assert memory.get("p") == VaryPointer(("accept-language",))
    memory.invalidate("p")
    assert memory.get("p") is None


def test_turned_off_it_keeps_nothing() -> None:
    memory = MemoryCache(0, Subscription())
    assert not memory.enabled and memory.ticket("k", "up") is None
