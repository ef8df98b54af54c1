"""The Host check (buddy.hosts): only the proxy's own names are answered, on every route, in both key modes, before
any other work; and the names it accepts, and how a configuration says more."""
from __future__ import annotations

from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from buddy import create_app, hosts
from buddy.errors import ConfigError
from buddy.settings import validate_config
from tests.support.upstream_stub import UpstreamStub

KEY = "proxy-key-0123456789abcdefghij"
ROUTES = [("GET", "/up/a"), ("GET", "/up/never-fetched"), ("GET", "/admin/health"), ("GET", "/admin/metrics"),
          ("GET", "/metrics"), ("GET", "/admin/"), ("GET", "/admin/panel"), ("GET", "/"),
          ("DELETE", "/admin/cache"), ("POST", "/admin/offline/on"), ("POST", "/up/a")]


@pytest.fixture(autouse=True)
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "machine_names", lambda: ("devbox", "devbox.team.example"))


def make_app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis, **sections: Any) -> Flask:
    return create_app({**buddy_config, **sections}, redis_client=fake_redis, environ={})


@pytest.fixture(params=["no key", "key required"])
def any_mode(request: pytest.FixtureRequest, buddy_config: dict[str, Any],
             fake_redis: fakeredis.FakeRedis) -> Iterator[tuple[Flask, dict[str, str]]]:
    keyed = request.param == "key required"
    security = {"require_secure_key": True, "secure_key": KEY} if keyed else {}
    app = make_app(buddy_config, fake_redis, security=security)
    yield app, ({"X-API-Buddy-Key": KEY} if keyed else {})
    app.extensions["buddy"].shutdown()


@pytest.mark.parametrize("value, name", [
    ("localhost", "localhost"), ("LocalHost:8080", "localhost"), ("localhost.:8080", "localhost"),
    ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("[0:0::1]", "::1"), ("::1", "::1"),
    ("Box.Example.org", "box.example.org"), ("box:", "box"), (" box ", "box"),
    ("evil.example:80:80", None), ("a b", None), ("user@box", None), ("[::1", None), ("[not-v6]:80", None),
    ("box:80a", None), ("", None), (":8080", None),
])
def test_a_host_value_is_read_as_its_name_without_port_case_or_trailing_dot(value: str, name: str | None) -> None:
    assert hosts.host_name(value) == name


def test_the_proxy_s_own_names_are_loopback_the_binds_the_machine_s_and_the_configured_ones() -> None:
    settings = validate_config({"server": {"host": "0.0.0.0", "allowed_hosts": ["Buddy.Team.Example", "10.0.0.5"]},
                                "security": {"admin_hosts": ["old-name.example:8080"]}})
    names = hosts.accepted_names(settings, ["127.0.0.1:9000", "[::]:9000", "bound-name.lan:9000", "unix:/tmp/s"])
    assert names == {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "bound-name.lan", "devbox",
                     "devbox.team.example", "buddy.team.example", "10.0.0.5", "old-name.example"}
    line = hosts.describe(settings)
    assert line.startswith("accepts Host: buddy.team.example, devbox, devbox.team.example, localhost,")
    assert "any IP address" in line and "security.admin_hosts is read as part of server.allowed_hosts" in line
    assert "accepts any Host" in hosts.describe(validate_config({"server": {"allowed_hosts": ["*"]}}))
    # The older setting names names only: a "*" there (never meaningful) opens nothing.
    assert hosts.ANY not in hosts.accepted_names(validate_config({"security": {"admin_hosts": ["*"]}}))


@pytest.mark.parametrize("entry", ["http://box.example", "box.example:8080", "*.example.org", "box/x", "[::1"])
def test_an_allowed_host_with_a_scheme_or_port_stops_start_up_by_name(entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config({"server": {"allowed_hosts": ["fine.example", entry]}})
    assert caught.value.problems == [f"server.allowed_hosts.1: {entry!r} is not a host name: write a name or "
                                     "address without scheme or port (box.example.org, 10.0.0.5, ::1), or \"*\" "
                                     "for any"]


@pytest.mark.parametrize("method, path", ROUTES)
def test_a_name_that_is_not_the_proxy_s_is_refused_on_every_route_before_any_work(
        any_mode: tuple[Flask, dict[str, str]], upstream: UpstreamStub, fake_redis: fakeredis.FakeRedis,
        method: str, path: str) -> None:
    app, key = any_mode
    client = app.test_client()
    assert client.get("/up/a", headers=key).status_code == 200
    assert client.get("/up/a", headers=key).headers["X-Cache"] == "HIT"
    stored = sorted(fake_redis.keys("*"))
    response = client.open(path, method=method, headers={"Host": "evil.example:8080", "X-Buddy-Action": "1", **key})
    assert response.status_code == 421 and response.is_json
    assert response.json["error"] == "misdirected request" and response.json["setting"] == "server.allowed_hosts"
    assert response.json["host"] == "evil.example:8080" and "Age" not in response.headers
    assert "devbox" not in response.get_data(as_text=True)  # the accepted names are in the log, not for anyone
    assert upstream.count() == 1 and sorted(fake_redis.keys("*")) == stored  # nothing read, counted or stored
    assert client.get("/up/a", headers=key).headers["X-Cache"] == "HIT"  # the cache is as it was


@pytest.mark.parametrize("host", ["localhost:8080", "LOCALHOST", "127.0.0.1:8080", "[::1]:8080", "10.9.8.7:8080",
                                  "[2001:db8::7]", "devbox:8080", "devbox.team.example.", "team-box.example"])
def test_the_proxy_s_own_names_and_any_ip_address_are_answered(buddy_config: dict[str, Any],
                                                               fake_redis: fakeredis.FakeRedis, host: str) -> None:
    app = make_app(buddy_config, fake_redis, server={"allowed_hosts": ["team-box.example"]})
    client = app.test_client()
    assert client.get("/up/a", headers={"Host": host}).status_code == 200
    assert client.get("/admin/health", headers={"Host": host}).status_code == 200


def test_a_star_answers_any_name(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis) -> None:
    app = make_app(buddy_config, fake_redis, server={"allowed_hosts": ["*"]})
    assert app.test_client().get("/up/a", headers={"Host": "anything.example"}).status_code == 200


def test_a_refused_head_has_no_body_and_a_refused_name_is_logged_once(
        app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    head = client.head("/up/a", headers={"Host": "evil.example"})
    assert head.status_code == 421 and head.data == b"" and int(head.headers["Content-Length"]) > 0
    for _ in range(5):
        client.get("/admin/metrics", headers={"Host": "evil.example"})
    assert len([r for r in caplog.records if "'evil.example'" in r.getMessage()]) == 1


def call(app: Flask, protocol: str, host: str | None) -> tuple[str, bytes]:
    environ = EnvironBuilder(path="/up/a").get_environ()
    environ["SERVER_PROTOCOL"] = protocol
    if host is None:
        del environ["HTTP_HOST"]
    else:
        environ["HTTP_HOST"] = host
    seen: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    return seen[0], body


def test_without_host_http_1_0_is_answered_and_http_1_1_is_a_bad_request(app: Flask) -> None:
    assert call(app, "HTTP/1.0", None)[0] == "200 OK"
    status, body = call(app, "HTTP/1.1", None)
    assert status.startswith("400") and b"must carry a Host header" in body
    assert call(app, "HTTP/1.1", "evil.example")[0].startswith("421")
