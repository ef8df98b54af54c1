"""Upstream bodies decoded here: a gzip or deflate stream cut short is an error, never a shorter body."""
from __future__ import annotations

import gzip
import io
import zlib

import pytest
import requests
from urllib3.response import HTTPResponse

from buddy.content import body_chunks, content_coding

TEXT = b'{"edges": [' + b'{"rel": "IsA"}, ' * 5000 + b"{}]}"


def response_of(raw: bytes) -> requests.Response:
    response = requests.Response()
    response.raw = HTTPResponse(body=io.BytesIO(raw), preload_content=False, decode_content=False)
    return response


# Named, not shown by their bytes: gzip's header holds the time, and pytest-xdist needs every worker to collect
# the same test ids.
@pytest.mark.parametrize(("coding", "raw"), [
    ("gzip", gzip.compress(TEXT)),
    ("deflate", zlib.compress(TEXT)),
    ("deflate", zlib.compress(TEXT)[2:-4]),  # raw deflate, as some servers send it
    (None, TEXT),
], ids=["gzip", "deflate", "raw-deflate", "identity"])
def test_whole_bodies_decode_exactly(coding: str | None, raw: bytes) -> None:
    assert b"".join(body_chunks(response_of(raw), coding, 4096)) == TEXT


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_body_cut_short_raises(coding: str) -> None:
    whole = gzip.compress(TEXT) if coding == "gzip" else zlib.compress(TEXT)
    with pytest.raises(requests.exceptions.ContentDecodingError, match="ended before its end"):
        b"".join(body_chunks(response_of(whole[: len(whole) // 2]), coding, 4096))


def test_a_small_compressed_body_never_expands_into_one_huge_chunk() -> None:
    bomb = gzip.compress(b"\0" * 20_000_000)
    sizes = [len(chunk) for chunk in body_chunks(response_of(bomb), "gzip", 65536)]
    assert max(sizes) <= 65536 and sum(sizes) == 20_000_000


def test_only_one_known_coding_is_decoded() -> None:
    assert content_coding("gzip") == "gzip" and content_coding(" Deflate ") == "deflate"
    assert content_coding("identity, gzip") == "gzip"
    assert content_coding("br") is None and content_coding("gzip, gzip") is None and content_coding("") is None
