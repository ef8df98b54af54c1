"""Access control: every key placement works, the key goes nowhere, and wrong keys stop before any work."""
from __future__ import annotations

import json
import logging
from typing import Any

import fakeredis
import pytest

from buddy import create_app
from buddy.access import Target, exposure_warning, strip_key
from tests.support.upstream_stub import UpstreamStub

KEY = "proxy-key-0123456789abcdefghij"
DOMAINS = {"up"}


def secured(buddy_config: dict[str, Any], key: str | None = KEY) -> dict[str, Any]:
    return {**buddy_config, "security": {"require_secure_key": True, "secure_key": key}}


@pytest.fixture
def app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis):
    app = create_app(secured(buddy_config), redis_client=fake_redis, environ={})
    yield app
    app.extensions["buddy"].shutdown()


def everything_seen(upstream: UpstreamStub) -> str:
    return repr([(s.method, s.path, s.raw_headers, s.body) for s in upstream.log])


def test_strip_key_takes_the_key_from_wherever_it_is_and_leaves_the_rest() -> None:
    target = Target(KEY, b"up/c/en/dog", f"q=1&key={KEY}&key=upstream-key",
                    [("X-API-Buddy-Key", KEY), ("Authorization", f"Bearer {KEY}"), ("Accept", "x")])
    stripped, found = strip_key(target, KEY, DOMAINS)
    assert found
    assert (stripped.first, stripped.rest, stripped.query) == ("up", b"c/en/dog", "q=1&key=upstream-key")
    assert stripped.headers == [("Accept", "x")]


def test_strip_key_leaves_upstream_credentials_and_domains_alone() -> None:
    target = Target("up", b"x", "key=google-api-key", [("Authorization", "Bearer sk-upstream")])
    stripped, found = strip_key(target, KEY, DOMAINS)
    assert not found and stripped == target


def test_encoded_key_in_the_query_is_recognised() -> None:
    stripped, found = strip_key(Target("up", b"x", "key=a%2Bb+c", []), "a+b c", DOMAINS)
    assert found and stripped.query == ""


