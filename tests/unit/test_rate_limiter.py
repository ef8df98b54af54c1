"""The throttle script, on fakeredis[lua] and the real bundled Redis: windows, refusals, penalties, memory."""
from __future__ import annotations

import pytest

from buddy.redis_keys import RedisKeys
from buddy.settings import validate_config
from buddy.store.guard import StoreGuard
from buddy.store.rate_limiter import GUARD_MS, LocalLimiter, RateLimiter

KEYS = RedisKeys("t:")


def domain(per_second=None, per_minute=None, per_hour=1000):
    config = {"domain_mappings": {"up": {"upstream": "https://up.example", "max_requests_per_second": per_second,
                                         "max_requests_per_minute": per_minute}},
              "throttling": {"domain_limits": {"up": per_hour}}}
    return validate_config(config).domains["up"]


@pytest.fixture
def limiter(any_redis) -> RateLimiter:
    return RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=300)


def reserve(limiter: RateLimiter, d, n: int) -> tuple[list[int], list[int]]:
    """n acquisitions: (the start each reserved, when the script ran), in ms by Redis's clock, as the script stored
    them: the start is the slot's score in the sorted set, and the script's clock is that start less the delay it
    answered. Verdicts read from what the script stored and said, never from a clock read apart from it (a busy
    machine may stall between two calls, or between a call and a separate reading)."""
    decisions = [limiter.acquire(d) for _ in range(n)]
    starts = [int(limiter.client.zscore(decision.starts, decision.slot)) for decision in decisions]
    return starts, [start - round(decision.delay * 1000) for start, decision in zip(starts, decisions)]


SPAN_MS = 1000 + GUARD_MS  # a per-second window, with its guard


def test_per_second_limit_spaces_requests_into_the_next_window(limiter) -> None:
    starts, called = reserve(limiter, domain(per_second=3), 7)
    assert starts[:3] == called[:3]  # room in the window: at once
    for i in range(3, 7):
        # One window after the start three before, or at once if this call itself came later than that (a stall).
        assert starts[i] == max(called[i], starts[i - 3] + SPAN_MS), (i, starts, called)
    assert starts[6] - starts[0] >= 2 * SPAN_MS


def test_n_requests_at_l_per_second_take_about_n_over_l(limiter) -> None:
    starts, called = reserve(limiter, domain(per_second=4), 20)
    assert starts[-1] - starts[0] >= 4 * SPAN_MS  # 20 at 4 a second: the last starts 4 windows after the first
    assert max(s - c for s, c in zip(starts, called)) <= 4 * SPAN_MS  # and nobody is held longer than that
    assert all(starts[i] == max(called[i], starts[i - 1], starts[i - 4] + SPAN_MS) for i in range(4, 20)), starts


def test_per_minute_full_while_per_second_has_room_is_refused_without_a_slot(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=2)
    d = domain(per_second=10, per_minute=3)
    assert [limiter.acquire(d).accepted for _ in range(3)] == [True] * 3
    refused = limiter.acquire(d)
    assert not refused.accepted
    assert (refused.limit, refused.window) == (3, 60.0)
    # The next slot: a minute (and the guard) after the oldest start, counted from when the refusing script ran
    # (it stored that as the penalty's `last`).
    [(_, oldest)] = any_redis.zrange(KEYS.rate_starts("up"), 0, 0, withscores=True)
    refused_at = int(any_redis.hget(KEYS.rate_penalty("up"), "last"))
    assert round(refused.delay * 1000) == int(oldest) + 60_000 + GUARD_MS - refused_at
    assert 0 < refused.delay <= 60 + GUARD_MS / 1000
    assert any_redis.zcard(KEYS.rate_starts("up")) == 3  # a refusal consumes nothing


def test_hourly_limit_comes_from_domain_limits(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=5)
    d = domain(per_hour=2)
    assert [limiter.acquire(d).accepted for _ in range(3)] == [True, True, False]


