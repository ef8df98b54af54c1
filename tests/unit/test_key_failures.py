"""Wrong access keys slow their client address down (shared through Redis, or per process without it), the right
key gets in once the lock-out ends, and refusals make one log line per address and minute. Time is a test clock:
no test here waits."""
from __future__ import annotations

import logging
from typing import Any, Iterator

import fakeredis
import pytest
import redis
from flask import Flask

from buddy import create_app
from buddy.redis_keys import KEY_KINDS, RedisKeys
from buddy.store.guard import StoreGuard
from buddy.store.key_failures import KeyFailures, address_of
from tests.support.upstream_stub import UpstreamStub

KEY = "proxy-key-0123456789abcdefghij"
WRONG = {"X-API-Buddy-Key": "not-the-key-not-the-key"}
RIGHT = {"X-API-Buddy-Key": KEY}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def keyed(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis, clock: Clock, **security: Any) -> Flask:
    app = create_app({**buddy_config, "security": {"require_secure_key": True, "secure_key": KEY, **security}},
                     redis_client=fake_redis, environ={})
    failures = app.extensions["buddy"].access.failures
    failures.flusher.stop()  # the test flushes by its own clock
    failures.clock = clock
    return app


@pytest.fixture
def app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis, clock: Clock) -> Iterator[Flask]:
    app = keyed(buddy_config, fake_redis, clock)
    yield app
    app.extensions["buddy"].shutdown()


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]