@pytest.mark.parametrize("placement", ["header", "bearer", "query", "path"])
def test_each_placement_admits_and_the_key_never_reaches_upstream(client, upstream, placement: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    headers, url = {}, "/up/c/en/dog?limit=1"
    if placement == "header":
        headers["X-API-Buddy-Key"] = KEY
    elif placement == "bearer":
        headers["Authorization"] = f"Bearer {KEY}"
    elif placement == "query":
        url += f"&key={KEY}"
    else:
        url = f"/{KEY}{url}"
    response = client.get(url, headers=headers)
    assert response.status_code == 200
    assert upstream.paths() == ["/c/en/dog?limit=1"]
    assert KEY not in everything_seen(upstream)
    assert KEY not in caplog.text


def test_the_key_is_not_part_of_the_cache_key(client, upstream) -> None:
    assert client.get("/up/a", headers={"X-API-Buddy-Key": KEY}).headers["X-Cache"] == "MISS"
    assert client.get(f"/up/a?key={KEY}").headers["X-Cache"] == "HIT"
    assert client.get(f"/{KEY}/up/a").headers["X-Cache"] == "HIT"
    assert upstream.count() == 1


@pytest.mark.parametrize("headers,url", [
    ({}, "/up/a"),
    ({"X-API-Buddy-Key": "wrong-key-wrong-key-wrong"}, "/up/a"),
    ({"Authorization": "Bearer not-the-key"}, "/up/a"),
    ({}, "/up/a?key=nope"),
    ({}, "/not-the-key/up/a"),
])
def test_missing_or_wrong_key_is_401_before_any_work(client, upstream, fake_redis, headers, url) -> None:
    response = client.post(url, headers=headers, data=b"body")
    assert response.status_code == 401 and response.is_json
    assert response.json["error"] == "unauthorized"
    assert "not-the-key" not in response.get_data(as_text=True)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.count() == 0
    # No cache lookup stored, no lock, no throttle window touched: only the refusal is counted, by address.
    assert [key.decode() for key in fake_redis.keys("*")] == ["buddy:key_failures:127.0.0.1"]


def test_upstream_bearer_tokens_pass_through_and_partition_the_cache(client, upstream) -> None:
    for token in ("alice", "bob", None, "alice", "bob", None):
        headers = {"X-API-Buddy-Key": KEY, **({"Authorization": f"Bearer {token}"} if token else {})}
        assert client.get("/up/paid", headers=headers).status_code == 200
    assert upstream.count() == 3
    assert sorted(s.headers.get("authorization", "-") for s in upstream.log) == ["-", "Bearer alice", "Bearer bob"]


def test_a_generated_key_is_shared_through_redis_and_printed_by_the_cli(buddy_config, upstream) -> None:
    server = fakeredis.FakeServer()
    first = create_app(secured(buddy_config, key=None), redis_client=fakeredis.FakeRedis(server=server), environ={})
    second = create_app(secured(buddy_config, key=None), redis_client=fakeredis.FakeRedis(server=server), environ={})
    key = first.extensions["buddy"].secure_key.get()
    assert len(key) >= 32 and key == second.extensions["buddy"].secure_key.get()
    assert second.test_client().get("/up/x", headers={"X-API-Buddy-Key": key}).status_code == 200
    result = second.test_cli_runner().invoke(args=["buddy", "key"])
    assert result.exit_code == 0 and result.output == key + "\n"


def test_environment_key_overrides_the_file(buddy_config, fake_redis, tmp_path) -> None:
    path = tmp_path / "buddy.json"
    path.write_text(json.dumps(secured(buddy_config, key="from-the-config-file-1234")))
    app = create_app(redis_client=fake_redis,
                     environ={"BUDDY_CONFIG": str(path), "BUDDY_SECURE_KEY": "from-the-environment-1234"})
    assert app.extensions["buddy"].secure_key.get() == "from-the-environment-1234"


def test_no_redis_for_a_generated_key_fails_closed(buddy_config, redis_server_fake, fake_redis, upstream) -> None:
    redis_server_fake.connected = False  # from start-up on: the generated key cannot be read
    app = create_app(secured(buddy_config, key=None), redis_client=fake_redis, environ={})
    response = app.test_client().get("/up/x", headers={"X-API-Buddy-Key": "anything-at-all-here"})
    assert response.status_code == 503 and response.json["error"] == "access key unavailable"
    assert upstream.count() == 0


def test_listening_beyond_loopback_without_a_key_is_warned_about() -> None:
    assert exposure_warning(["127.0.0.1:8080", "[::1]:8080", "localhost:80", "unix:/run/b.sock"], False) is None
    warning = exposure_warning(["0.0.0.0:8080", "127.0.0.1:9"], False)
    assert warning is not None and "0.0.0.0:8080" in warning and "127.0.0.1:9" not in warning
    assert exposure_warning(["devbox.lan:8080"], False) is not None
    assert exposure_warning(["0.0.0.0:8080"], True) is None


def test_only_plain_spellings_of_the_key_are_accepted(client, upstream) -> None:
    weird = "".join(f"%{ord(c):02X}" for c in KEY[:5]) + KEY[5:]  # an arbitrary %-encoding of the same key
    assert client.get(f"/{weird}/up/a").status_code == 401
    assert client.get(f"/up/a?key={weird}").status_code == 401
    assert upstream.count() == 0


def test_an_unknown_name_is_not_echoed_when_keys_are_on(client) -> None:
    response = client.get(f"/{KEY}/{KEY}/up/a")
    assert response.status_code == 404 and KEY not in response.get_data(as_text=True)


def test_the_key_never_rides_along_in_a_place_the_proxy_does_not_read_as_a_key() -> None:
    from buddy.access import AccessControl, Target
    from buddy.errors import BadProxyRequest

    key = "k" * 43
    access = AccessControl(True, lambda: key)
    tab = Target("up", b"x", "", [("X-API-Buddy-Key", key), ("Authorization", f"Bearer\t{key}")])
    assert access.admit(tab, {"up"}, "client").headers == []  # a tab after Bearer is still the key
    for target in (Target("up", b"x", f"a=1;key={key}", [("X-API-Buddy-Key", key)]),
                   Target("up", b"x", "", [("X-API-Buddy-Key", key), ("X-Forwarded-Key", key)])):
        with pytest.raises(BadProxyRequest, match="would reach the upstream"):
            access.admit(target, {"up"}, "client")
