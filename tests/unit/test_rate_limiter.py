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


def delays(limiter: RateLimiter, d, n: int) -> list[float]:
    return [limiter.acquire(d).delay for _ in range(n)]


def test_per_second_limit_spaces_requests_into_the_next_window(limiter) -> None:
    got = delays(limiter, domain(per_second=3), 7)
    assert got[:3] == [0, 0, 0] or max(got[:3]) < 0.01
    guard = GUARD_MS / 1000
    # Each delay is counted from its own call, so a stall between calls shortens it: allow for that.
    assert all(abs(x - (1 + guard)) < 0.25 for x in got[3:6]), got
    assert abs(got[6] - 2 * (1 + guard)) < 0.25, got


def test_n_requests_at_l_per_second_take_about_n_over_l(limiter) -> None:
    got = delays(limiter, domain(per_second=4), 20)
    assert 4 * 1.0 < max(got) < 20 / 4 + 0.5


def test_per_minute_full_while_per_second_has_room_is_refused_without_a_slot(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=2)
    d = domain(per_second=10, per_minute=3)
    assert [limiter.acquire(d).accepted for _ in range(3)] == [True] * 3
    refused = limiter.acquire(d)
    assert not refused.accepted
    assert (refused.limit, refused.window) == (3, 60.0)
    assert 59 < refused.delay <= 60 + GUARD_MS / 1000
    assert any_redis.zcard(KEYS.rate_starts("up")) == 3  # a refusal consumes nothing


def test_hourly_limit_comes_from_domain_limits(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=5)
    d = domain(per_hour=2)
    assert [limiter.acquire(d).accepted for _ in range(3)] == [True, True, False]


def test_retry_after_pauses_the_domain_exactly(limiter) -> None:
    d = domain()
    limiter.penalize(d, retry_after=3)
    assert 2.7 < limiter.acquire(d).delay <= 3.0


def test_penalty_without_retry_after_grows_exponentially_to_the_cap(any_redis) -> None:
    limiter = RateLimiter(any_redis, StoreGuard(), KEYS, max_delay=5)
    d = domain()
    pauses = []
    for _ in range(5):
        any_redis.hset(KEYS.rate_penalty("up"), "until", 0)  # look at each pause on its own
        limiter.penalize(d, retry_after=None)
        until = int(any_redis.hget(KEYS.rate_penalty("up"), "until"))
        seconds, micros = any_redis.time()  # one reading of Redis's clock (two could straddle a second)
        pauses.append(round((until - int(seconds) * 1000 - int(micros) // 1000) / 1000))
    assert pauses == [1, 2, 4, 5, 5]


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
    got = [one.acquire(d).delay for _ in range(5)]
    assert got[:2] == [0, 0] and abs(got[2] - (1 + GUARD_MS / 1000)) < 0.25
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