def test_the_tenth_wrong_key_locks_the_address_out_and_300_make_one_log_line(
        app: Flask, upstream: UpstreamStub, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    assert client.get("/up/a", headers=RIGHT).status_code == 200
    statuses, answers = [], []
    for _ in range(300):
        response = client.get("/up/a", headers=WRONG)
        statuses.append(response.status_code)
        answers.append(response)
        clock.now += 0.008  # 300 in 2.4 s
    assert statuses == [401] * 9 + [429] * 291
    locked = answers[9]
    assert locked.headers["Retry-After"] == "1" and locked.json["retry_after"] == 1
    assert locked.json["error"] == "too many wrong access keys" and locked.json["client"] == "127.0.0.1"
    assert "not-the-key" not in locked.get_data(as_text=True)
    assert refusal_lines(caplog) == ["refused 1 request from 127.0.0.1: missing or wrong access key (further refusals "
                                     "from 127.0.0.1 are counted and logged once a minute)"]
    # Right after, the right key waits too: a guess during a lock-out gets no answer.
    refused = client.get("/up/a", headers=RIGHT)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    clock.now += int(refused.headers["Retry-After"])
    assert client.get("/up/a", headers=RIGHT).status_code == 200  # not locked out for good
    assert upstream.count() == 1
    clock.now += 60
    app.extensions["buddy"].access.failures.flush()
    lines = refusal_lines(caplog)
    assert len(lines) == 2 and lines[1].startswith("refused 300 requests from 127.0.0.1 in the last 6")
    assert KEY not in caplog.text and "not-the-key" not in caplog.text


def test_each_wrong_key_after_a_lock_out_doubles_the_next_up_to_the_longest_and_a_quiet_minute_forgets(
        buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    app = keyed(buddy_config, fake_redis, clock, max_key_failures=3, key_lockout_max_seconds=5)
    client = app.test_client()
    answers = [client.get("/up/a", headers=WRONG) for _ in range(3)]
    assert [a.status_code for a in answers] == [401, 401, 429] and answers[-1].json["retry_after"] == 1
    waits = [1]
    for _ in range(5):
        clock.now += 0.5
        assert client.get("/up/a", headers=WRONG).status_code == 429  # during a lock-out: refused untried
        clock.now += waits[-1] - 0.5
        waits.append(client.get("/up/a", headers=WRONG).json["retry_after"])  # the first guess after it
    assert waits == [1, 2, 4, 5, 5, 5]
    clock.now += 5 + 61
    assert [client.get("/up/a", headers=WRONG).status_code for _ in range(3)] == [401, 401, 429]
    app.extensions["buddy"].shutdown()


def test_no_key_at_all_is_no_guess_and_never_locks_out(app: Flask, clock: Clock) -> None:
    client = app.test_client()
    statuses = {client.get("/admin/").status_code for _ in range(30)}  # the dashboard's sign-in page
    statuses |= {client.get("/up/a").status_code for _ in range(30)}
    assert statuses == {401}
    assert client.get("/up/a", headers=RIGHT).status_code == 200


def test_addresses_are_counted_apart_and_an_ipv6_host_by_its_64(app: Flask) -> None:
    client = app.test_client()

    def from_(address: str, headers: dict[str, str]) -> int:
        return client.get("/up/a", headers=headers, environ_base={"REMOTE_ADDR": address}).status_code

    for index in range(10):
        from_(f"2001:db8:1:2::{index + 1:x}", WRONG)
    assert from_("2001:db8:1:2:ffff::9", RIGHT) == 429  # the same /64
    assert from_("2001:db8:1:3::1", RIGHT) == 200
    assert from_("10.0.0.7", RIGHT) == 200
    assert (address_of("::ffff:10.0.0.7"), address_of("::1"), address_of("")) == ("10.0.0.7", "::1", "unknown")


def test_a_remembered_hit_does_not_let_the_right_key_past_a_lock_out(app: Flask) -> None:
    client = app.test_client()
    client.get("/up/a", headers=RIGHT)
    assert client.get("/up/a", headers=RIGHT).headers["X-Cache"] == "HIT"  # remembered by the hit path
    for _ in range(10):
        client.get("/up/b", headers=WRONG)
    refused = client.get("/up/a", headers=RIGHT)
    assert refused.status_code == 429 and "X-Cache" not in refused.headers


def test_the_dashboard_sign_in_says_when_to_try_again(app: Flask) -> None:
    client = app.test_client()
    for _ in range(10):
        client.post("/admin/login", data={"key": "guess-guess-guess-guess"})
    page = client.post("/admin/login", data={"key": KEY})
    assert page.status_code == 429 and "try again in" in page.get_data(as_text=True)
    assert page.headers["Retry-After"] == "1" and "Set-Cookie" not in page.headers


def test_the_address_s_state_is_a_declared_key_that_expires(app: Flask, fake_redis: fakeredis.FakeRedis) -> None:
    client = app.test_client()
    for _ in range(12):
        client.get("/up/a", headers=WRONG)
    kinds = {kind.name: kind for kind in KEY_KINDS}
    found = [key.decode() for key in fake_redis.scan_iter(match="buddy:key_failures:*")]
    assert found == [RedisKeys().key_failures("127.0.0.1")] and kinds["key_failures"].expires
    assert 0 < fake_redis.pttl(found[0]) <= 121_000 + 1000


def test_without_redis_each_process_still_slows_wrong_keys(app: Flask, redis_server_fake: fakeredis.FakeServer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    redis_server_fake.connected = False
    assert [client.get("/up/a", headers=WRONG).status_code for _ in range(11)] == [401] * 9 + [429] * 2
    assert len(refusal_lines(caplog)) == 1


def test_the_script_and_the_per_process_rules_agree(any_redis: redis.Redis) -> None:
    """One sequence of events through key_failure.lua and through LocalFailures: the same outcome each time."""
    shared = KeyFailures(3, 4.0, client=any_redis, guard=StoreGuard(), keys=RedisKeys("test:"))
    alone = KeyFailures(3, 4.0)
    now, outcomes = 1_800_000_000.0, []
    for step, mode in enumerate(["wrong"] * 4 + ["refused", "wrong", "flush", "wrong"] * 6 + ["flush", "refused"]):
        outcomes.append(shared.count("10.1.1.1", mode, now))
        assert outcomes[-1] == alone.count("10.1.1.1", mode, now), (step, mode)
        now += [0.3, 1.1, 2.5, 0.7, 40.0, 61.0, 0.2][step % 7]
    assert {o.strikes for o in outcomes} >= {0, 1, 2, 3} and any(o.report > 1 for o in outcomes)
    assert any(o.until for o in outcomes) and any(o.before for o in outcomes)


def test_without_log_events_nothing_is_logged_but_wrong_keys_still_slow(
        buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = keyed(buddy_config, fake_redis, clock, log_security_events=False, max_key_failures=2)
    client = app.test_client()
    assert [client.get("/up/a", headers=WRONG).status_code for _ in range(3)] == [401, 429, 429]
    assert refusal_lines(caplog) == []
    app.extensions["buddy"].shutdown()