def test_retry_after_pauses_the_domain_exactly(limiter) -> None:
    d = domain()
    limiter.penalize(d, retry_after=3)
    until, last = (int(v) for v in limiter.client.hmget(KEYS.rate_penalty("up"), "until", "last"))
    assert until - last == 3000  # exactly the Retry-After, from when the script ran
    held = limiter.acquire(d)
    assert held.accepted and not held.reserved and 0 < held.delay <= 3.0  # held for what is left of it, no slot


def test_penalty_without_retry_after_grows_exponentially_to_the_cap(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=5)
    d = domain()
    levels, pauses = [], []
    for _ in range(5):
        any_redis.hset(KEYS.rate_penalty("up"), "until", 0)  # look at each pause on its own
        limiter.penalize(d, retry_after=None)
        # The script stores its own clock reading as `last`: until - last is the pause it chose, exactly, however
        # long the machine took between this call and the next reading.
        until, level, last = (int(v) for v in any_redis.hmget(KEYS.rate_penalty("up"), "until", "level", "last"))
        levels.append(level)
        pauses.append(until - last)
    assert levels == [1, 2, 3, 4, 5]
    assert pauses == [1000, 2000, 4000, 5000, 5000]


def test_success_resets_the_level_and_a_refusal_raises_it(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=1)
    d = domain(per_hour=1)
    assert limiter.acquire(d).accepted
    first, second = limiter.acquire(d), limiter.acquire(d)
    assert not first.accepted and (first.level, second.level) == (1, 2)
    limiter.reset(d)
    assert int(any_redis.hget(KEYS.rate_penalty("up"), "level")) == 0


def test_memory_stays_bounded_to_what_a_window_can_see(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=300)
    d = domain(per_second=50, per_hour=100000)
    any_redis.zadd(KEYS.rate_starts("up"), {f"old{i}": i for i in range(500)})  # starts from 1970
    limiter.acquire(d)
    assert any_redis.zcard(KEYS.rate_starts("up")) == 1
    assert 0 < any_redis.pttl(KEYS.rate_starts("up")) <= 3_600_000 + GUARD_MS


def test_local_fallback_keeps_this_processes_share() -> None:
    fallback = LocalLimiter(max_delay=300, workers=6)
    shares = dict((round(span, 3), limit) for span, limit in fallback.share(domain(per_second=4, per_hour=600)))
    assert shares == {round(2 * (1 + GUARD_MS / 1000), 3): 1, round(3600 + GUARD_MS / 1000, 3): 100}
    d = domain(per_second=2)
    one = LocalLimiter(max_delay=300, workers=1)
    got = [one.acquire(d) for _ in range(5)]
    starts = [float(decision.slot) for decision in got]  # the monotonic time each start was reserved for
    called = [start - decision.delay for start, decision in zip(starts, got)]  # the clock it read
    assert [decision.delay for decision in got[:2]] == [0, 0]
    assert starts[2] == max(called[2], starts[0] + 1 + GUARD_MS / 1000)  # the next window, counted from the start
    tight = LocalLimiter(max_delay=0.5, workers=1)
    assert [tight.acquire(domain(per_second=1)).accepted for _ in range(2)] == [True, False]


def test_a_pause_applies_to_its_credential_partition_and_the_mappings_to_all(limiter) -> None:
    d = domain()
    limiter.penalize(d, retry_after=60, partition="key-a")
    assert limiter.acquire(d, "key-a").delay > 55 and limiter.paused(d, "key-a") > 55
    assert limiter.acquire(d, "key-b").delay == 0 and limiter.paused(d, "key-b") == 0
    assert limiter.acquire(d).delay == 0 and limiter.paused(d) == 0  # no credentials: the mapping's own
    limiter.penalize(d, retry_after=30)  # a pause of the mapping holds every partition
    assert limiter.acquire(d, "key-b").delay > 25 and limiter.paused(d, "key-c") > 25
