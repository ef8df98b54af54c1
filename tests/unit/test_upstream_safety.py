"""The upstream URL can only ever name the configured upstream, under its base path; headers are filtered."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buddy.errors import BadProxyRequest
from buddy.forwarding import (
    build_url,
    client_response_headers,
    forwardable_request_headers,
    rewrite_location,
    safe_path,
    safe_query,
    storable_headers,
    upstream_path,
)
from buddy.settings import validate_config

DOMAIN = validate_config({"domain_mappings": {"w": {"upstream": "https://api.example.org:8443/v2"}}}).domains["w"]


def url_for(rest: bytes | None, query: bytes = b"") -> str:
    path = upstream_path(DOMAIN, None if rest is None else safe_path(rest))
    return build_url(DOMAIN, path, safe_query(query))


def test_paths_map_under_the_base_path() -> None:
    assert url_for(None) == "https://api.example.org:8443/v2"
    assert url_for(b"") == "https://api.example.org:8443/v2/"
    assert url_for(b"c/en/dog", b"a=1&b=%20x") == "https://api.example.org:8443/v2/c/en/dog?a=1&b=%20x"
    assert url_for(b"wiki/Caf%C3%A9") == "https://api.example.org:8443/v2/wiki/Caf%C3%A9"


@pytest.mark.parametrize("rest", [b"..", b"../x", b"a/../../x", b"%2e%2e/x", b"%2E%2e", b"a/..%2f..%2fx",
                                  b"a/..%5cx", b".", b"x/%2e/y", b"a\\..\\b"])
def test_traversal_is_refused(rest: bytes) -> None:
    with pytest.raises(BadProxyRequest):
        url_for(rest)


@pytest.mark.parametrize("rest", [b"%zz", b"a%2", b"a%00b", b"a\x00b", b"a%0d%0aX-Injected: 1"])
def test_bad_encoding_and_control_bytes_are_refused(rest: bytes) -> None:
    with pytest.raises(BadProxyRequest):
        url_for(rest)


@pytest.mark.parametrize("rest", [b"/evil.example/x", b"@evil.example", b"%2f%2fevil.example", b"\\\\evil.example",
                                  b"http://evil.example/", b"x#@evil.example", b"x?@evil.example"])
def test_host_tricks_stay_on_the_upstream(rest: bytes) -> None:
    parts = urlsplit(url_for(rest))
    assert (parts.scheme, parts.netloc) == ("https", "api.example.org:8443")
    assert parts.path.startswith("/v2/")
    assert not parts.query and not parts.fragment


def test_encoded_slash_stays_inside_its_segment() -> None:
    assert url_for(b"a%2Fb") == "https://api.example.org:8443/v2/a%2Fb"


def test_query_strays_are_encoded_and_escapes_kept() -> None:
    assert safe_query(b"q=a b#frag&x=%41") == "q=a%20b%23frag&x=%41"
    with pytest.raises(BadProxyRequest):
        safe_query(b"q=a\r\nX-Injected: 1")
    # Encoded control characters are data: a multi-line SPARQL query as urlencode() writes it.
    sparql = b"query=SELECT%20%3Fx%0AWHERE%20%7B%09%3Fx%20a%20%3Fy%20%7D"
    assert safe_query(sparql) == sparql.decode()


@settings(max_examples=400, deadline=None)
@given(rest=st.binary(max_size=60), query=st.binary(max_size=40))
def test_any_input_maps_to_the_upstream_or_is_refused(rest: bytes, query: bytes) -> None:
    try:
        url = url_for(rest, query)
    except BadProxyRequest:
        return
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("https", "api.example.org", 8443)
    assert parts.path == "/v2/" or parts.path.startswith("/v2/")
    assert ".." not in parts.path.split("/")


def test_hop_by_hop_and_connection_listed_headers_are_not_forwarded() -> None:
    sent = forwardable_request_headers([
        ("Host", "127.0.0.1:8080"), ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"),
        ("Authorization", "Bearer upstream"), ("Accept", "application/json"), ("Content-Length", "3"),
        ("X-API-Buddy-Key", "proxy-key"),
    ])
    assert sent == {"Authorization": "Bearer upstream", "Accept": "application/json"}


def test_response_headers_for_client_and_for_storage() -> None:
    upstream = [("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Content-Length", "10"),
                ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Connection", "close"), ("ETag", '"x"')]
    to_client = client_response_headers(upstream, decoded=True)
    assert to_client == [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("ETag", '"x"')]
    assert ("Content-Encoding", "gzip") in client_response_headers(upstream, decoded=False)
    assert storable_headers(to_client) == [("Content-Type", "application/json"), ("ETag", '"x"')]


def test_redirects_within_the_upstream_come_back_through_the_proxy() -> None:
    here = "https://api.example.org:8443/v2/a/b"
    assert rewrite_location(DOMAIN, here, "https://api.example.org:8443/v2/c?d=1") == "/w/c?d=1"
    assert rewrite_location(DOMAIN, here, "/v2/e") == "/w/e"
    assert rewrite_location(DOMAIN, here, "f") == "/w/a/f"
    assert rewrite_location(DOMAIN, here, "https://elsewhere.example/x") == "https://elsewhere.example/x"
    assert rewrite_location(DOMAIN, here, "/other/x") == "https://api.example.org:8443/other/x"


def test_upstream_headers_that_cannot_be_sent_on_are_dropped() -> None:
    odd = [("X-Folded", "a\r\n b"), ("X-Ctl", "a\x01b"), ("Bad Name", "x"), ("X-Tab", "a\tb"), ("ETag", '"e"')]
    assert client_response_headers(odd, decoded=False) == [("X-Tab", "a\tb"), ("ETag", '"e"')]


def test_a_redirect_through_the_proxy_keeps_the_key_where_the_client_put_it() -> None:
    from buddy.forwarding import keep_access_key
    from buddy.settings import validate_config

    domain = validate_config({"domain_mappings": {"up": {"upstream": "https://u.example.org"}}}).domains["up"]
    headers = [("Location", "/up/target?x=1"), ("Content-Type", "text/plain")]
    assert keep_access_key(headers, domain, "k3y", "") == [("Location", "/k3y/up/target?x=1"), headers[1]]
    assert keep_access_key(headers, domain, "", "k3y")[0] == ("Location", "/up/target?x=1&key=k3y")
    assert keep_access_key([("Location", "/up")], domain, "", "k3y") == [("Location", "/up?key=k3y")]
    # A redirect elsewhere (another host, another mapping) never carries the proxy's key.
    for elsewhere in ("https://other.example.org/up/x", "/upper/x", "/other/up"):
        assert keep_access_key([("Location", elsewhere)], domain, "k3y", "k3y") == [("Location", elsewhere)]


def test_a_502_says_what_failed_in_words_an_operator_can_act_on() -> None:
    import socket

    import requests

    from buddy.upstream import failure_kind

    try:
        requests.get("http://127.0.0.1:1/x?api_key=secret", timeout=2)
    except requests.RequestException as exc:
        refused = exc
    dns = requests.ConnectionError("lookup")
    dns.__cause__ = socket.gaierror(-2, "Name or service not known")
    tls = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    reset = requests.ConnectionError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    assert [failure_kind(e) for e in (refused, dns, tls, reset)] == [
        "connection refused", "DNS lookup failed", "TLS verification failed", "connection reset"]
