"""Whatever a client sends, the proxy answers without a 500 and only ever calls the configured upstream."""
from __future__ import annotations

from urllib.parse import urlsplit

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from buddy import create_app
from buddy.messages import ProxyResult
from buddy.upstream import UpstreamClient

UPSTREAM = "https://api.example.org:8443/base"


@pytest.fixture(scope="module")
def recording_app():
    calls: list[str] = []

    def send(self, domain, method, url, headers, body, progress=lambda: None):
        calls.append(url)
        return ProxyResult(200, "OK", [("Content-Type", "text/plain")], body=b"ok")

    original = UpstreamClient.send
    UpstreamClient.send = send
    app = create_app({"domain_mappings": {"up": {"upstream": UPSTREAM}}, "logging": {"enable_console": False}},
                     redis_client=fakeredis.FakeRedis(), environ={})
    yield app, calls
    UpstreamClient.send = original


def call(app, raw_path: bytes, query: bytes, headers: dict[str, str], method: str = "GET") -> int:
    environ = EnvironBuilder(method=method, headers=headers).get_environ()
    raw = raw_path.decode("latin-1")
    environ.update(RAW_URI=raw, REQUEST_URI=raw, PATH_INFO=raw.split("?")[0] or "/",
                   QUERY_STRING=query.decode("latin-1"))
    statuses = []
    list(app(environ, lambda status, headers, exc=None: statuses.append(status)))
    return int(statuses[0].split()[0])


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rest=st.binary(max_size=80).filter(lambda b: b"?" not in b and b"#" not in b),
    query=st.binary(max_size=60).filter(lambda b: b"#" not in b),
    header=st.tuples(st.sampled_from(["Accept", "X-Thing", "Connection", "Authorization", "Content-Type"]),
                     header_text),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS"]),
)
def test_no_input_escapes_the_upstream_or_causes_a_500(recording_app, rest, query, header, method) -> None:
    app, calls = recording_app
    calls.clear()
    status = call(app, b"/up/" + rest, query, {header[0]: header[1]}, method)
    assert status < 500
    for url in calls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == ("https", "api.example.org", 8443)
        assert parts.path == "/base/" or parts.path.startswith("/base/")
        assert ".." not in parts.path.split("/")


@pytest.mark.parametrize("raw", [b"http://evil.example/up/x", b"evil.example:443", b"*", b"//evil.example/up"])
def test_absolute_and_authority_targets_are_refused(recording_app, raw) -> None:
    app, calls = recording_app
    calls.clear()
    assert call(app, raw, b"", {}) in (400, 404)
    assert calls == []
