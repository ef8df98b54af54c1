"""The cache key: what makes two requests the same entry, and what keeps them apart."""
from __future__ import annotations

from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, sorted_query, vary_values
from buddy.redis_keys import RedisKeys

BASE = RequestShape(
    method="GET", domain="conceptnet", upstream="https://api.conceptnet.io:443", path="/c/en/dog",
    query="limit=5&offset=0", body=b"",
    content_type="", vary=(("accept", "application/json"), ("accept-language", None)), credentials="",
)


def key(**changes) -> str:
    return fingerprint(BASE._replace(**changes))


def test_key_format_is_pinned() -> None:
    # A change here silently empties every deployed cache: bump KEY_VERSION on purpose, never by accident.
    assert fingerprint(BASE) == "ddb6545ac4d666e8a6ab83bf4d8e2ed1be538e0f4c0d4edb21d9a06a2221932b"
    assert RedisKeys("buddy:").cache("conceptnet", "ab12") == "buddy:cache:{conceptnet}:ab12"


def test_head_shares_gets_entry_but_post_does_not() -> None:
    assert key(method="HEAD") == key(method="GET")
    assert key(method="POST") != key(method="GET")


def test_query_order_of_different_names_does_not_matter() -> None:
    assert key(query="offset=0&limit=5") == key(query="limit=5&offset=0")


def test_repeated_names_keep_their_order() -> None:
    assert key(query="a=1&a=2") != key(query="a=2&a=1")
    assert sorted_query("b=1&a=2&a=1") == ("a=2", "a=1", "b=1")


def test_trailing_slash_flag_and_empty_values_are_distinct() -> None:
    assert key(path="/x/") != key(path="/x")
    assert key(query="flag") != key(query="")
    assert key(query="flag") != key(query="flag=")


def test_body_content_type_and_domain_separate_entries() -> None:
    assert key(method="POST", body=b'{"q": 1}') != key(method="POST", body=b'{"q": 2}')
    assert key(content_type="application/json") != key(content_type="text/plain")
    assert key(domain="dbpedia") != key()


def test_vary_headers_separate_entries() -> None:
    german = vary_values([("Accept-Language", "de")], ["accept", "accept-language"])
    english = vary_values([("accept-language", "en")], ["accept", "accept-language"])
    assert german == (("accept", None), ("accept-language", "de"))
    assert key(vary=german) != key(vary=english)
    empty = vary_values([("Accept-Language", "")], ["accept-language"])
    assert empty == (("accept-language", ""),) != vary_values([], ["accept-language"])


def test_credentials_are_hashed_never_kept_in_clear() -> None:
    alice = credentials_digest([("Authorization", "Bearer alice-token"), ("Accept", "x")])
    bob = credentials_digest([("authorization", "Bearer bob-token")])
    assert credentials_digest([("Accept", "x")]) == ""
    assert alice != bob and "alice-token" not in alice
    assert key(credentials=alice) != key(credentials=bob) != key()
